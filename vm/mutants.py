"""`python -m vm.mutants --kernel-tree DIR [--mutants DIR] [--scenarios NAME...]` (just mutants): the
bench scores itself against deliberately broken drivers.

Every mutant (kernel/mutants/*.patch, see vm/mutants_patch.py) is applied to a copy of the tree's
ublk_drv.c and built against the tree's kernel (vm/mutants_build.py); a guest boots the kernel with
that module and the scenarios run through the scenario engine until one fails: the mutant is killed
(by that case, with its verdict) or, if all pass, it survived. The unmutated driver runs first, built
the same way, as the control: if it fails, the bench itself is red and nothing is scored.

Everything is checked before anything is built: the tree, every mutant (its header, and that it
applies), every scenario name; a problem is exit status 2 with the name. A mutant that then does not
compile is reported as such and not counted. The run folder holds mutants.json, and per variant the
scenario engine's result.json and case folders (the evidence of a kill) plus the patched source and
its build log."""
import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import image, kernel_tree, mutants_build, options
from .cli_guard import guarded
from .errors import BenchError, SetupError
from .mutants_patch import check_applies, load_dir
from .paths import KERNEL_DIR
from .scenario import catalog, report
from .scenario.cli import load_cases
from .scenario.progress import Progress
from .scenario.runner import RunOptions, Runner

DEFAULT_MUTANTS = KERNEL_DIR / "mutants"
CONTROL = "control"
KILLED, SURVIVED, BUILD_FAILED = "killed", "survived", "build failed"
NO_GUEST = "no guest"   # the guest did not start: the bench's trouble, not the mutant's; not counted
# the guest options this command takes (vm/options.py); --results is the run folder
GUEST_OPTIONS = ("flavour", "accel", "cpus", "memory", "kernel_tree", "kernel_debug")


@dataclass
class Outcome:
    name: str
    status: str = ""          # KILLED, SURVIVED, BUILD_FAILED, NO_GUEST; control: passed / failed
    killed_by: str = ""       # the id of the case that failed
    verdict: str = ""         # its verdict kind (kernel splat, timeout, expectation failed, ...)
    message: str = ""
    seconds: float = 0.0      # build and scenarios
    cases_run: int = 0
    evidence: str = ""        # the failing case's folder, relative to the run folder
    build_log: str = ""


def order_cases(cases, expect) -> list:
    """The cases of the scenarios a mutant names in Expect first (in that order), then the rest in
    their order: a kill, if it comes, comes sooner. Any case that fails kills, expected or not."""
    rank = {name: i for i, name in enumerate(expect)}
    return sorted(cases, key=lambda c: rank.get(c.scenario, len(rank)))


def _hms(seconds) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class MutationRun:
    def __init__(self, a, mutants, cases, run_dir: Path):
        self.a, self.mutants, self.cases, self.run_dir = a, mutants, cases, run_dir
        self.tree = a.kernel_tree
        self.progress = Progress()
        self.t0 = time.monotonic()
        self.control = None
        self.outcomes = []
        self.tree_image = None

    def say(self, msg):
        self.progress.note(f"mutants [{_hms(time.monotonic() - self.t0)}] {msg}")

    # --- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        self.say(f"{len(self.mutants)} mutant(s), {len(self.cases)} case(s); run folder {self.run_dir}")
        base = image.ensure(self.a.flavour, log=self.say)
        self.tree_image = kernel_tree.ensure(self.tree, base, debug=self.a.kernel_debug, log=self.say)
        self.say(f"kernel {self.tree_image.kernel_release}: control run (the unmutated driver)")
        self.control = self.variant(None, CONTROL, self.cases)
        if self.control.status != "passed":
            self.say(f"the control failed ({self.control.killed_by}: {self.control.verdict}): the "
                     "bench is red on the unmutated driver, so no mutant can be scored")
            self.write()
            return 1
        for i, m in enumerate(self.mutants, 1):
            self.say(f"mutant {i}/{len(self.mutants)} {m.name}: {m.origin}")
            out = self.variant(m, m.name, order_cases(self.cases, m.expect))
            self.outcomes.append(out)
            self.say(f"mutant {i}/{len(self.mutants)} {m.name}: {out.status}"
                     + (f" by {out.killed_by} ({out.verdict})" if out.status == KILLED else "")
                     + f" in {out.seconds:.0f} s")
            self.write()
        print(self.table())
        self.write()
        return 0

    def variant(self, mutant, name, cases) -> Outcome:
        """Builds one variant and runs cases on it until one fails."""
        out, t0 = Outcome(name=name), time.monotonic()
        work = self.run_dir / name
        out.build_log = str(mutants_build.build_log(work).relative_to(self.run_dir))
        try:
            try:
                self.say(f"{name}: building ublk_drv.ko")
                img = mutants_build.build(self.tree, mutant, work, self.tree_image,
                                          self.a.kernel_debug, self.say)
            except SetupError as e:
                if mutant is None:
                    raise
                out.status, out.message = BUILD_FAILED, str(e).splitlines()[0]
                return out
            out.status = SURVIVED if mutant else "passed"
            results = self.scenarios(img, cases, work, out)
            meta = {"variant": name, "kernel_tree": str(self.tree),
                    "kernel_release": img.kernel_release, "mutant": mutant.to_json() if mutant else None}
            report.write_json(work, results, meta)
        finally:
            out.seconds = round(time.monotonic() - t0, 1)
            shutil.rmtree(work / "image", ignore_errors=True)   # rebuilt in seconds from work/src
        return out

    def scenarios(self, img, cases, work, out) -> list:
        guest = {**{k: getattr(self.a, k) for k in GUEST_OPTIONS}, "image": img}
        runner = Runner(RunOptions(guest=guest), work, self.progress)
        results = []
        try:
            for n, case in enumerate(cases, 1):
                res = runner.run_case(case, n, len(cases))
                results.append(res)
                out.cases_run = n
                if not res.passed:
                    if not res.guest:   # never got a guest: nothing of the driver ran
                        out.status = NO_GUEST
                    else:
                        out.status = KILLED if out.status == SURVIVED else "failed"
                    out.killed_by, out.verdict = res.id, res.kind
                    out.message = res.message.splitlines()[0] if res.message else ""
                    out.evidence = str((work / res.dir).relative_to(self.run_dir))
                    if out.status == "failed":
                        print(report.failure_text(res, str(work)))
                    break
        finally:
            runner.close()
        return results

    # --- reporting -------------------------------------------------------------------------------
    def score(self) -> dict:
        counted = [o for o in self.outcomes if o.status in (KILLED, SURVIVED)]
        killed = sum(o.status == KILLED for o in counted)
        return {"killed": killed, "counted": len(counted),
                "build_failed": sum(o.status == BUILD_FAILED for o in self.outcomes),
                "percent": round(100 * killed / len(counted), 1) if counted else None}

    def table(self) -> str:
        rows = [("mutant", "result", "killed by", "verdict", "seconds")]
        for o in self.outcomes:
            rows.append((o.name, o.status, o.killed_by or "-", o.verdict or "-", f"{o.seconds:.0f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        s = self.score()
        lines.append(f"score: {s['killed']}/{s['counted']} mutants killed"
                     + (f" ({s['percent']:g}%)" if s["percent"] is not None else "")
                     + (f"; {s['build_failed']} did not build (not counted)" if s["build_failed"] else "")
                     + f"; wall time {_hms(time.monotonic() - self.t0)}; {self.run_dir / 'mutants.json'}")
        return "\n".join(lines)

    def write(self, interrupted=False):
        by_name = {m.name: m for m in self.mutants}
        doc = {
            "kernel_tree": str(self.tree), "debug_kernel": self.a.kernel_debug,
            "kernel_release": self.tree_image.kernel_release if self.tree_image else None,
            "flavour": self.a.flavour, "cases": [c.id for c in self.cases],
            "control": asdict(self.control) if self.control else None,
            "mutants": [{**asdict(o), "mutant": by_name[o.name].to_json()} for o in self.outcomes],
            "not_run": [m.name for m in self.mutants[len(self.outcomes):]],
            "score": self.score(), "wall_seconds": round(time.monotonic() - self.t0, 1),
            "interrupted": interrupted}
        (self.run_dir / "mutants.json").write_text(json.dumps(doc, indent=2) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vm.mutants",
                                description="Score the scenarios against mutated ublk drivers.")
    p.add_argument("--mutants", metavar="DIR", type=Path, default=DEFAULT_MUTANTS,
                   help=f"a directory of *.patch mutants (default {DEFAULT_MUTANTS})")
    p.add_argument("--scenarios", nargs="+", metavar="NAME",
                   help="scenarios to run, as `just run` names them (default: every shipped one "
                        "but the nightly ones)")
    p.add_argument("--nightly", action="store_true",
                   help="without --scenarios: the nightly scenarios too (hours per mutant)")
    options.add_arguments(p, only=GUEST_OPTIONS + ("results",))
    return p


def prepare(a):
    """(mutants, cases): everything checked, nothing built or started (BenchError: exit 2)."""
    if a.kernel_tree is None:
        raise BenchError("--kernel-tree DIR is required: the tree whose ublk_drv.c the mutants patch")
    mutants = load_dir(a.mutants)
    cases = load_cases(a.scenarios or [str(p) for p in catalog.shipped()])
    if not a.scenarios and not a.nightly:
        cases = [c for c in cases if not c.nightly]
    check_applies(mutants, a.kernel_tree)
    return mutants, cases


def main(argv=None) -> int:
    a = parser().parse_args(argv)

    def body():
        mutants, cases = prepare(a)
        run_dir = options.run_dir(a, "mutants-")
        run_dir.mkdir(parents=True, exist_ok=True)
        run = MutationRun(a, mutants, cases, run_dir)
        try:
            return run.run()
        except KeyboardInterrupt:
            run.write(interrupted=True)
            raise

    return guarded(body)


if __name__ == "__main__":
    sys.exit(main())
