"""The ublk device as the host knows it, written once.

- its settings: default, range, and the `ublk add` option each becomes;
- the targets, and the settings each takes (a target's own options live in its entry);
- `add_command`: the `ublk add` line built from a device (and `losetup` for the kernel's loop);
- which processes are the server's (`is_server_argv`, defined in the server package: see below);
- `SPLATS`: the kernel log lines that mean the kernel complained.

The scenario schema and loader, the scenario steps, the bench and the health checks read this module.
The server keeps its own defaults for someone typing `ublk add` by hand; the limits are the server's
(ubdsrv/cli.py), so a scenario the host accepts is one the server accepts.

Adding a target: one entry in TARGETS (its options, if any) next to its module in ubdsrv/targets/;
docs/add-a-target.md walks through it."""
import re
import shlex
from dataclasses import dataclass, field
from typing import Optional

from ubdsrv.cli import MAX_DEPTH, MAX_QUEUES   # what the server's `ublk add` accepts
# One definition for host, guest and server: the guest's agent and the `ublk` CLI import it from the
# pushed server package, which needs the standard library only.
from ubdsrv.proc import is_server_argv  # noqa: F401  (part of the vocabulary)


@dataclass(frozen=True)
class Setting:
    """One device setting: what a scenario may write and which `ublk add` option it becomes.
    A target's own setting whose default is None is left out of the command: the server decides."""
    kind: str              # int | float | size | flag (0/1, true/false) | path | choice | text
    default: object = None
    lo: float = None       # int, float, size: the accepted range
    hi: float = None
    choices: tuple = ()    # choice: the accepted words
    pattern: str = ""      # text: a regular expression the whole value matches
    option: str = ""       # the `ublk add` option
    bare: bool = False     # a flag given as the bare option (--buffered_io), not as `-g 1`
    when: tuple = ()       # (key, value) pairs: the setting applies only with these
    doc: str = ""

    def same_meaning(self, other) -> bool:
        return (self.kind, self.default, self.lo, self.hi, self.choices, self.pattern, self.option) == \
            (other.kind, other.default, other.lo, other.hi, other.choices, other.pattern, other.option)


MAX_DEVICE_ID = 1023

SIZE = Setting("size", 256 << 20, 4096, 1 << 40, option="-s",
               doc="device size; a file-backed target's backing file size (created sparse if absent)")
FILE = Setting("path", option="-f", doc="backing file; created (sparse, `size`) if absent")
# Not a `ublk add` option: written to the disk's queue/scheduler once it is up (scheduler_command).
SCHEDULER = Setting("choice", None, choices=("none", "mq-deadline", "kyber", "bfq"),
                    doc="the disk's I/O scheduler, set once it is up; default: the kernel's "
                        "(mq-deadline with one queue, none with more)")

# Settings of every ublk target (not of kernel_loop).
UBLK = {
    "queues": Setting("int", 1, 1, MAX_QUEUES, option="-q", doc="hardware queues"),
    "depth": Setting("int", 128, 1, MAX_DEPTH, option="-d",
                     doc="queue depth: requests in flight per queue"),
    "recovery": Setting("flag", False, option="-r", doc="UBLK_F_USER_RECOVERY"),
    "recovery_reissue": Setting("flag", False, option="-i",
                                doc="UBLK_F_USER_RECOVERY_REISSUE (needs recovery)"),
    "recovery_fail_io": Setting("flag", False, option="-e",
                                doc="UBLK_F_USER_RECOVERY_FAIL_IO (needs recovery; kernel 6.13+)"),
    "need_get_data": Setting("flag", False, option="-g", doc="UBLK_F_NEED_GET_DATA"),
    "usercopy": Setting("flag", False, option="--usercopy", bare=True,
                        doc="UBLK_F_USER_COPY: data moves by pread/pwrite of /dev/ublkcN (kernel 6.5+)"),
    "id": Setting("int", None, 0, MAX_DEVICE_ID, option="-n",
                  doc="device number N (/dev/ublkbN); default: the next one free"),
}


@dataclass(frozen=True)
class Target:
    name: str
    doc: str
    options: dict = field(default_factory=dict)   # its own settings: key -> Setting (`--key value`)
    file: bool = False     # backed by a file: takes `file`, and `size` is the file's size ...
    file_when: tuple = ()  # ... only with these (key, value) pairs (fault: base = loop)
    ublk: bool = True      # False: a kernel driver, set up to compare with

    def file_backed(self, values) -> bool:
        """Whether a device with these settings (a dict) is backed by a file."""
        return self.file and all(_value(self, values, k) == v for k, v in self.file_when)

    def settings(self) -> dict:
        """Every setting a device of this target takes, `target` first."""
        out = {"target": TARGET, "size": SIZE}
        if self.file:
            out["file"] = FILE
        if self.ublk:
            out.update(UBLK)
        out.update(self.options)
        out["scheduler"] = SCHEDULER
        return out


def _value(target, values, key):
    v = values.get(key)
    return target.options[key].default if v is None and key in target.options else v


BUFFERED_IO = Setting("flag", False, option="--buffered_io", bare=True,
                      doc="page-cache IO on the backing file instead of O_DIRECT")
ON_LOOP = (("base", "loop"),)

# The fault target's own settings (ubdsrv/targets/fault.py): None leaves the server's default.
FAULT = {
    "base": Setting("choice", None, choices=("null", "loop"), option="--base",
                    doc="the target it is built on (server default: null); loop takes `file`"),
    "buffered_io": Setting("flag", False, option="--buffered_io", bare=True, when=ON_LOOP,
                           doc=BUFFERED_IO.doc + " (base = loop)"),
    "delay_us": Setting("int", None, 0, 10_000_000, option="--delay_us",
                        doc="complete every request this many microseconds late"),
    "error_rate": Setting("float", None, 0.0, 1.0, option="--error_rate",
                          doc="fail requests with this probability (a hash of seed and sector)"),
    "seed": Setting("int", None, 0, (1 << 32) - 1, option="--seed", doc="seed of error_rate"),
    "error_sectors": Setting("text", None, pattern=r"\d+(-\d+)?(,\d+(-\d+)?)*", option="--error_sectors",
                             doc='fail requests touching these sectors, e.g. "2048-4095,8192"'),
    "errno": Setting("text", None, pattern=r"E[A-Z0-9]+|[1-9]\d{0,3}", option="--errno",
                     doc="the error injected failures return (server default: EIO)"),
    "error_ops": Setting("choice", None, choices=("read", "write", "any"), option="--error_ops",
                         doc="which requests may fail (server default: any)"),
    "fail_after_ios": Setting("int", None, 0, (1 << 32) - 1, option="--fail_after_ios",
                              doc="no injected error before a queue has seen this many requests"),
    "fail_after_secs": Setting("float", None, 0.0, 86400.0, option="--fail_after_secs",
                               doc="no injected error before the server has run this many seconds"),
    "stuck_tag": Setting("int", None, 0, MAX_DEPTH - 1, option="--stuck_tag",
                         doc="never complete the first request on this tag (of each queue)"),
    "die_during_fetch": Setting("int", None, 1, MAX_DEPTH, option="--die_during_fetch",
                                doc="SIGKILL the server once queue 0 submitted this many FETCHes: "
                                    "`add` must fail cleanly"),
}

TARGETS = {t.name: t for t in (
    Target("null", "completes every request at once; keeps no data"),
    Target("loop", "reads and writes a backing file (O_DIRECT unless buffered_io)", file=True,
           options={"buffered_io": BUFFERED_IO}),
    Target("fault", "null or loop (base) with injected delays and errors, a stuck tag, a dying "
                    "server", FAULT, file=True, file_when=ON_LOOP),
    Target("mem", "a RAM disk in the server's memory; its data is gone when the server exits"),
    Target("kernel_loop", "the kernel's loop driver (losetup --direct-io=on), to compare with",
           file=True, ublk=False),
)}

TARGET = Setting("choice", choices=tuple(TARGETS), option="-t",
                 doc="; ".join(f"{t.name}: {t.doc}" for t in TARGETS.values()))


def settings() -> dict:
    """Every setting any target takes (a key two targets share must mean the same to both)."""
    out = {}
    for t in TARGETS.values():
        for key, s in t.settings().items():
            if not out.setdefault(key, s).same_meaning(s):
                raise AssertionError(f"device setting {key!r} means two things (target {t.name})")
    return out


def rules(values: dict, given=None):
    """(key, message) for each combination of settings the target or the driver refuses; `given`:
    the keys written (default: those with a value)."""
    t = TARGETS[values["target"]]
    given = [k for k in (values if given is None else given) if values.get(k) not in (None, False)]
    for key in given:
        s = t.settings().get(key)
        if s and s.when and not all(_value(t, values, k) == v for k, v in s.when):
            yield key, "applies only with " + " and ".join(f"{k} = {v}" for k, v in s.when)
    if t.file and t.file_when and "file" in given and not t.file_backed(values):
        yield "file", "applies only with " + " and ".join(f"{k} = {v}" for k, v in t.file_when)
    for key in ("recovery_reissue", "recovery_fail_io"):
        if values.get(key) and not values.get("recovery"):
            yield key, "expected recovery = 1 as well (it modifies recovery)"
    if values.get("recovery_reissue") and values.get("recovery_fail_io"):
        yield "recovery_fail_io", "expected at most one of recovery_reissue and recovery_fail_io"


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device as configured; every default comes from the settings above."""
    target: str
    size: int = SIZE.default
    file: Optional[str] = None
    id: Optional[int] = UBLK["id"].default
    queues: int = UBLK["queues"].default
    depth: int = UBLK["depth"].default
    recovery: bool = UBLK["recovery"].default
    recovery_reissue: bool = UBLK["recovery_reissue"].default
    recovery_fail_io: bool = UBLK["recovery_fail_io"].default
    need_get_data: bool = UBLK["need_get_data"].default
    usercopy: bool = UBLK["usercopy"].default
    scheduler: Optional[str] = SCHEDULER.default
    options: dict = field(default_factory=dict)   # the target's own settings, by key

    @property
    def is_ublk(self) -> bool:
        return TARGETS[self.target].ublk

    def option(self, key):
        return self.options.get(key, TARGETS[self.target].options[key].default)


def _argv(s: Setting, value) -> list:
    if value is None or value is False:
        return []
    if s.kind == "flag":
        return [s.option] if s.bare else [s.option, "1"]
    return [s.option, str(value)]


def add_command(d: Device) -> str:
    """The shell command that sets the device up, as a user would type it. For kernel_loop it is
    `losetup ... --show`, which prints the /dev/loopN it took."""
    t = TARGETS[d.target]
    if not t.ublk:
        return shlex.join(["losetup", "--direct-io=on", "-f", "--show", d.file])
    args = ["ublk", "add", *_argv(TARGET, d.target), *_argv(UBLK["id"], d.id)]
    for key, s in UBLK.items():
        if key != "id":
            args += _argv(s, getattr(d, key))
    args += _argv(FILE, d.file) if t.file_backed(d.options) else _argv(SIZE, d.size)
    for key, s in t.options.items():
        args += _argv(s, d.option(key))
    return shlex.join(args)


def scheduler_command(d: Device, dev_path: str) -> str:
    """The shell command that gives the disk at dev_path the device's I/O scheduler and checks that
    the kernel took it (sysfs shows the one in use in brackets); "" when the kernel's default stays."""
    if d.scheduler is None:
        return ""
    sysfs = f"/sys/block/{shlex.quote(dev_path.rsplit('/', 1)[-1])}/queue/scheduler"
    return f"echo {d.scheduler} > {sysfs} && grep -qF '[{d.scheduler}]' {sysfs}"


# The line a WARNING or BUG report opens with; the line after it says what happened.
CUT_HERE = re.compile(r"------------\[ cut here \]")
# One pattern per kind of kernel complaint, matched against kernel log lines.
SPLATS = {
    "BUG": re.compile(r"\bBUG:|kernel BUG at"),
    "WARNING": re.compile(r"\bWARNING:|" + CUT_HERE.pattern),
    "Oops": re.compile(r"\bOops\b|general protection fault"),
    "hung task": re.compile(r"blocked for more than \d+ seconds"),
    "soft lockup": re.compile(r"soft lockup|hard LOCKUP"),
    "RCU stall": re.compile(r"rcu.*(detected stalls|self-detected stall)|RCU stall"),
    "KASAN": re.compile(r"KASAN"),
    "UBSAN": re.compile(r"UBSAN"),
    "refcount": re.compile(r"refcount_t:"),
    "list corruption": re.compile(r"list_(add|del) corruption|list corruption"),
    "lockdep": re.compile(r"possible circular locking dependency|inconsistent lock state"),
}


def find_splats(lines) -> list:
    """(kind, line) for every kernel log line that looks like a kernel complaint."""
    hits = []
    for line in lines:
        for kind, rx in SPLATS.items():
            if rx.search(line):
                hits.append((kind, line.strip()))
                break
    return hits


def headline(splats) -> str:
    """The line to quote of find_splats' hits: the first that says what happened, not a marker."""
    return next((line for _, line in splats if not CUT_HERE.search(line)), splats[0][1])
