"""`python -m bench.profile`: the server's CPU per IO and its perf profiles, several variants of the
server in one guest session (interleaved with null_blk, so a busy host hits all alike), on the
flavour's `profile` image (vm/image.py: linux-perf, kernel symbols visible).

    python -m bench.profile --flavour backports [--variants default,coop] [--preempt lazy,full]
                            [--repeats 3] [--runtime 3] [--no-perf] [--results DIR]

A variant is a ublk device of its own whose server runs with UBDSRV_RING_FLAGS set (VARIANTS below).
The run folder gets results.json, summary.txt, fio/ and perf/ (perf.data and text reports)."""
import argparse
import json
import sys
from pathlib import Path

from vm import device, options
from vm.cli_guard import guarded
from vm.errors import BenchError
from vm.guest import Guest
from ubdsrv import uring

from bench import cases, runner
from . import summary

HERE = Path(__file__).parent
GUEST_DIR = "/var/tmp/ubd-profile"   # on the root ext4: the guest's /tmp is a RAM-sized tmpfs

_SUBMIT_ALL, _COOP = uring.IORING_SETUP_SUBMIT_ALL, uring.IORING_SETUP_COOP_TASKRUN
_DEFER = uring.IORING_SETUP_SINGLE_ISSUER | uring.IORING_SETUP_DEFER_TASKRUN
_TASKRUN_FLAG = 1 << 9   # IORING_SETUP_TASKRUN_FLAG
# name -> UBDSRV_RING_FLAGS of the queue rings (None: the server's own choice)
VARIANTS = {
    "default": None,
    "defer": _SUBMIT_ALL | _COOP | _DEFER,
    "coop": _SUBMIT_ALL | _COOP,
    "coopflag": _SUBMIT_ALL | _COOP | _TASKRUN_FLAG,
    "plain": _SUBMIT_ALL,
}
# The C reference: the kernel selftests' kublk, as the selftests build makes it (one process, its
# queues are threads named after it). Same device shape as ours.
KUBLK = "kublk"
KUBLK_GLOB = "selftests/*/install/ublk/kublk"   # under the bench's cache
PERF_EVENTS = ["task-clock", "context-switches", "cpu-migrations", "page-faults",
               "raw_syscalls:sys_enter", "syscalls:sys_enter_io_uring_enter",
               "io_uring:io_uring_task_add", "io_uring:io_uring_task_work_run",
               "io_uring:io_uring_local_work_run", "io_uring:io_uring_complete",
               "sched:sched_switch", "sched:sched_wakeup", "irq:softirq_entry", "irq:irq_handler_entry",
               "irq_vectors:call_function_single_entry", "irq_vectors:reschedule_entry"]


def _note(msg):
    print(msg, file=sys.stderr, flush=True)


def _case():
    """The bench's optimisation target on the null pair: 4k randread, io_uring, 2 queues, qd 64."""
    return cases.BenchCase(target="null", workload="randread-4k", engine="io_uring", queues=2, iodepth=64)


def plan(a) -> dict:
    case = _case()
    variants = []
    for name in a.variants:
        if name == KUBLK:
            d = runner.ubd_device("null", case.queues)
            variants.append({"name": name, "comm": "kublk",
                             "add": f"{GUEST_DIR}/kublk add -t null -n {{id}} -q {d.queues} -d {d.depth}",
                             "delete": f"{GUEST_DIR}/kublk del -a"})
            continue
        flags = VARIANTS[name]
        variants.append({"name": name, "env": {} if flags is None else {"UBDSRV_RING_FLAGS": hex(flags)}})
    return {
        "fio": cases.fio_args(case, "{dev}", "{out}", a.runtime, a.ramp),
        "null_blk": runner.null_blk_params(case.queues),
        "ublk_add": device.add_command(runner.ubd_device("null", case.queues)).replace(
            f"-n {runner.UBD_ID['null']}", "-n {id}"),
        "variants": variants, "preempt": a.preempt, "repeats": a.repeats, "runtime": a.runtime,
        "perf_events": None if a.no_perf else PERF_EVENTS, "perf_seconds": a.perf_seconds,
        "perf_delay": a.ramp + 1.0, "perf_freq": a.perf_freq,
    }


def _names(text, known, what):
    out = [n for n in text.split(",") if n]
    bad = [n for n in out if known is not None and n not in known]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"unknown {what} {bad or text!r} (known: {', '.join(known)})")
    return out


def _parser():
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=["default"], metavar="A,B",
                   type=lambda t: _names(t, (*VARIANTS, KUBLK), "variant"),
                   help=f"of {', '.join(VARIANTS)}, {KUBLK} (the selftests' C server, if built)")
    p.add_argument("--preempt", default=[], metavar="A,B",
                   type=lambda t: _names(t, ("none", "voluntary", "full", "lazy"), "preemption mode"),
                   help="preemption modes to cycle through at run time (default: the boot's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--runtime", type=float, default=3.0)
    p.add_argument("--ramp", type=float, default=0.5)
    p.add_argument("--no-perf", action="store_true", help="timings only")
    p.add_argument("--perf-seconds", type=float, default=3.0)
    p.add_argument("--perf-freq", type=int, default=2000, help="perf record's sampling rate (Hz)")
    p.add_argument("--append", default="", help="extra kernel command line (e.g. mitigations=off)")
    options.add_arguments(p)
    return p


def _kublk() -> Path:
    from vm.paths import cache_dir
    found = sorted(cache_dir().glob(KUBLK_GLOB), key=lambda p: p.stat().st_mtime)
    if not found:
        raise BenchError(f"variant {KUBLK}: no kublk built under {cache_dir()}/{KUBLK_GLOB} "
                         "(the kernel selftests' build makes it)")
    return found[-1]


def run(a) -> int:
    run_dir = options.run_dir(a, "profile-")
    run_dir.mkdir(parents=True, exist_ok=True)
    pl = plan(a)
    a.profile_image = True
    opts = options.guest_options(a, run_dir=run_dir, log=_note, append=a.append)
    with Guest(opts) as g:
        _note(f"profile: guest ready in {g.boot_seconds:.1f} s ({g.accel}); results in {run_dir}")
        g.exec(f"rm -rf {GUEST_DIR}; mkdir -p {GUEST_DIR}", check=True)
        g.push(HERE / "guest_run.py", f"{GUEST_DIR}/guest_run.py")
        if KUBLK in a.variants:
            g.push(_kublk(), f"{GUEST_DIR}/kublk")
        (run_dir / "plan.json").write_text(json.dumps(pl, indent=1))
        g.push(run_dir / "plan.json", f"{GUEST_DIR}/plan.json")
        r = g.exec(f"cd {GUEST_DIR} && python3 guest_run.py plan.json out", timeout=3600,
                   on_stdout=lambda d: _note(d.decode(errors="replace").rstrip()))
        g.exec(f"tar -C {GUEST_DIR} -czf {GUEST_DIR}/out.tgz out", timeout=300, check=True)
        g.pull(f"{GUEST_DIR}/out.tgz", run_dir / "out.tgz")
        if r.status:
            raise BenchError(f"guest_run failed ({r.status}): {r.stderr.strip()[-1500:]}")
    import tarfile
    with tarfile.open(run_dir / "out.tgz") as t:
        t.extractall(run_dir, filter="data")
    return report(run_dir / "out")


def report(out: Path) -> int:
    doc = json.loads((out / "results.json").read_text())
    events = (doc["info"]["plan"].get("perf_events") or [])
    for key, p in doc.get("perf", {}).items():
        csv = out / "perf" / f"{key}.stat.csv"
        if csv.is_file():
            p["stat_counts"] = summary.parse_stat_csv(csv.read_text(), events)
    text = summary.table(doc)
    (out.parent / "summary.txt").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    return guarded(lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
