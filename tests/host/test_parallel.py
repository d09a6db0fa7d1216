"""-j N workers (no VM: runners are stand-ins that record what they were asked)."""
import threading
import time
from types import SimpleNamespace

from vm.scenario.errors import PASSED, SETUP
from vm.scenario.parallel import Workers


class FakeRunner:
    def __init__(self, k, log, fail=None, delay=0.05):
        self.k, self.log, self.fail, self.delay = k, log, fail, delay
        self.closed = threading.Event()
        self.stop_requested = False

    def run_case(self, case, n, total, rep):
        self.log.append((self.k, case, threading.current_thread().name))
        self.closed.wait(self.delay)
        kind = SETUP if case == self.fail else PASSED
        return SimpleNamespace(id=case, kind=kind, steps=[], worker=self.k)

    def close(self):
        self.closed.set()


def test_every_case_runs_once_and_results_come_back_in_plan_order():
    log, runners = [], []

    def make(k):
        runners.append(FakeRunner(k, log, delay=0.3))   # long enough for all 3 to start under load
        return runners[-1]
    planned = [(f"c{i}", None) for i in range(9)]
    out = Workers(make, 3).run(planned)
    assert [i for i, _ in out] == list(range(9))
    assert sorted(c for _, c, _ in log) == [c for c, _ in planned]
    assert len({w for w, _, _ in log}) == 3                       # the work was shared
    assert all(r.closed.is_set() for r in runners)               # every worker closed its runner
    assert {t for _, _, t in log} <= {"worker-1", "worker-2", "worker-3"}


def test_a_guest_that_cannot_start_stops_the_run():
    log = []
    out = Workers(lambda k: FakeRunner(k, log, fail="c0"), 1).run([(f"c{i}", None) for i in range(5)])
    assert [r.id for _, r in out] == ["c0"]


def test_interrupt_closes_every_runner_while_cases_run():
    log, runners = [], []

    def make(k):
        runners.append(FakeRunner(k, log, delay=30))
        return runners[-1]
    w = Workers(make, 2)
    t = threading.Thread(target=w.run, args=([(f"c{i}", None) for i in range(4)],))
    t.start()
    while len(log) < 2:
        time.sleep(0.01)
    w.interrupt()
    t.join(5)
    assert not t.is_alive()
    assert len(log) == 2 and all(r.closed.is_set() for r in runners)


# --- the pytest route: xdist workers, one combined report, the same verdicts as `run` ---------------
FAKE_GUESTS = '''
from vm.scenario import runner
from vm.scenario.errors import SPLAT
from vm.scenario.result import CaseResult

def run_case(self, case, n=1, total=1, repeat=None):
    self.pool.kernel_release, self.pool.accel_used = "6.12.117+deb13-cloud-amd64", "tcg"
    (self.run_dir / case.safe_id).mkdir(parents=True, exist_ok=True)
    (self.run_dir / case.safe_id / "by").write_text(self.opts.guest_prefix)
    res = CaseResult(id=case.id, scenario=case.scenario, variant=case.variant,
                     description=case.description, duration=0.1, dir=case.safe_id)
    if case.scenario == "kill_during_fetch" or case.id == "kill_daemon[target=loop]":
        res.kind, res.message = SPLAT, "WARNING"
    return res

runner.Runner.run_case = run_case
'''


def test_pytest_n2_and_run_j2_give_the_same_verdicts_in_one_report(tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys

    from vm.paths import REPO
    from vm.scenario import cli, runner

    (tmp_path / "ubd_fake_guests.py").write_text(FAKE_GUESTS)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}", UBD_FLAVOUR="cloud")
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "ubd_fake_guests", "-p", "no:cacheprovider",
                        "-n", "2", "scenarios", "-k", "kill_daemon and not recover and not scheduler or kill_during_fetch",
                        "--results", str(tmp_path / "pytest")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 failed" in r.stdout and "1 xfailed" in r.stdout, r.stdout[-2000:]
    scen = tmp_path / "pytest" / "scenarios"
    by_pytest = json.loads((scen / "result.json").read_text())
    assert sorted(p.name for p in (scen / "workers").iterdir()) == ["gw0", "gw1"]
    assert by_pytest["kernel"]["release"] == "6.12.117+deb13-cloud-amd64"
    assert {(scen / c["dir"] / "by").read_text() for c in by_pytest["cases"]} == {"gw0-", "gw1-"}

    monkeypatch.setattr(runner.Runner, "run_case", runner.Runner.run_case)   # restored afterwards
    exec(FAKE_GUESTS, {})   # the same stand-in, in this process, for the `run -j 2` route
    status = cli.main(["run", "kill_daemon", "kill_during_fetch", "-j", "2", "--flavour", "cloud",
                       "--results", str(tmp_path / "cli")])
    by_cli = json.loads((tmp_path / "cli" / "result.json").read_text())
    verdicts = lambda doc: sorted((c["id"], c["verdict"]) for c in doc["cases"])  # noqa: E731
    assert verdicts(by_cli) == verdicts(by_pytest) == [
        ("kill_daemon[target=loop]", "REGRESSION"), ("kill_daemon[target=null]", "PASS"),
        ("kill_during_fetch", "expected failure")]
    assert status == 1 and by_cli["exit_status"] == by_pytest["exit_status"] == 1
