"""fault: a null or loop device (`--base`) that misbehaves on purpose, for testing what sits above it
and the driver's handling of a bad server (like the kernel selftests' fault_inject target).

    --delay_us N         every request completes N microseconds late: an IORING_OP_TIMEOUT per
                         request, so the other tags keep flowing while one waits
    --error_rate P       a request fails with --errno with probability P; the draw is a hash of
                         (--seed, start sector), so the same request fails the same way every run
    --error_sectors A-B  a request touching sectors A..B (inclusive; a list: A-B,C-D) fails
    --error_ops          which requests may fail: read, write (WRITE, WRITE_ZEROES), any (also
                         FLUSH, DISCARD)
    --fail_after_ios N   no fault (error, stuck tag) before a queue has seen N requests (mkfs and
                         mount first; and 6.12 reads the partition table inside START_DEV)
    --fail_after_secs T  ... nor before the server has run T seconds
    --stuck_tag T        the first request on tag T (of each queue) once faults are on is never
                         completed
    --die_during_fetch N the server kills itself (SIGKILL, daemon and queues) once queue 0 has
                         submitted N of its first FETCH commands: `add` must fail cleanly

Every request reaches queue_io (neither of the queue's shortcuts applies), so a fault device is slower
than its base; that is the price of deciding per request."""
import ctypes
import errno as errno_mod
import os
import signal
import time

from .. import uapi
from ..uring import IORING_OP_TIMEOUT
from .base import QUEUED, Option, Target, TargetError, target_op
from .loop import LoopTarget
from .null import NullTarget

BASES = {t.name: t for t in (NullTarget, LoopTarget)}
OP_DELAY = 0xFE          # user_data op of a request's delay timer (base ops are 0..5)
ERROR_OPS = {
    "read": frozenset({uapi.UBLK_IO_OP_READ}),
    "write": frozenset({uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_WRITE_SAME, uapi.UBLK_IO_OP_WRITE_ZEROES}),
    "any": None,
}
_M64 = (1 << 64) - 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


def _unit(seed, sector):
    """A number in [0, 1) fixed by (seed, sector): splitmix64 of both."""
    x = (seed * 0x9E3779B97F4A7C15 ^ sector) & _M64
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) / 2.0 ** 64


def parse_sector_ranges(text, opt="--error_sectors"):
    """`A-B,C-D` (or `A`) -> [[A, B], [C, D]], inclusive sector ranges."""
    out = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a = int(lo, 10)
            b = int(hi, 10) if dash else a
        except ValueError:
            raise TargetError(f"{opt} {text}: expected sector ranges like 2048-4095,8192-8199") from None
        if a < 0 or b < a:
            raise TargetError(f"{opt} {text}: {part!r} is not a range of sectors (0 <= A <= B)")
        out.append([a, b])
    return out


def parse_errno(text, opt="--errno"):
    """`EIO`, `ENOSPC`, ... or a number -> the positive errno value."""
    if text.isdigit():
        value = int(text)
    else:
        value = getattr(errno_mod, text.upper(), None) if text.upper().startswith("E") else None
    if not value or value <= 0 or value >= 4096:
        raise TargetError(f"{opt} {text}: expected an errno name such as EIO, ENOSPC, ENODATA")
    return value


class FaultTarget(Target):
    name = "fault"
    help = "null or loop (--base) with injected delays and errors, a stuck tag, a dying server"
    own_options = (
        Option("base", "", "choice", "null", "the device it is built on; takes that target's options",
               choices=tuple(BASES)),
        Option("delay_us", "", "int", 0, "complete every request N microseconds late", "N"),
        Option("error_rate", "", "float", 0.0, "fail requests with probability P (0..1)", "P"),
        Option("seed", "", "int", 0, "seed of --error_rate (the draw is a hash of seed and sector)", "N"),
        Option("error_sectors", "", "str", "", "fail requests touching these sectors (inclusive)",
               "A-B[,C-D]"),
        Option("errno", "", "str", "EIO", "the error injected requests fail with", "ENAME"),
        Option("error_ops", "", "choice", "any", "which requests may fail", choices=tuple(ERROR_OPS)),
        Option("fail_after_ios", "", "int", 0, "no fault (error, stuck tag) before a queue saw N requests",
               "N"),
        Option("fail_after_secs", "", "float", 0.0, "no fault before the server ran T seconds", "T"),
        Option("stuck_tag", "", "int", None, "never complete the first request on tag T (once faults "
               "are on)", "T"),
        Option("die_during_fetch", "", "int", None,
               "SIGKILL the server after queue 0 submitted N FETCH commands", "N"),
    )
    options = own_options + tuple(o for b in BASES.values() for o in b.options)

    @classmethod
    def spec_from_options(cls, values, given):
        base = BASES[values["base"]]
        mine = {o.name for o in base.options}
        for other in BASES.values():
            for o in other.options:
                if o.name in given and o.name not in mine:
                    raise TargetError(f"{given[o.name]}: an option of --base {other.name}, "
                                      f"not of --base {base.name}")
        base_spec = base.spec_from_options({n: values[n] for n in mine},
                                           {n: w for n, w in given.items() if n in mine})

        def at_least(name, lo):
            v = values[name]
            if v is not None and v < lo:
                raise TargetError(f"--{name} {v}: expected a value >= {lo}")
            return v

        spec = {"name": cls.name, "base": base_spec, "dev_size": base_spec["dev_size"],
                "delay_us": at_least("delay_us", 0), "seed": values["seed"],
                "fail_after_ios": at_least("fail_after_ios", 0),
                "fail_after_secs": at_least("fail_after_secs", 0),
                "stuck_tag": at_least("stuck_tag", 0), "die_during_fetch": at_least("die_during_fetch", 0),
                "error_rate": values["error_rate"], "error_ops": values["error_ops"],
                "error_sectors": parse_sector_ranges(values["error_sectors"])
                if values["error_sectors"] else [],
                "errno": parse_errno(values["errno"])}
        if not 0.0 <= spec["error_rate"] <= 1.0:
            raise TargetError(f"--error_rate {spec['error_rate']}: expected a probability, 0 to 1")
        if not (spec["error_rate"] or spec["error_sectors"]):
            shaping = [given[n] for n in ("errno", "error_ops", "seed") if n in given]
            if spec["stuck_tag"] is None:
                shaping += [given[n] for n in ("fail_after_ios", "fail_after_secs") if n in given]
            if shaping:
                raise TargetError(f"{', '.join(shaping)}: shape injected errors, but neither "
                                  f"--error_rate nor --error_sectors injects any")
        return spec

    @classmethod
    def usage(cls):
        lines = [f"  -t {cls.name}: {cls.help}"]
        for o in cls.own_options:
            lines.append(f"\t{o.usage():<26} {o.help}{o.default_text()}")
        lines.append("\tand the options of its --base (see -t null, -t loop)")
        return lines

    def __init__(self, spec):
        super().__init__(spec)
        self.base = BASES[spec["base"]["name"]](spec["base"])

    def params(self, info):
        return self.base.params(info)

    def describe(self):
        s = self.spec
        d = {"name": self.name, "type": 0, "dev_size": self.dev_size(), "base": self.base.describe()}
        keys = ["delay_us", "stuck_tag", "die_during_fetch"]
        if s["error_rate"] or s["error_sectors"]:
            keys += ["error_rate", "seed", "error_sectors", "errno", "error_ops"]
        if s["error_rate"] or s["error_sectors"] or s["stuck_tag"] is not None:
            keys += ["fail_after_ios", "fail_after_secs"]
        d.update((k, s[k]) for k in keys if s[k] not in (None, 0, 0.0, []))
        return d

    # ---- daemon side ----
    def open(self, log=None):
        self.base.open(log)     # its shortcuts stay unused: every request comes to queue_io

    def close(self):
        self.base.close()

    def attach(self, q):
        super().attach(q)
        self.base.attach(q)
        s = self.spec
        self.ios = 0
        self.t0 = time.monotonic()
        self.stuck = s["stuck_tag"]
        self.delay_us = s["delay_us"]
        self.ts = _Timespec(self.delay_us // 1000000, self.delay_us % 1000000 * 1000)
        self.ts_addr = ctypes.addressof(self.ts)   # read by the kernel when the timeout SQE is submitted
        self.errno = s["errno"]
        self.ops = ERROR_OPS[s["error_ops"]]
        self.sectors = s["error_sectors"]
        self.rate = s["error_rate"]
        self.inject = bool(self.rate or self.sectors)
        if s["die_during_fetch"] is not None and q.q_id == 0:
            self.pre_fetch = self._die_during_fetch

    def _die_during_fetch(self, q, tag):
        if tag != self.spec["die_during_fetch"]:
            return
        q.ring.submit()        # the driver now holds exactly `tag` FETCH commands of this queue
        q.log(f"fault: queue {q.q_id} submitted {tag} FETCH commands; killing the server "
              f"(--die_during_fetch {tag})")
        os.kill(os.getppid(), signal.SIGKILL)    # the daemon; the queues die with it (PDEATHSIG)
        os.kill(os.getpid(), signal.SIGKILL)

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        self.ios += 1
        if tag == self.stuck and self._armed():
            self.stuck = None
            self.q.log(f"fault: queue {self.q.q_id} tag {tag}: holding the request (sector "
                       f"{start_sector}, {nr_sectors} sectors) forever (--stuck_tag)")
            return QUEUED
        if self.delay_us:
            self.q.prep_target(tag, OP_DELAY, IORING_OP_TIMEOUT, -1, 0, self.ts_addr, 1)
            return QUEUED
        return self._serve(tag, op_flags, nr_sectors, start_sector)

    def io_done(self, tag, res, user_data):
        if target_op(user_data) == OP_DELAY:    # res -ETIME: the delay is over
            return self._serve(tag, *self.request(tag))
        return self.base.io_done(tag, res, user_data)

    def _serve(self, tag, op_flags, nr_sectors, start_sector):
        if self.inject and self._fails(op_flags & 0xFF, nr_sectors, start_sector):
            return -self.errno
        return self.base.queue_io(tag, op_flags, nr_sectors, start_sector)

    def _armed(self):
        """Faults are on: the queue has seen more than --fail_after_ios requests and the server has
        run --fail_after_secs seconds."""
        return (self.ios > self.spec["fail_after_ios"]
                and time.monotonic() - self.t0 >= self.spec["fail_after_secs"])

    def _fails(self, op, nr_sectors, start_sector):
        if self.ops is not None and op not in self.ops:
            return False
        if not self._armed():
            return False
        end = start_sector + nr_sectors
        for a, b in self.sectors:
            if start_sector <= b and end > a:
                return True
        return bool(self.rate) and _unit(self.spec["seed"], start_sector) < self.rate
