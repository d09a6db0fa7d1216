"""`python -m vm.scenario run NAME... | run | run-all | run-matrix [NAME...] | check NAME...`
(just run / run-all / run-matrix)."""
import argparse
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import flavours, options
from ..cli_guard import raise_interrupt
from ..errors import BenchError
from . import baseline, catalog, kernel_info, loader, matrix, report, shard, target as remote
from .errors import SETUP
from .parallel import Workers
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


def select_cases(a) -> list:
    """The cases a run/run-all/run-matrix command line names, less the nightly ones (unless
    --nightly) and the other shards' (--shard I/N)."""
    everything = a.cmd == "run-all" or (a.cmd == "run-matrix" and not a.names)
    names = [str(x) for x in catalog.shipped()] if everything else a.names
    cases = load_cases(names)
    if everything and not a.nightly:
        skipped = sorted({c.scenario for c in cases if c.nightly})
        cases = [c for c in cases if not c.nightly]
        if skipped:
            _err(f"{a.cmd}: leaving out the nightly scenarios ({', '.join(skipped)}); "
                 "--nightly runs them too")
    if a.shard:
        picked = shard.select(cases, a.shard)
        _err(f"--shard {a.shard[0]}/{a.shard[1]}: {len(picked)} of {len(cases)} case(s)")
        cases = picked
    return cases


def list_scenarios() -> int:
    rows = [(p.stem, catalog.describe(p)) for p in catalog.shipped()]
    width = max((len(n) for n, _ in rows), default=0)
    print("scenarios (run one with: just run NAME):")
    for name, desc in rows:
        print(f"  {name:<{width}}  {desc}")
    return 0


@dataclass
class Target:
    """One kernel a run covers: a column of the matrix."""
    label: str            # the column's folder: the flavour's name, or "tree"
    guest: dict           # GuestOptions fields (vm/options.py)
    baseline: str = None  # kernel/baselines/<name>.toml; none for a kernel built from a tree


def targets(a) -> list:
    """The kernels of a run: one (the options as given), or for `run-matrix` and `--flavour all`
    every flavour of kernel/flavours.toml, plus the --kernel-tree (on the default flavour's root)."""
    base = {o.dest: getattr(a, o.dest) for o in options.GUEST if o.guest}
    if a.target:   # the machine's own kernel: no flavour, no baseline
        return [Target("target", dict(base, flavour="target", kernel_tree=None, kernel_debug=False))]
    if a.cmd != "run-matrix" and a.flavour != options.ALL_FLAVOURS:
        return [Target(a.flavour, base, None if a.kernel_tree else a.flavour)]
    out = [Target(f, dict(base, flavour=f, kernel_tree=None, kernel_debug=False), f)
           for f in options.flavours_of(a)]
    if a.kernel_tree:
        flavour = flavours.DEFAULT if a.flavour == options.ALL_FLAVOURS else a.flavour
        out.append(Target("tree", dict(base, flavour=flavour)))
    return out


def run_cases(cases, a) -> int:
    run_dir = options.run_dir(a, "")
    run_dir.mkdir(parents=True, exist_ok=True)
    kernels = targets(a)
    if len(kernels) == 1 and a.cmd != "run-matrix":
        return run_target(cases, a, kernels[0], run_dir)
    statuses = []
    for t in kernels:
        print(f"\n=== {t.label}: {len(cases)} case(s) in {run_dir / t.label}", flush=True)
        statuses.append(run_target(cases, a, t, run_dir / t.label))
        if statuses[-1] == 130:
            break
    print(f"\nscenario x kernel ({run_dir / 'table.txt'}, combined {run_dir / 'result.json'}):")
    worst = matrix.merge([run_dir / t.label for t in kernels[:len(statuses)]], run_dir)
    return 130 if 130 in statuses else max([worst] + statuses)


def run_target(cases, a, target: Target, run_dir: Path) -> int:
    """Runs the cases on one kernel (in a.jobs guests at once); writes result.json and junit.xml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    planned = [(c, r if a.repeat > 1 else None) for c in cases for r in range(1, a.repeat + 1)]
    runners, t0 = [], time.monotonic()
    machine = None
    if a.target:   # connected (host key checked, machine checked) before any case: exit 2 if not
        machine = remote.RemoteMachine(a.target, run_dir, a.known_hosts, a.target_identity)
        machine.connect()

    def make_runner(k=None):
        parallel_run = a.jobs > 1
        opts = RunOptions(guest=target.guest, keep=a.keep, target=machine,
                          guest_prefix=f"w{k}-" if parallel_run else "")
        # several cases at once: plain lines, each naming its case, instead of one live display
        runners.append(Runner(opts, run_dir, Progress(live=False) if parallel_run else Progress()))
        return runners[-1]

    Progress().note(f"running {len(planned)} case(s)" +
                    (f" in {a.jobs} guests at once" if a.jobs > 1 else "") + f"; results in {run_dir}")
    results, interrupted = [], False
    if a.jobs > 1:
        workers = Workers(make_runner, a.jobs)
        try:
            results = [r for _, r in workers.run(planned)]
        except KeyboardInterrupt:
            print("interrupted: every guest stopped", file=sys.stderr, flush=True)
            results, interrupted = [r for _, r in sorted(workers.done, key=lambda x: x[0])], True
        interrupted = interrupted or any(r.stop_requested for r in runners)
    else:
        results, interrupted = _run_in_turn(make_runner(), planned)
    return _finish(runners, results, run_dir, a, target, t0, interrupted)


def _run_in_turn(runner, planned) -> tuple:
    """One guest, case after case: (results, interrupted)."""
    results = []
    try:
        for i, (case, rep) in enumerate(planned, 1):
            res = runner.run_case(case, i, len(planned), rep)
            results.append(res)
            if res.kind == SETUP and not res.steps:
                runner.progress.note("the guest could not be started: stopping the run")
                break
            if runner.stop_requested:
                return results, True
    except KeyboardInterrupt:
        runner.progress.note("interrupted: stopping the guest")
        return results, True
    finally:
        runner.close()
    return results, False


def _finish(runners, results, run_dir, a, target, t0, interrupted=False) -> int:
    for r in runners:
        r.close()
    pools = [r.pool for r in runners]
    accel = next((p.accel_used for p in pools if p.accel_used), None) or target.guest["accel"]
    release = next((p.kernel_release for p in pools if p.kernel_release), "")
    kernel = kernel_info.describe(target.guest, release, accel)
    known = baseline.load(target.baseline) if target.baseline else baseline.Baseline(None, {})
    baseline.apply(results, known)
    meta = {"flavour": target.guest["flavour"], "kernel_tree": str(target.guest["kernel_tree"] or ""),
            "debug_kernel": target.guest["kernel_debug"], "accel": accel, "kernel": kernel,
            "baseline": str(known.path or ""), "jobs": a.jobs,
            "shard": f"{a.shard[0]}/{a.shard[1]}" if a.shard else "", "argv": sys.argv[1:],
            "target": a.target.text if getattr(a, "target", None) else "",
            "wall_seconds": round(time.monotonic() - t0, 1), "interrupted": interrupted}
    report.write_json(run_dir, results, meta)
    report.write_junit(run_dir, results, kernel=kernel)
    if results:
        print(report.summary(results, run_dir, kernel, known.known))
    else:
        print(f"no case to run on {kernel_info.line(kernel)}; results in {run_dir}")
    print(f"wall time {time.monotonic() - t0:.1f} s")
    if a.update_baseline and not interrupted:
        if target.baseline:
            print(f"baseline written: {baseline.write(results, known)}")
        else:
            _err("--update-baseline: a kernel built from a tree has no baseline; nothing written")
    return 130 if interrupted else report.exit_status(results)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vm.scenario",
                                description="Run fault scenarios against ublk_drv in a guest.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        options.add_arguments(sp)   # --results DIR: the run folder (default results/<time>/)
        sp.add_argument("--repeat", type=int, default=1, metavar="N", help="run every case N times")
        sp.add_argument("--keep", action="store_true",
                        help="after a failure keep the guest up and print the ssh command (-j 1 only)")
        options.add_run_arguments(sp)   # -j N, --shard I/N
        sp.add_argument("--update-baseline", action="store_true",
                        help="write kernel/baselines/<flavour>.toml from this run's failures "
                             "(reasons already written are kept)")
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
    mx = sub.add_parser("run-matrix", help="run scenarios (default: every shipped one) on every "
                                           "flavour, plus --kernel-tree, and print one table")
    mx.add_argument("names", nargs="*", metavar="NAME", help="as for run; none: as run-all")
    common(mx)
    mx.add_argument("--nightly", action="store_true", help="with no NAME: the nightly scenarios too")
    mx.set_defaults(flavour=options.ALL_FLAVOURS)
    check = sub.add_parser("check", help="validate scenario files without running them")
    check.add_argument("names", nargs="*", metavar="NAME")
    return p


def check_target(a):
    """--target runs on one machine with its own kernel: what needs several, or other kernels, is
    refused before anything starts."""
    if not a.target:
        return
    clash = ("-j N (one machine is one machine)" if a.jobs > 1 else
             "run-matrix (one kernel: the machine's)" if a.cmd == "run-matrix" else
             "--flavour all (one kernel: the machine's)" if a.flavour == options.ALL_FLAVOURS else
             "--kernel-tree (the machine boots its own kernel)" if a.kernel_tree else
             "--update-baseline (baselines are the flavours')" if a.update_baseline else "")
    if clash:
        raise BenchError(f"--target {a.target.text}: not with {clash}")


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, raise_interrupt)   # unwinds like Ctrl-C: every guest is stopped
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
        if a.keep and a.jobs > 1:
            raise BenchError("--keep holds one failed guest for you to log in: use it with -j 1")
        check_target(a)
        return run_cases(select_cases(a), a)
    except BenchError as e:
        _err(f"error: {e}")
        return e.exit_status
