"""An existing machine as the place scenarios run (`--target ssh://USER@HOST[:PORT]`, `--target
vagrant[:NAME]`): no QEMU, its own kernel (which must have ublk). RemoteMachine offers what the
engine uses of a vm.guest.Guest (exec, push, pull, start, stop, is_alive, ...), so the runner's pool
hands it out instead of booting.

The host key must already be in the known_hosts file (nothing is added); a machine cannot be
powered off, rebooted or replaced by a fresh one, so the cases that need that are not applicable."""
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import paramiko

from ..errors import BenchError, SetupError
from ..guest import DATA_DIR, install_server
from ..paths import GUESTFS_DIR
from ..ssh import Session
from .errors import GUEST_LOST, PANIC, SPLAT
from .health import decode_taint
from .steps import RUN as STEP_RUN   # first: steps.py loads steps_crash in the order it needs
from .steps_crash import step_power_cut, step_reboot

# The step kinds that end a boot of the machine (kill QEMU, reboot and boot again): one list, from
# the functions that do it, so a new machine-level step is added there and here together.
VM_STEPS = tuple(k for k, f in STEP_RUN.items() if f in (step_power_cut, step_reboot))
# The cases after one with these verdicts need a fresh kernel, which only a booted guest gives.
SPOILING = (PANIC, SPLAT, GUEST_LOST)
WRAPPER_LOCAL = GUESTFS_DIR / "usr/local/bin/ublk"   # the `ublk` CLI the agent calls
WRAPPER_REMOTE = "/usr/local/bin/ublk"
WRAPPER_MARK = "ubdsrv"                               # a `ublk` there without it is someone else's
NEEDS = ("python3", "fio", "timeout", "modprobe", "tar")
SSH_PORT = 22


class NotApplicable(BenchError):
    """This case cannot run on a target machine; the report says so (a skip, not a failure)."""


@dataclass(frozen=True)
class Spec:
    """--target as given: ssh://USER@HOST[:PORT], or vagrant[:NAME] (resolved when connecting)."""
    text: str
    user: str = "root"
    host: str = ""
    port: int = SSH_PORT
    vagrant: str = None       # the machine's name for `vagrant ssh-config`; "" for the default
    identity: Path = None     # from vagrant's IdentityFile

    @property
    def where(self) -> str:
        if not self.host:   # a vagrant box not resolved yet
            return self.text
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != SSH_PORT else "")

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH (and paramiko) name the host in known_hosts."""
        return self.host if self.port == SSH_PORT else f"[{self.host}]:{self.port}"


USAGE = "expected ssh://USER@HOST[:PORT] or vagrant[:NAME]"


def parse(text: str) -> Spec:
    """The --target value (ValueError naming what was expected)."""
    if text == "vagrant" or text.startswith("vagrant:"):
        name = text.partition(":")[2]
        if name and not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{text!r}: a vagrant machine name is letters, digits, _ . -; {USAGE}")
        return Spec(text, vagrant=name)
    u = urlsplit(text)
    if u.scheme != "ssh":
        raise ValueError(f"{text!r}: {USAGE}")
    if u.path not in ("", "/") or u.query or u.fragment:
        raise ValueError(f"{text!r}: nothing may follow HOST[:PORT]; {USAGE}")
    if u.password is not None:
        raise ValueError(f"{text!r}: no password in the URL (keys or the ssh agent log in); {USAGE}")
    if not u.username or not u.hostname:
        raise ValueError(f"{text!r}: both the user and the host are needed; {USAGE}")
    try:
        port = SSH_PORT if u.port is None else u.port
    except ValueError:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535; {USAGE}") from None
    if port == 0:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535; {USAGE}")
    return Spec(text, user=u.username, host=u.hostname, port=port)


def parse_ssh_config(text: str, source="vagrant ssh-config") -> Spec:
    """HostName, Port, User, IdentityFile of the first Host block of `vagrant ssh-config` output."""
    found = {}
    for line in text.splitlines():
        parts = line.strip().split(None, 1)
        if len(parts) != 2 or parts[0].startswith("#"):
            continue
        key, value = parts[0].lower(), parts[1].strip()
        if key == "host" and found:
            break   # the next machine's block
        if len(value) > 1 and value[0] == value[-1] == '"':
            value = value[1:-1]
        found.setdefault(key, value)   # the first IdentityFile is the one vagrant made
    missing = [k for k in ("hostname", "user", "port") if k not in found]
    if missing:
        raise SetupError(f"{source}: no {', '.join(missing)} in its output:\n{text.strip()[:500]}")
    if not found["port"].isdigit():
        raise SetupError(f"{source}: Port {found['port']!r} is no number")
    identity = Path(found["identityfile"]).expanduser() if "identityfile" in found else None
    return Spec(source, user=found["user"], host=found["hostname"], port=int(found["port"]),
                identity=identity)


def resolve(spec: Spec, run=subprocess.run) -> Spec:
    """A vagrant target as ssh: `vagrant ssh-config [NAME]` (in the current folder's Vagrantfile)."""
    if spec.vagrant is None:
        return spec
    if shutil.which("vagrant") is None:
        raise SetupError(f"--target {spec.text}: `vagrant` is not installed (or not on PATH)")
    argv = ["vagrant", "ssh-config"] + ([spec.vagrant] if spec.vagrant else [])
    try:
        r = run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise SetupError(f"--target {spec.text}: `{shlex.join(argv)}` did not answer in 120 s") \
            from None
    if r.returncode != 0:
        up = shlex.join(["vagrant", "up"] + argv[2:])
        raise SetupError(f"--target {spec.text}: `{shlex.join(argv)}` failed (is the box up? "
                         f"`{up}`): {(r.stderr or r.stdout).strip()[-500:]}")
    found = parse_ssh_config(r.stdout, shlex.join(argv))
    return Spec(spec.text, user=found.user, host=found.host, port=found.port, vagrant=spec.vagrant,
                identity=found.identity)


class UnknownHost(paramiko.RejectPolicy):
    """RejectPolicy with a message that says how to add the key (nothing is ever added here)."""

    def __init__(self, spec: Spec, known_hosts: Path):
        self.spec, self.known_hosts = spec, known_hosts

    def missing_host_key(self, client, hostname, key):
        raise SetupError(f"target {self.spec.where}: its host key ({key.get_name()}) is not in "
                         f"{self.known_hosts} as {self.spec.known_hosts_name}; nothing was pushed. "
                         f"Check the key and add it, e.g. `{keyscan_command(self.spec, self.known_hosts)}` "
                         "(or log in once, compare the fingerprint it shows and answer yes: "
                         f"`{shlex.join(ssh_argv(self.spec, None, self.known_hosts, 'ask'))}`)")


def keyscan_command(spec: Spec, known_hosts: Path) -> str:
    port = ["-p", str(spec.port)] if spec.port != SSH_PORT else []
    return shlex.join(["ssh-keyscan", *port, spec.host]) + f" >> {shlex.quote(str(known_hosts))}"


def ssh_argv(spec: Spec, identity, known_hosts: Path, strict="yes") -> list:
    key = ["-i", str(identity)] if identity else []
    port = ["-p", str(spec.port)] if spec.port != SSH_PORT else []
    return ["ssh", *key, *port, "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", f"StrictHostKeyChecking={strict}", f"{spec.user}@{spec.host}"]


class _SudoTransport:
    """A non-root login: every command the engine starts (its execs, the agent) runs under sudo -n."""

    def __init__(self, transport):
        self._t = transport

    def open_session(self, *a, **kw):
        chan = self._t.open_session(*a, **kw)
        plain = chan.exec_command
        chan.exec_command = lambda command: plain("sudo -n " + command)
        return chan

    def __getattr__(self, name):
        return getattr(self._t, name)


class _SudoClient:
    def __init__(self, client):
        self._c = client

    def get_transport(self):
        t = self._c.get_transport()
        return None if t is None else _SudoTransport(t)

    def __getattr__(self, name):
        return getattr(self._c, name)


class TargetSession(Session):
    """vm/ssh.py's Session (exec with deadlines, SFTP), logging in with the user's keys and checking
    the host key against known_hosts instead of the image's pinned one."""

    def __init__(self, spec: Spec, known_hosts: Path, identity: Path = None):
        self.host, self.port, self.user = spec.host, spec.port, spec.user
        self.spec, self.known_hosts, self.identity = spec, known_hosts, identity
        self.client = None

    def connect(self, timeout=15.0):
        client = paramiko.SSHClient()
        if self.known_hosts.is_file():
            client.load_host_keys(str(self.known_hosts))
        client.set_missing_host_key_policy(UnknownHost(self.spec, self.known_hosts))
        where = f"target {self.spec.where}"
        try:
            client.connect(self.host, self.port, username=self.user, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout,
                           key_filename=str(self.identity) if self.identity else None,
                           allow_agent=True, look_for_keys=True)
        except paramiko.BadHostKeyException as e:
            client.close()
            raise SetupError(f"{where}: its host key ({e.key.get_name()}) does NOT match the one "
                             f"for {self.spec.known_hosts_name} in {self.known_hosts}; nothing was "
                             "pushed. If the machine was reinstalled, remove the old line (`ssh-keygen "
                             f"-R {shlex.quote(self.spec.known_hosts_name)} -f {self.known_hosts}`) "
                             f"and add the new key, e.g. `{keyscan_command(self.spec, self.known_hosts)}`"
                             ) from None
        except paramiko.AuthenticationException as e:
            client.close()
            keys = f"{self.identity}, " if self.identity else ""
            raise SetupError(f"{where}: login refused ({e}); tried {keys}the ssh agent and "
                             "~/.ssh/id_* (--target-identity FILE names a key)") from None
        except SetupError:
            client.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as e:
            client.close()
            raise SetupError(f"{where}: could not connect: {e}") from None
        client.get_transport().set_keepalive(5)
        self.client = client if self.user == "root" else _SudoClient(client)


class RemoteMachine:
    """The target as the engine's guest. start() connects (the host key checked first), checks the
    machine once, and pushes the server; stop() deletes the ublk devices left and disconnects
    (the machine stays up)."""

    def __init__(self, spec: Spec, run_dir: Path, known_hosts: Path, identity=None,
                 server_dir=None):
        """known_hosts: --known-hosts (its default is in vm/options.py)."""
        self.given, self.spec = spec, None
        self.known_hosts = Path(known_hosts).expanduser()
        self.identity = Path(identity).expanduser() if identity else None
        self.run_dir, self.server_dir = Path(run_dir), server_dir
        self.session = None
        self.machine = None          # what session.guest_lost() and the pool ask of a machine
        self.boot_seconds = 0.0
        self.has_data_dir = False
        self.taint0 = None
        self.spoiled_by = None       # "case id (verdict)" once a case left the kernel unfit
        self.pushed = False          # the server is in place: from here on the devices are ours

    # --- the Guest interface ---------------------------------------------------------------------
    @property
    def where(self) -> str:
        return (self.spec or self.given).where

    @property
    def name(self):
        return f"target {self.where}"

    @name.setter
    def name(self, _):   # the pool names guests; a target keeps its own name
        pass

    @property
    def accel(self):
        return f"target {self.given.text}"

    @property
    def console_log(self) -> Path:
        """No console here: target.log lists the connections instead (a case's console.log holds
        those made while it ran, e.g. a reconnect after the case before failed)."""
        return self.run_dir / "target.log"

    def connect(self):
        """Resolves a vagrant target, checks the host key, logs in, checks the machine. Raises
        SetupError (exit 2) before anything is pushed."""
        if self.session is not None and self.is_alive():
            return
        t0 = time.monotonic()
        self.spec = resolve(self.given)
        identity = self.identity or self.spec.identity
        session = TargetSession(self.spec, self.known_hosts, identity)
        session.connect()
        self.session = session
        self.boot_seconds = time.monotonic() - t0
        try:
            self._probe()
        except BaseException:
            self.stop()
            raise

    def _probe(self):
        where = f"target {self.where}"
        r = self.exec("uname -r; cat /proc/sys/kernel/tainted; test -d " + DATA_DIR + " && echo data"
                      "; ls /dev/ublkc* 2>/dev/null; for c in " + " ".join(NEEDS) +
                      "; do command -v $c >/dev/null || echo missing $c; done", timeout=60)
        if r.status != 0:
            hint = " (sudo -n needs a password? a non-root user needs sudo without one)" \
                if self.spec.user != "root" else ""
            raise SetupError(f"{where}: checking the machine failed (exit {r.status}){hint}: "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
        lines = r.stdout.split("\n")
        release, taint = lines[0].strip(), int(lines[1].strip() or 0)
        missing = [x.split()[1] for x in lines if x.startswith("missing ")]
        devices = [x for x in lines if x.startswith("/dev/ublkc")]
        if missing:
            raise SetupError(f"{where}: the scenarios need {', '.join(missing)} on the machine")
        if devices and self.taint0 is not None:   # a case before left them: not someone else's
            self.spoiled_by = self.spoiled_by or f"ublk devices left behind: {' '.join(devices)}"
        elif devices:
            raise SetupError(f"{where}: ublk devices exist already ({' '.join(devices)}); the bench "
                             "deletes every ublk device after each case, so it runs only on a machine "
                             "without others")
        m = self.exec("modprobe ublk_drv && test -e /dev/ublk-control", timeout=60)
        if not m.ok:
            raise SetupError(f"{where}: its kernel ({release}) has no ublk: `modprobe ublk_drv` "
                             f"gave {(m.stderr or m.stdout).strip()[-300:] or 'no /dev/ublk-control'}")
        self.has_data_dir = "data" in lines
        if self.taint0 is None:
            self.taint0 = taint
        elif taint & ~self.taint0:
            self.spoiled_by = self.spoiled_by or f"taint {decode_taint(taint & ~self.taint0)}"
        self.machine = SimpleNamespace(image=SimpleNamespace(kernel_release=release),
                                       wait_exit=lambda timeout=0: False, console_text=lambda: "",
                                       alive=self.is_alive)
        self._note(f"connected to {self.spec.where} ({release}, taint {taint}) in "
                   f"{self.boot_seconds:.1f} s")

    def start(self):
        """What Guest.start() gives: a machine to run on, with the server pushed in."""
        self.connect()
        if self.spoiled_by:
            why = self.spoiled_by
            self.stop()
            raise NotApplicable(f"not applicable on target {self.where}: an earlier case left "
                                f"its kernel unfit ({why}); the cases after it need a fresh kernel, "
                                "which only a guest the bench boots gives")
        self.push_server()

    def push_server(self):
        install_server(self, self.server_dir)
        r = self.exec(f"cat {WRAPPER_REMOTE} 2>/dev/null", timeout=30)
        if r.ok and WRAPPER_MARK not in r.stdout:
            raise SetupError(f"target {self.where}: {WRAPPER_REMOTE} is another `ublk` (not the "
                             "bench's wrapper of the pushed server); move it away to run scenarios here")
        if not r.ok:
            self.push(WRAPPER_LOCAL, WRAPPER_REMOTE)
        self.pushed = True

    def stop(self):
        """Disconnects. A guest's QEMU takes its devices and servers with it; here they would stay
        (Ctrl-C mid-case), so every ublk device goes first (all are the bench's: _probe refused a machine
        with others, and nothing is deleted before the bench pushed its server)."""
        if self.session is not None:
            if self.pushed and self.is_alive():
                try:
                    self.exec("ublk del -a >/dev/null 2>&1; true", timeout=30)
                except (BenchError, OSError, paramiko.SSHException):
                    pass
            self.session.close()
            self.session = None
            self._note("disconnected")

    def is_alive(self) -> bool:
        return self.session is not None and self.session._transport_active()

    def exec(self, command, timeout=60.0, check=False, **kw):
        return self.session.exec(command, timeout=timeout, check=check, alive=self.is_alive, **kw)

    def push(self, local, remote):
        if self.spec.user == "root":
            self.session.push(Path(local), remote)
            return
        # SFTP runs as the user: into a folder of its own first, then into place under sudo
        stage = self.exec(f"d=$(mktemp -d) && chown {shlex.quote(self.spec.user)} $d && echo $d",
                          timeout=30, check=True).stdout.strip()
        name = f"{stage}/{Path(local).name}"
        try:
            self.session.push(Path(local), name)
            q = shlex.quote
            self.exec(f"rm -rf {q(remote)} && mkdir -p {q(str(Path(remote).parent))} && "
                      f"cp -r {q(name)} {q(remote)} && chown -R 0:0 {q(remote)}", timeout=60,
                      check=True)
        finally:
            self.exec(f"rm -rf {shlex.quote(stage)}", timeout=30)

    def pull(self, remote, local):
        self.session.pull(remote, Path(local))

    def ssh_argv(self) -> list:
        return ssh_argv(self.spec, self.identity or self.spec.identity, self.known_hosts)

    def ssh_command(self) -> str:
        return shlex.join(self.ssh_argv())

    def power_cut(self):
        raise NotApplicable(f"target {self.where}: no power to cut (a machine the bench boots "
                            "is needed)")

    reboot = boot_again = power_cut

    # --- which cases fit -------------------------------------------------------------------------
    def not_applicable(self, case) -> str:
        """Why this case cannot run on the target ("" when it can)."""
        where = f"not applicable on target {self.where}"
        vm_steps = sorted({s.kind for s in case.steps if s.kind in VM_STEPS})
        if vm_steps:
            return (f"{where}: step {', '.join(vm_steps)} needs a VM the bench boots (it cuts the "
                    "power or reboots the machine)")
        if not self.has_data_dir and needs_data_dir(case):
            return f"{where}: the case keeps files on {DATA_DIR}, which the machine does not have"
        return ""

    def case_done(self, res):
        if res.kind in SPOILING and not self.spoiled_by:
            self.spoiled_by = f"{res.id}: {res.kind}"

    def _note(self, text):
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.console_log, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {text}\n")


def needs_data_dir(case) -> bool:
    files = [d.file for d in case.devices.values() if d.file] + \
            [s.args["file"] for s in case.steps if s.args.get("file")]
    return any(f == DATA_DIR or f.startswith(DATA_DIR + "/") for f in files)
