"""`python -m vm.selftests` (just selftests): the kernel's own ublk selftests in the guest.

The suite is found and built on the host (vm/selftests_build.py), pushed into the guest, and each
test runs under the kernel's own runner (run_kselftest.sh -t ublk:TEST), whose KTAP output gives
the verdict (vm/ktap.py): ok, not ok, # SKIP (the test's exit 4), # TIMEOUT. After every test the
bench's health check runs (dmesg splats, taint, leftovers, ublk_drv unload; vm/scenario/health.py)
and a test that broke the guest or the kernel gets a fresh guest next. Results go to the run folder
as the scenarios' do (result.json, junit.xml; per test: test.log, dmesg.txt, console.log)."""
import argparse
import shutil
import sys
import time
import traceback
from pathlib import Path

from . import flavours, image, ktap, options, selftests_build as build
from .cli_guard import guarded
from .errors import BenchError, GuestLost, KernelPanic, SetupError
from .scenario import baseline, health, kernel_info, report
from .scenario.errors import (EXPECTATION, GUEST_LOST, PANIC, PASSED, SETUP, SKIPPED, SPLAT,
                              TIMEOUT)
from .scenario.progress import Progress
from .scenario.result import CaseResult
from .scenario.runner import SEVERITY, GuestPool, RunOptions, _read_from, _size
from .scenario.session import AgentStuck

GUEST_DIR = "/opt/kselftest"
DEFAULT_TIMEOUT = 900.0   # seconds per test under TCG; the suite's own settings say 150 (native)
RUNNER_GRACE = 60.0       # the host waits this much beyond the runner's own per-test timeout
SCENARIO = "selftests"    # the results' `scenario` field (JUnit class scenarios.selftests)
PREPARE = ("modprobe ublk_drv && echo 1 > /proc/sys/kernel/sysrq && "
           "{ sysctl -qw kernel.hung_task_timeout_secs=60 2>/dev/null; true; }")
DAEMON = "kublk"          # the suite's server: none may outlive its test
NOT_NODES = "find /dev -maxdepth 1 -name 'ublk[bc]*' -type f"
# known failures per flavour, apart from the scenarios' (their ids are scenario cases)
BASELINE_DIR = baseline.BASELINE_DIR / "selftests"
VERDICT = {ktap.PASS: PASSED, ktap.XFAIL: PASSED, ktap.SKIP: SKIPPED, ktap.FAIL: EXPECTATION,
           ktap.TIMEOUT: TIMEOUT}


def output_path(test: str) -> str:
    return f"{GUEST_DIR}/output/{test}.log"


def runner_command(test: str, timeout: float) -> str:
    """The guest command: the kernel's runner on one test, with our per-test timeout. Its output
    goes to a file opened for appending: the runner writes the test's lines through a second
    descriptor (>> /dev/stdout), which would overwrite them on a plain file; and a pipe would stay
    open as long as a daemon the test left behind."""
    out = output_path(test)
    return (f"mkdir -p {GUEST_DIR}/output && rm -f {out} && cd {GUEST_DIR} && "
            f"./run_kselftest.sh -o {int(timeout)} -t {build.COLLECTION}:{test} >> {out} 2>&1; "
            f"cat {out}")


def verdict(test: str, out: str, timeout: float) -> dict:
    """CaseResult fields from the runner's KTAP output for one test."""
    doc = ktap.parse(out)
    mine = [t for t in doc.tests if t.name.split()[-1:] == [test]]
    if not mine:
        return {"kind": SETUP, "message": f"the kernel's runner printed no KTAP result for {test}",
                "expected": f"a line `ok N selftests: {build.COLLECTION}: {test}`",
                "seen": "\n".join(out.strip().splitlines()[-12:]) or "(no output)",
                "evidence": ["test.log"]}
    t = mine[0]
    kind = VERDICT[t.outcome]
    said = [l for l in t.log if l.strip() and not l.startswith(("selftests:", "timeout set to",
                                                                "overriding timeout"))]
    last = said[-1].strip() if said else ""
    if kind == PASSED:
        return {"kind": kind, "message": t.directive}
    if kind == SKIPPED:
        return {"kind": kind, "message": "skipped by the test itself (exit 4)" +
                (f": {last}" if last else ""), "evidence": ["test.log"]}
    if kind == TIMEOUT:
        return {"kind": kind, "message": f"the test did not finish within {timeout:g} s "
                f"(the runner's `{t.directive}`)", "expected": f"exit within {timeout:g} s",
                "seen": "\n".join(said[-12:]), "evidence": ["test.log", "dmesg.txt", "console.log"]}
    return {"kind": kind, "message": f"the test failed ({t.directive or 'not ok'})",
            "expected": "exit 0 (or 4: skip)", "seen": "\n".join(said[-12:]) or "(no output)",
            "evidence": ["test.log", "dmesg.txt"]}


def add_problem(res: CaseResult, kind: str, message: str):
    """A later finding (health check): it becomes the verdict when it is the worst so far."""
    if res.kind in (PASSED, SKIPPED):
        if res.kind == SKIPPED:
            res.problems.append(f"{res.kind}: {res.message}")
        res.kind, res.message, res.where = kind, message, "health check after the test"
        res.evidence = ["dmesg.txt", "test.log"]
        return
    res.problems.append(f"{kind}: {message}")
    if SEVERITY.index(kind) < SEVERITY.index(res.kind):
        res.problems.insert(0, f"{res.kind}: {res.message}")
        res.kind, res.message = kind, message


class SelftestRunner:
    """Runs tests one at a time; the guest is reused while tests leave the kernel clean."""

    def __init__(self, opts: RunOptions, run_dir: Path, install: Path, timeout: float,
                 progress: Progress):
        self.run_dir, self.install, self.timeout, self.progress = run_dir, install, timeout, progress
        self.pool = GuestPool(opts, run_dir, progress.note)
        self.release = ""

    def close(self):
        self.pool.close()

    def run_test(self, test: str, n: int, total: int) -> CaseResult:
        res = CaseResult(id=f"{build.COLLECTION}:{test}", scenario=SCENARIO, variant={},
                         description=f"kernel selftest {build.COLLECTION}/{test}")
        res.dir = test.removesuffix(".sh")
        case_dir = self.run_dir / res.dir
        case_dir.mkdir(parents=True, exist_ok=True)
        self.progress.case_started(res.id, n, total)
        t0 = time.monotonic()
        try:
            self._run(test, res, case_dir)
        finally:
            res.duration = time.monotonic() - t0
            self.progress.case_done(res)
        return res

    def _guest(self):
        guest, agent, fresh = self.pool.acquire()
        if fresh:
            guest.exec(f"rm -rf {GUEST_DIR}", timeout=30, check=True)
            guest.push(self.install, GUEST_DIR)
            self.release = agent.call("run", timeout=30, cmd="uname -r")["stdout"].strip()
        return guest, agent, fresh

    def _run(self, test, res, case_dir):
        self.progress.phase("getting a guest")
        try:
            guest, agent, fresh = self._guest()
        except BenchError as e:
            res.kind = PANIC if isinstance(e, KernelPanic) else SETUP
            res.message, res.console_tail = f"could not start a guest: {e}", getattr(e, "console_tail", "")
            res.evidence = ["console.log"]
            boot_log = self.pool.last_dir and self.pool.last_dir / "console.log"
            if boot_log and boot_log.exists():
                shutil.copyfile(boot_log, case_dir / "console.log")
            self.pool.discard()
            return
        res.guest = f"{guest.name} ({'fresh' if fresh else 'reused'})"
        console_from = _size(guest.console_log)
        usable, mark, taint0 = True, -1, 0
        try:
            begin = agent.call("run", timeout=60, cmd=PREPARE)
            if begin.get("status") != 0:
                raise SetupError(f"preparing the guest failed: {begin.get('stderr', '').strip()}")
            mark = agent.call("kmsg_mark", timeout=30)["seq"]
            taint0 = agent.call("snapshot", timeout=30)["tainted"]
            self.progress.phase(f"running (timeout {self.timeout:g} s)")
            r = agent.call("run", timeout=self.timeout + RUNNER_GRACE,
                           cmd=runner_command(test, self.timeout))
            if r.get("timed_out"):   # what the runner wrote before it was killed
                r["stdout"] = agent.call("run", timeout=30, cmd=f"cat {output_path(test)}")["stdout"]
            out = r.get("stdout", "") + (f"\n--- stderr ---\n{r['stderr']}" if r.get("stderr") else "")
            (case_dir / "test.log").write_text(out)
            if r.get("timed_out"):
                found = {"kind": TIMEOUT, "evidence": ["test.log", "dmesg.txt", "console.log"],
                         "message": f"the kernel's runner did not end within {self.timeout:g} + "
                                    f"{RUNNER_GRACE:g} s (its own timeout did not stop the test)"}
            else:
                found = verdict(test, r.get("stdout", ""), self.timeout)
            for k, v in found.items():
                setattr(res, k, v)
        except AgentStuck as e:
            usable = False
            res.kind, res.message, res.evidence = TIMEOUT, str(e), ["console.log"]
        except KernelPanic as e:
            usable = False
            res.kind, res.message, res.evidence = PANIC, "the guest kernel panicked", ["console.log"]
            res.console_tail = e.console_tail
        except GuestLost as e:
            usable = False
            res.kind, res.message, res.evidence = GUEST_LOST, str(e), ["console.log"]
            res.console_tail = e.console_tail
        except BenchError as e:
            usable = False
            res.kind, res.message = SETUP, str(e)
        except Exception as e:   # a harness bug: say so plainly, go on with a fresh guest
            usable = False
            res.kind, res.message = SETUP, f"harness error: {e!r}\n{traceback.format_exc()}"
        reusable = usable and res.kind in (PASSED, SKIPPED)
        if usable:
            try:
                reusable = self._health(res, agent, case_dir, mark, taint0) and reusable
            except (BenchError, AgentStuck, KeyError) as e:
                kind = PANIC if isinstance(e, KernelPanic) else \
                    GUEST_LOST if isinstance(e, GuestLost) else TIMEOUT
                add_problem(res, kind, f"health check could not complete: {e}")
                res.console_tail = getattr(e, "console_tail", "") or res.console_tail
                reusable = False
        (case_dir / "console.log").write_bytes(_read_from(guest.console_log, console_from))
        if not reusable or not guest.is_alive():
            self.pool.discard()

    def _health(self, res, agent, case_dir, mark, taint0) -> bool:
        """Leftover daemons, then the bench's health check; True when the guest is fit to reuse."""
        self.progress.phase("health check")
        clean = res.kind in (PASSED, SKIPPED)
        if res.kind == TIMEOUT:
            agent.call("run", timeout=20, cmd="echo w > /proc/sysrq-trigger")   # blocked tasks
        left = agent.call("run", timeout=30, cmd=f"pgrep -a -x {DAEMON}").get("stdout", "").strip()
        if left:
            agent.call("run", timeout=30, cmd=f"pkill -9 -x {DAEMON}; sleep 1")
            if clean:
                add_problem(res, EXPECTATION, f"health: {DAEMON} daemons left: "
                                              + "; ".join(left.splitlines())[:300])
        # a path the test wrote to after its device was gone is a file, not a device node: noted and
        # removed before the health check, which would count it as a device left behind
        files = agent.call("run", timeout=30, cmd=NOT_NODES).get("stdout", "").split()
        if files:
            agent.call("run", timeout=30, cmd="rm -f " + " ".join(files))
            res.problems.append(f"not device nodes but regular files: {' '.join(files)} (a writer, "
                                "e.g. fio, opened the path after the device was deleted)")
        h = health.check(agent, mark, taint0, steps_passed=clean)
        (case_dir / "dmesg.txt").write_text("\n".join(h.dmesg) + "\n")
        for kind, message in h.problems:
            add_problem(res, kind, message)
        if h.splat_lines:
            res.seen = res.seen or "\n".join(h.splat_lines[:5])
            if "dmesg.txt" not in res.evidence:
                res.evidence = ["dmesg.txt"] + res.evidence
        return h.clean_after and not h.problems and not left


# --- the command --------------------------------------------------------------------------------
def _note(msg):
    print(msg, file=sys.stderr, flush=True)


def resolve(a, log):
    """(source, installed suite, selected tests), all before a guest boots; BenchError on bad input."""
    if a.kernel_tree:
        source = build.source_for_tree(a.kernel_tree)
    else:
        img = image.ensure(a.flavour, log=log)
        source = build.source_for_flavour(a.flavour, img.kernel_release, log)
    install = build.build(source, flavours.get(a.flavour).suite, log)
    available = build.listed_tests(install)
    tests = build.select(available, a.patterns)
    if not tests:
        raise BenchError(f"-k {' -k '.join(a.patterns)}: no ublk selftest of {source.label} matches; "
                         f"it has: {' '.join(available)}")
    return source, install, tests


def run(a) -> int:
    guest = options.values(a)   # refuses --flavour all: one kernel per run here
    if a.timeout <= 0:
        raise BenchError(f"--timeout must be a positive number of seconds, got {a.timeout:g}")
    source, install, tests = resolve(a, _note)
    if source.note:
        _note(f"note: {source.note}")
    if a.list:
        print("\n".join(tests))
        return 0
    run_dir = options.run_dir(a, "selftests-")
    run_dir.mkdir(parents=True, exist_ok=True)
    progress = Progress()
    opts = RunOptions(guest=guest)
    runner = SelftestRunner(opts, run_dir, install, a.timeout, progress)
    progress.note(f"running {len(tests)} ublk selftest(s) of {source.label}; results in {run_dir}")
    results, t0, interrupted = [], time.monotonic(), False
    try:
        for i, test in enumerate(tests, 1):
            res = runner.run_test(test, i, len(tests))
            results.append(res)
            if res.kind == SETUP and not res.guest:
                progress.note("the guest could not be started: stopping the run")
                break
    except KeyboardInterrupt:
        interrupted = True
        progress.note("interrupted: stopping the guest")
    finally:
        runner.close()
    accel = runner.pool.accel_used or a.accel
    kernel = kernel_info.describe(guest, runner.release, accel)
    # a tree has no baseline: what fails there is the developer's to see
    known = baseline.Baseline(None, {}) if a.kernel_tree else baseline.load(a.flavour, BASELINE_DIR)
    baseline.apply(results, known)
    meta = {"suite": f"{build.COLLECTION} selftests", "flavour": a.flavour,
            "kernel_tree": str(a.kernel_tree or ""), "debug_kernel": a.kernel_debug, "accel": accel,
            "kernel": kernel, "baseline": str(known.path or ""),
            "selftests": {"source": source.label, "tree": str(source.tree), "note": source.note,
                          "installed": str(install), "per_test_timeout": a.timeout,
                          "selected": tests},
            "argv": sys.argv[1:], "wall_seconds": round(time.monotonic() - t0, 1),
            "interrupted": interrupted}
    report.write_json(run_dir, results, meta)
    report.write_junit(run_dir, results, suite=f"{build.COLLECTION}-selftests", kernel=kernel)
    if results:
        print(report.summary(results, run_dir, kernel, known.known))
    print(f"kernel {runner.release or '?'}; selftests of {source.label}; wall time "
          f"{time.monotonic() - t0:.1f} s")
    if a.update_baseline and not interrupted:
        if a.kernel_tree:
            _note("--update-baseline: a kernel built from a tree has no baseline; nothing written")
        else:
            print(f"baseline written: {baseline.write(results, known)}")
    return 130 if interrupted else report.exit_status(results)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vm.selftests", description=__doc__.split("\n")[0])
    options.add_arguments(p)
    p.add_argument("-k", dest="patterns", action="append", default=[], metavar="PATTERN",
                   help="run the tests whose name contains PATTERN (a shell glob: stress_0[12]); "
                        "repeatable")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"per-test timeout given to the kernel's runner (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--list", action="store_true", help="build the suite, list the selected tests, stop")
    p.add_argument("--update-baseline", action="store_true",
                   help="write kernel/baselines/selftests/<flavour>.toml from this run's failures "
                        "(reasons already written are kept)")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    return guarded(lambda: run(a))


if __name__ == "__main__":
    sys.exit(main())
