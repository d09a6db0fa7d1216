"""The case matrix: which fio workloads run on which device pairs, and the fio command line for each.

A *case* is one fio workload on one device pair: the Python server (`ubd`) against the kernel driver it
imitates (`kernel`): ubd null vs null_blk, ubd loop vs the kernel loop driver (`--direct-io=on`) over
the same backing file. Every case runs on both sides, `repeats` times, interleaved (ubd, kernel,
kernel, ubd, ...) so that drift of a busy TCG host hits both sides alike; the report takes the median.

`queues` is the device's hardware queue count (ubd `-q`, null_blk `submit_queues`) and also fio's
`numjobs`: blk-mq maps each CPU to one hardware queue, so a single submitting job would exercise only
one queue. `iodepth` is per job. The kernel loop driver has one queue whatever `queues` says.

Presets (see bench/README.md for the time budget behind them):
- quick: the optimisation target (4k randread, iodepth 64, 2 queues) on both pairs and both engines,
  and with io_uring through USER_COPY (`usercopy`: the server's device added with `--usercopy`).
- full: one-factor-at-a-time around a baseline (io_uring, 2 queues, iodepth 32) instead of the whole
  cross product, which would need ~1000 fio runs (hours under TCG):
    * every workload (4k randread/randwrite/randrw, 64k and 512k sequential read/write) at the baseline
    * 4k randread at iodepth 1 and 128 (io_uring, 2 queues)
    * 4k randread with 1 queue at iodepth 1 and 32 (io_uring)
    * 4k randread with libaio at iodepth 32 (2 queues)
    * the optimisation target, 4k randread iodepth 64 2 queues, with io_uring and libaio, and with
      io_uring through USER_COPY
  on both pairs (null and loop): 15 cases per pair, 30 cases, 60 measurements x 3 repeats = 180 fio
  runs of 0.5 + 2 s; each costs ~3.6 s in the guest (fio starts in ~1 s under TCG): ~11 min in all.
- profile: the optimisation target on one pair, once, with the server under cProfile.
"""
from dataclasses import asdict, dataclass

TARGETS = ("null", "loop")
ENGINES = ("io_uring", "libaio")

# name -> (fio rw, block size, extra fio options)
WORKLOADS = {
    "randread-4k": ("randread", "4k", {}),
    "randwrite-4k": ("randwrite", "4k", {}),
    "randrw-4k": ("randrw", "4k", {"rwmixread": "50"}),
    "read-64k": ("read", "64k", {}),
    "write-64k": ("write", "64k", {}),
    "read-512k": ("read", "512k", {}),
    "write-512k": ("write", "512k", {}),
}


@dataclass(frozen=True)
class BenchCase:
    target: str      # "null" or "loop"
    workload: str    # a key of WORKLOADS
    engine: str      # "io_uring" or "libaio"
    queues: int
    iodepth: int
    usercopy: bool = False   # the server's device with UBLK_F_USER_COPY (the kernel side is the same)

    @property
    def id(self) -> str:
        return f"{self.target}-{self.workload}-{self.engine}-q{self.queues}-d{self.iodepth}" + \
            ("-usercopy" if self.usercopy else "")

    @property
    def label(self) -> str:
        return f"{self.target} {self.workload} {self.engine} q{self.queues} d{self.iodepth}" + \
            (" usercopy" if self.usercopy else "")

    def to_dict(self):
        return dict(asdict(self), id=self.id)

    @classmethod
    def from_dict(cls, d):
        return cls(d["target"], d["workload"], d["engine"], int(d["queues"]), int(d["iodepth"]),
                   bool(d.get("usercopy", False)))


@dataclass(frozen=True)
class Preset:
    name: str
    cases: tuple
    runtime: float   # seconds measured per fio run
    ramp: float      # seconds of warm-up before measuring
    repeats: int

    def runs(self) -> int:
        return len(self.cases) * 2 * self.repeats

    def estimate_seconds(self, per_run_overhead=1.1, per_phase=20.0, boot=25.0) -> float:
        """Rough wall time under TCG: fio's own time plus its start-up, device setup per phase, boot."""
        phases = len({c.queues for c in self.cases})
        return boot + phases * per_phase + self.runs() * (self.runtime + self.ramp + per_run_overhead)


def _unique(cases):
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return tuple(out)


def usercopy_cases():
    """The optimisation target through USER_COPY: against the same case by the mapped-buffer copy."""
    return tuple(BenchCase(t, "randread-4k", "io_uring", 2, 64, usercopy=True) for t in TARGETS)


def quick_cases():
    return _unique([*(BenchCase(t, "randread-4k", e, 2, 64) for t in TARGETS for e in ENGINES),
                    *usercopy_cases()])


def full_cases():
    out = []
    for t in TARGETS:
        out += [BenchCase(t, w, "io_uring", 2, 32) for w in WORKLOADS]
        out += [BenchCase(t, "randread-4k", "io_uring", 2, depth) for depth in (1, 128)]
        out += [BenchCase(t, "randread-4k", "io_uring", 1, depth) for depth in (1, 32)]
        out += [BenchCase(t, "randread-4k", "libaio", 2, 32)]
        out += [BenchCase(t, "randread-4k", e, 2, 64) for e in ENGINES]
    return _unique(out + list(usercopy_cases()))


def preset(name, runtime=None, ramp=None, repeats=None) -> Preset:
    if name == "quick":
        p = Preset("quick", quick_cases(), runtime=2.5, ramp=0.5, repeats=3)
    elif name == "full":
        p = Preset("full", full_cases(), runtime=2.0, ramp=0.5, repeats=3)
    elif name == "profile":
        p = Preset("profile", (BenchCase("loop", "randread-4k", "io_uring", 2, 64),), runtime=5.0,
                   ramp=0.5, repeats=1)
    else:
        raise ValueError(f"unknown preset {name!r}")
    return Preset(p.name, p.cases, runtime if runtime is not None else p.runtime,
                  ramp if ramp is not None else p.ramp, repeats if repeats is not None else p.repeats)


def fio_args(case: BenchCase, filename: str, output: str, runtime: float, ramp: float) -> list:
    """fio's argv for one measurement of case on filename, JSON written to output."""
    rw, bs, extra = WORKLOADS[case.workload]
    args = ["fio", "--name=bench", f"--filename={filename}", "--direct=1", f"--rw={rw}", f"--bs={bs}",
            f"--ioengine={case.engine}", f"--iodepth={case.iodepth}", f"--numjobs={case.queues}",
            "--group_reporting", "--time_based", f"--runtime={_secs(runtime)}",
            f"--ramp_time={_secs(ramp)}", "--randrepeat=0", "--norandommap", "--eta=never",
            "--output-format=json", f"--output={output}"]
    args += [f"--{k}={v}" for k, v in extra.items()]
    return args


def _secs(s: float) -> str:
    """fio takes plain numbers as seconds; fractions need a unit."""
    return f"{int(s)}" if float(s).is_integer() else f"{int(round(s * 1000))}ms"
