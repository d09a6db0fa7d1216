"""`python -m vm.scenario run NAME... | run | run-all | check NAME...` (just run / just run-all)."""
import argparse
import sys
import time

from .. import options
from ..errors import BenchError
from . import catalog, loader, report
from .errors import SETUP
from .progress import Progress
from .runner import RunOptions, Runner


def _err(msg):
    print(msg, file=sys.stderr, flush=True)


def load_cases(names) -> list:
    """Every case the names select, all validated before anything boots (ScenarioError: exit 2)."""
    cases = []
    for name in names:
        path, variant = catalog.resolve(name)
        found = loader.load(path)
        if variant is not None:
            found = [c for c in found if c.variant_id == variant]
            if not found:
                ids = ", ".join(c.id for c in loader.load(path))
                raise BenchError(f"{name}: no such variant; {path.stem} has: {ids}")
        cases += found
    return cases


def list_scenarios() -> int:
    rows = [(p.stem, catalog.describe(p)) for p in catalog.shipped()]
    width = max((len(n) for n, _ in rows), default=0)
    print("scenarios (run one with: just run NAME):")
    for name, desc in rows:
        print(f"  {name:<{width}}  {desc}")
    return 0


def run_cases(cases, a) -> int:
    run_dir = options.run_dir(a, "")
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    opts = RunOptions(guest=options.values(a), keep=a.keep)
    runner = Runner(opts, run_dir, progress)
    planned = [(c, r if a.repeat > 1 else None) for c in cases for r in range(1, a.repeat + 1)]
    results, t0 = [], time.monotonic()
    progress.note(f"running {len(planned)} case(s); results in {run_dir}")
    try:
        for i, (case, rep) in enumerate(planned, 1):
            res = runner.run_case(case, i, len(planned), rep)
            results.append(res)
            if res.kind == SETUP and not res.steps:
                progress.note("the guest could not be started: stopping the run")
                break
            if runner.stop_requested:
                return _finish(runner, results, run_dir, a, t0, interrupted=True)
    except KeyboardInterrupt:
        progress.note("interrupted: stopping the guest")
        return _finish(runner, results, run_dir, a, t0, interrupted=True)
    return _finish(runner, results, run_dir, a, t0)


def _finish(runner, results, run_dir, a, t0, interrupted=False) -> int:
    runner.close()
    meta = {"flavour": a.flavour, "kernel_tree": str(a.kernel_tree or ""), "debug_kernel": a.kernel_debug,
            "accel": runner.pool.accel_used or a.accel, "argv": sys.argv[1:],
            "wall_seconds": round(time.monotonic() - t0, 1), "interrupted": interrupted}
    report.write_json(run_dir, results, meta)
    report.write_junit(run_dir, results)
    if results:
        print(report.summary(results, run_dir))
    print(f"wall time {time.monotonic() - t0:.1f} s")
    return 130 if interrupted else report.exit_status(results)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vm.scenario",
                                description="Run fault scenarios against ublk_drv in a guest.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        options.add_arguments(sp)   # --results DIR: the run folder (default results/<time>/)
        sp.add_argument("--repeat", type=int, default=1, metavar="N", help="run every case N times")
        sp.add_argument("--keep", action="store_true",
                        help="after a failure keep the guest up and print the ssh command")
    run = sub.add_parser("run", help="run the named scenarios; without a name, list them")
    run.add_argument("names", nargs="*", metavar="NAME",
                     help="kill_daemon, scenario/kill_daemon, scenarios/kill_daemon.toml, "
                          "a path to a .toml file; NAME[param=value] picks one variant")
    common(run)
    run_all = sub.add_parser("run-all", help="run every shipped scenario (the nightly ones with "
                                             "--nightly)")
    common(run_all)
    run_all.add_argument("--nightly", action="store_true",
                         help="also the long scenarios (nightly = true in their file)")
    check = sub.add_parser("check", help="validate scenario files without running them")
    check.add_argument("names", nargs="*", metavar="NAME")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.cmd == "check":
            names = a.names or [str(x) for x in catalog.shipped()]
            cases = load_cases(names)
            print(f"ok: {len(names)} file(s), {len(cases)} case(s)")
            for c in cases:
                print(f"  {c.id}  ({c.loops} loop(s), {len(c.steps)} steps)")
            return 0
        if a.cmd == "run" and not a.names:
            return list_scenarios()
        if a.repeat < 1:
            raise BenchError("--repeat must be at least 1")
        names = a.names if a.cmd == "run" else [str(x) for x in catalog.shipped()]
        cases = load_cases(names)
        if a.cmd == "run-all" and not a.nightly:
            skipped = sorted({c.scenario for c in cases if c.nightly})
            cases = [c for c in cases if not c.nightly]
            if skipped:
                _err(f"run-all: leaving out the nightly scenarios ({', '.join(skipped)}); "
                     "--nightly runs them too")
        return run_cases(cases, a)
    except BenchError as e:
        _err(f"error: {e}")
        return e.exit_status
