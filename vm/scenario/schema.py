"""The scenario vocabulary: which keys exist, what type and range each takes, and its default.

Each checker takes a raw TOML value and returns the normalised value or raises Invalid with what was
expected. The loader walks a document with these tables; nothing here knows about files or VMs."""
import re
import signal as _signal
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import device


class Invalid(Exception):
    """The value does not fit; the message says what was expected."""


# --- value checkers ------------------------------------------------------------------------------
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def integer(lo, hi):
    def check(v):
        if not _is_int(v):
            raise Invalid(f"an integer from {lo} to {hi}")
        if not lo <= v <= hi:
            raise Invalid(f"an integer from {lo} to {hi}, got {v}")
        return v
    check.expects = f"integer {lo}..{hi}"
    return check


def number(lo, hi, what="a number of seconds"):
    def check(v):
        if not (_is_int(v) or isinstance(v, float)):
            raise Invalid(f"{what} from {lo} to {hi}")
        if not lo <= v <= hi:
            raise Invalid(f"a number from {lo} to {hi}, got {v}")
        return float(v)
    check.expects = f"number {lo}..{hi}"
    return check


def choice(*options):
    def check(v):
        if v not in options or not isinstance(v, str):
            raise Invalid("one of " + ", ".join(f'"{o}"' for o in options))
        return v
    check.expects = " | ".join(options)
    return check


def text(pattern=None, what="a string"):
    rx = re.compile(pattern) if pattern else None

    def check(v):
        if not isinstance(v, str) or not v or (rx and not rx.fullmatch(v)):
            raise Invalid(what)
        return v
    check.expects = what
    return check


def flag(v):
    """ublk flags are written 0/1 by the peers' tools; true/false reads better in TOML: take both."""
    if isinstance(v, bool):
        return v
    if _is_int(v) and v in (0, 1):
        return bool(v)
    raise Invalid("0, 1, true or false")


flag.expects = "0 | 1 | true | false"

_SIZE = re.compile(r"(\d+)\s*([kKmMgG]?)(i?[bB])?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size(lo=512, hi=64 << 30):
    def check(v):
        if _is_int(v):
            n = v
        elif isinstance(v, str) and _SIZE.fullmatch(v.strip()):
            num, unit, _ = _SIZE.fullmatch(v.strip()).groups()
            n = int(num) * _UNITS[unit.lower()]
        else:
            raise Invalid('a size: bytes as an integer, or a string like "4k", "256M", "1G"')
        if not lo <= n <= hi:
            raise Invalid(f"a size from {lo} to {hi} bytes, got {n}")
        return n
    check.expects = 'size ("4k", "256M", bytes)'
    return check


def signal_number(v):
    """A signal by name ("KILL", "SIGTERM") or number; returns the number."""
    if _is_int(v) and 1 <= v <= 64:
        return v
    if isinstance(v, str):
        name = v.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            return int(_signal.Signals[name])
        except KeyError:
            pass
    raise Invalid('a signal name like "KILL", "TERM", "SIGSTOP", or a number 1..64')


signal_number.expects = 'signal ("KILL", "TERM", 9)'

# States the driver reports (UBLK_S_DEV_*), plus GONE: no longer listed (deleted).
STATES = ("LIVE", "DEAD", "QUIESCED", "FAIL_IO", "GONE")
NAME = r"[A-Za-z][A-Za-z0-9_-]{0,31}"
# Any absolute path: every step quotes what it puts into a shell command (test_step_quoting.py).
abs_path = text(r"/[^\x00-\x1f]*", "an absolute path (no control characters)")


def text_list(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise Invalid("a non-empty list of strings")
    return list(v)


text_list.expects = "list of strings"


# --- tables --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Field:
    check: Callable[[Any], Any]
    default: Any = None
    required: bool = False
    ref: str = ""       # "device" or "job": must name one defined earlier
    doc: str = ""


TOP = {
    "description": Field(text(what="a one-line description"), required=True,
                         doc="shown by `run` with no name and in reports"),
    "timeout": Field(number(1, 7200), 600.0, doc="seconds for the whole case (all loops)"),
    "loops": Field(integer(1, 1000), 1, doc="run the step list this many times in one case"),
    "nightly": Field(flag, False, doc="long: only `just nightly` (pytest -m nightly) and "
                                      "`run-all --nightly` run it; `run NAME` always does"),
    "matrix": Field(None, doc="parameter -> list of values; one case per combination"),
    "devices": Field(None, doc="name -> device table"),
    "steps": Field(None, required=True, doc="array of step tables, each with `do`"),
}

# Device tables come from the device vocabulary (vm/device.py): its settings, as checked fields.
def _device_field(key: str, s: device.Setting) -> Field:
    check = {"int": lambda: integer(s.lo, s.hi), "float": lambda: number(s.lo, s.hi, "a number"),
             "size": lambda: size(s.lo, s.hi), "flag": lambda: flag, "path": lambda: abs_path,
             "choice": lambda: choice(*s.choices),
             "text": lambda: text(s.pattern, f"text matching {s.pattern}")}[s.kind]()
    option = f" ({s.option})" if s.option and key != "target" else ""
    return Field(check, s.default, required=key == "target", doc=s.doc + option)


def device_fields(target: str) -> dict:
    """The keys a device of this target takes."""
    return {k: _device_field(k, s) for k, s in device.TARGETS[target].settings().items()}


DEVICE = {k: _device_field(k, s) for k, s in device.settings().items()}   # every target's keys


@dataclass(frozen=True)
class StepKind:
    doc: str
    fields: dict
    timeout: float = 60.0   # default per-step deadline, seconds
    uses_device: bool = True
    extra: dict = field(default_factory=dict)


def _dev(required=True, doc="device name from [devices]"):
    return Field(text(NAME, "a device name"), required=required, ref="device", doc=doc)


FIO = {
    "device": _dev(False, "run on /dev/ublkbN of this device (or give `file`)"),
    "file": Field(abs_path, doc="run on this file instead (e.g. on a mounted filesystem)"),
    "job": Field(text(NAME, "a job name (letters, digits, _ and -)"),
                 doc="name: `wait` and `compare` refer to it; default fio<step>"),
    "rw": Field(choice("read", "write", "randread", "randwrite", "rw", "randrw"), "randread"),
    "bs": Field(size(512, 16 << 20), 4096),
    "iodepth": Field(integer(1, 4096), 32),
    "numjobs": Field(integer(1, 64), 1),
    "ioengine": Field(choice("io_uring", "libaio", "psync", "sync"), "io_uring"),
    "runtime": Field(number(0, 3600), 5.0, doc="seconds, time based; 0: until `size` is done"),
    "size": Field(size(4096, 64 << 30), None, doc="region per job; default: whole device/file"),
    "verify": Field(choice("none", "crc32c", "md5", "sha256"), "none",
                    doc="write then read back and check (crc32c as the peers do)"),
    "direct": Field(flag, True, doc="O_DIRECT"),
    "background": Field(flag, False, doc="start and go on; `wait` (or the end of the loop) reaps it"),
    "expect": Field(choice("ok", "errors_allowed", "errors"), "ok",
                    doc="ok: exit 0, no IO errors; errors_allowed: IO errors but no hang; errors: must "
                        "fail. Data that fails `verify` fails the step whatever `expect` says"),
}

STEPS = {
    "add": StepKind("create the device (ublk add / losetup); returns when LIVE",
                    {"device": _dev(), "expect": Field(choice("live", "fails"), "live",
                                                       doc="fails: `ublk add` must fail and leave "
                                                           "no device behind")}),
    "delete": StepKind("delete the device (ublk del -n N / losetup -d); must return",
                       {"device": _dev(), "background": Field(flag, False,
                                                              doc="start it and go on; a later "
                                                                  "wait_state GONE checks it")}),
    "fio": StepKind("run fio; JSON output kept as evidence", FIO, timeout=0.0),
    "wait": StepKind("reap a background fio job and check its `expect`",
                     {"job": Field(text(NAME, "a job name"), required=True, ref="job")},
                     timeout=0.0, uses_device=False),
    "kill": StepKind("send a signal to the device's daemon, or to one queue's task",
                     {"device": _dev(), "signal": Field(signal_number, 9),
                      "queue": Field(integer(0, 63), None, doc="kill this queue's task instead")},
                     timeout=30.0),
    "stop": StepKind("SIGSTOP the server (daemon and queue tasks), or one queue's task: IO stalls",
                     {"device": _dev(), "queue": Field(integer(0, 63), None,
                                                       doc="stop this queue's task only")},
                     timeout=30.0),
    "cont": StepKind("SIGCONT what `stop` stopped (the server, or one queue's task)",
                     {"device": _dev(), "queue": Field(integer(0, 63), None,
                                                       doc="continue this queue's task only")},
                     timeout=30.0),
    "terminate": StepKind("graceful stop: SIGTERM to the daemon, which must exit and leave the "
                          "device DEAD (as the server documents)", {"device": _dev()}),
    "recover": StepKind("ublk recover -n N (retried while the kernel answers EBUSY)",
                        {"device": _dev()}),
    "wait_state": StepKind("the device must reach `state` within `within` seconds",
                           {"device": _dev(), "state": Field(choice(*STATES), required=True),
                            "within": Field(number(0, 600), 30.0)}, timeout=0.0),
    "sleep": StepKind("sleep", {"seconds": Field(number(0, 600), required=True)},
                      timeout=0.0, uses_device=False),
    "mkfs": StepKind("make a filesystem on the device",
                     {"device": _dev(), "fs": Field(choice("ext4", "ext2", "xfs"), "ext4")},
                     timeout=180.0),
    "mount": StepKind("mount the device's filesystem at /mnt/<device>",
                      {"device": _dev(), "options": Field(text(r"[A-Za-z0-9_,=.-]+", "mount options"))}),
    "write_files": StepKind("write files of random data and record their checksums",
                            {"device": _dev(), "count": Field(integer(1, 10000), 8),
                             "size": Field(size(1, 1 << 30), 1 << 20)}, timeout=300.0),
    "checksum": StepKind("re-read (caches dropped) the files write_files wrote: data verified",
                         {"device": _dev()}, timeout=300.0),
    "umount": StepKind("unmount the device's filesystem", {"device": _dev()}),
    "fsck": StepKind("check the filesystem read-only; it must be clean",
                     {"device": _dev(), "fs": Field(choice("ext4", "ext2", "xfs"), "ext4")},
                     timeout=180.0),
    "compare": StepKind("report fio IOPS/bandwidth of two jobs side by side (ratio a/b)",
                        {"jobs": Field(text_list, required=True, ref="job"),
                         "min_ratio": Field(number(0, 1000), None,
                                            doc="fail if jobs[0] reaches less than this x jobs[1]")},
                        timeout=10.0, uses_device=False),
    "module_reload": StepKind("modprobe -r ublk_drv, check it is gone, modprobe ublk_drv, check "
                              "/dev/ublk-control is back (no ublk device may exist)", {},
                              uses_device=False),
    "update_size": StepKind("UBLK_U_CMD_UPDATE_SIZE (Linux 6.14+): the device takes `size`",
                            {"device": _dev(), "size": Field(size(4096, 64 << 40), required=True)}),
    "quiesce": StepKind("UBLK_U_CMD_QUIESCE_DEV (Linux 6.15+; the device needs UBLK_F_QUIESCE): "
                        "QUIESCED within `within` seconds",
                        {"device": _dev(), "within": Field(number(1, 600), 10.0)}),
    "write_acked": StepKind("in the background until the next power_cut/reboot: write files on the "
                            "mounted device, each fsync()ed before it is recorded as acknowledged",
                            {"device": _dev(), "size": Field(size(512, 16 << 20), 64 << 10,
                                                             doc="bytes per file")}, timeout=30.0),
    "verify_acked": StepKind("after the cut: every file acknowledged before it reads back whole",
                             {"device": _dev()}, timeout=300.0),
    "power_cut": StepKind("kill QEMU mid-IO (no flush on the way down), boot the same disks again; "
                          "the next steps run in the new boot", {}, timeout=300.0,
                          uses_device=False),
    "reboot": StepKind("clean reboot; the next steps run in the new boot", {}, timeout=300.0,
                       uses_device=False),
    "partition_rescan": StepKind("re-read the partition table in a loop while AIO reads whose file "
                                 "was closed mid-flight complete: the device's last fput lands on "
                                 "the server's completion",
                                 {"device": _dev(), "seconds": Field(number(1, 600), 20.0)}),
    "shell": StepKind("run a shell command in the guest (escape hatch)",
                      {"run": Field(text(what="a shell command"), required=True),
                       "expect_status": Field(integer(0, 255), 0)}, uses_device=False),
}
COMMON_STEP = {
    "do": Field(choice(*STEPS), required=True),
    "timeout": Field(number(0.1, 7200), None, doc="per-step deadline in seconds"),
}


def default_timeout(kind: str, args: dict) -> float:
    """Per-step deadline when the file gives none: generous, yet a hang is caught in minutes."""
    spec = STEPS[kind]
    if kind == "fio":
        return args["runtime"] + 120.0 if args["runtime"] else 600.0
    if kind == "wait_state":
        return args["within"] + 15.0
    if kind == "sleep":
        return args["seconds"] + 10.0
    if kind == "partition_rescan":
        return args["seconds"] + 60.0
    if kind == "wait":
        return 600.0
    return spec.timeout
