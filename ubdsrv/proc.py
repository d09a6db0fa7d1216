"""Which processes are this server's: the one definition, for every caller that is about to signal one.

The `ublk` CLI asks before it kills a daemon; in the guest the scenario agent asks before any signal
(it imports this module from the pushed package) and the bench's CPU sampler lists them with
`python3 -m ubdsrv.proc`. An empty or wrong pid once took a peer's sshd down: never guess.

Standard library only, and nothing imported from the rest of the package (the agent needs no ring)."""
import os

PACKAGE = __package__   # "ubdsrv", imported or run with -m


def is_server_argv(argv) -> bool:
    """A python running this package: `python3 -m ubdsrv ...` (the `ublk` wrapper, and the daemon and
    queue processes forked from it) or `python3 .../ubdsrv/__main__.py`. A shell or `timeout` whose
    arguments merely mention ubdsrv is not one."""
    argv = [a.decode(errors="replace") if isinstance(a, bytes) else a for a in argv if a]
    if len(argv) < 2 or not os.path.basename(argv[0]).startswith("python"):
        return False
    if any(a == "-m" and b == PACKAGE for a, b in zip(argv, argv[1:])):
        return True
    return argv[1].endswith((f"/{PACKAGE}/__main__.py", f"/{PACKAGE}"))


def cmdline(pid):
    """The argv of a process (a list of str), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _alive(pid) -> bool:
    """Exists and is not a zombie (a zombie's pid may be reused once it is reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[-1].split()[:1] != [b"Z"]


def is_server(pid) -> bool:
    """pid is a number above 1, not the caller, alive, and a server process."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or pid == os.getpid():
        return False
    argv = cmdline(pid)
    return argv is not None and is_server_argv(argv) and _alive(pid)


def server_pids(exclude=()) -> list:
    """Every live server process (daemons, queue processes, a `ublk` command in progress)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in exclude and is_server(int(name)):
            out.append(int(name))
    return sorted(out)


if __name__ == "__main__":   # `python3 -m ubdsrv.proc`: the pids, one line (this command is not one)
    print(" ".join(map(str, server_pids())))
