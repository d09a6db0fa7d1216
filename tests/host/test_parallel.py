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
        runners.append(FakeRunner(k, log))
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
