"""The engine against real guests, through its real entry point: a passing case without ublk, a
deliberately wrong expectation, a step past its deadline, and a kernel panic mid-scenario.

One `python -m vm.scenario run` runs all three (the passing case leaves its guest to the next one;
the failure retires it), and the tests read its result folder and output."""
import json
import os
import subprocess
import sys

import pytest

from vm.paths import REPO

pytestmark = pytest.mark.guest
DATA = REPO / "tests/data/scenarios"
FILES = ["kernel_loop_smoke", "queue_kill_and_stop", "wrong_expectation", "step_timeout", "panic"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenario-run")
    p = subprocess.run([sys.executable, "-m", "vm.scenario", "run",
                        *[str(DATA / f"{f}.toml") for f in FILES], "--results", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ))
    doc = json.loads((out / "result.json").read_text())
    return {"status": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "dir": out,
            "cases": {c["id"]: c for c in doc["cases"]}}


def test_run_exits_1_when_some_failed(run):
    assert run["status"] == 1, run["stderr"][-3000:]
    assert list(run["cases"]) == FILES


def test_engine_runs_fio_filesystem_and_health_checks(run):
    c = run["cases"]["kernel_loop_smoke"]
    assert c["kind"] == "passed", c["message"]
    assert [s["do"] for s in c["steps"]][:4] == ["add", "fio", "fio", "wait"]
    assert any(s["note"] == "data verified" for s in c["steps"])
    case_dir = run["dir"] / c["dir"]
    for f in ("console.log", "dmesg.txt", "server.log", "fio/bg-loop1.json"):
        assert (case_dir / f).is_file(), f
    assert json.loads((case_dir / "fio/bg-loop1.json").read_text())["jobs"][0]["read"]["iops"] > 0


def test_queue_kill_and_graceful_terminate(run):
    c = run["cases"]["queue_kill_and_stop"]
    assert c["kind"] == "passed", c["message"]
    notes = {s["what"]: s["note"] for s in c["steps"]}
    queue_pid = int(notes["kill -KILL queue 1 of ubd"].split()[-1])
    daemon_pid = int(c["steps"][0]["note"].split()[-1])
    assert queue_pid != daemon_pid   # the queue's own task, not the daemon
    assert notes["terminate ubd"].endswith("exited, device DEAD")


def test_wrong_expectation_fails_with_reason_and_evidence(run):
    c = run["cases"]["wrong_expectation"]
    assert c["guest"].endswith("(reused)")   # the cases before passed and left their guest
    assert c["kind"] == "expectation failed"
    assert c["where"] == "step 3/4 (wait ubd QUIESCED within 10s)"
    assert c["expected"] == "state QUIESCED within 10 s"
    assert "DEAD" in c["seen"] and "QUIESCED" not in c["seen"].split("(states seen")[1]
    case_dir = run["dir"] / c["dir"]
    assert (case_dir / "server.log").read_text().strip()
    assert (case_dir / "dmesg.txt").is_file()
    # the summary a user reads says the same
    assert "expected: state QUIESCED within 10 s" in run["stdout"]
    assert f"{case_dir}/server.log" in run["stdout"]


def test_step_past_its_deadline_is_a_timeout_on_a_fresh_guest(run):
    c = run["cases"]["step_timeout"]
    assert c["guest"].endswith("(fresh)")     # the failure before retired the guest
    assert c["kind"] == "timeout"
    assert c["where"] == "step 1/1 (shell: sleep 60)"
    assert c["message"] == "shell step did not finish within 3 s"
    assert c["steps"][0]["seconds"] < 15        # killed at the deadline, not after 60 s
    # blocked tasks were dumped for the evidence
    assert "sysrq: Show Blocked State" in (run["dir"] / c["dir"] / "dmesg.txt").read_text()


def test_panic_mid_scenario_is_reported_with_console_and_no_qemu_left(run):
    c = run["cases"]["panic"]
    assert c["kind"] == "kernel panic"
    assert c["where"] == "step 2/3 (shell: echo c > /proc/sysrq-trigger)"
    assert "Kernel panic - not syncing: sysrq triggered crash" in c["console_tail"]
    assert "Kernel panic - not syncing" in (run["dir"] / c["dir"] / "console.log").read_text()
    assert "Kernel panic - not syncing" in run["stdout"]          # the summary shows the tail
    assert [s["do"] for s in c["steps"]] == ["shell", "shell"]  # step 3 never ran
    leftover = subprocess.run(["pgrep", "-f", f"qemu-system.*{run['dir']}"],
                              capture_output=True, text=True)
    assert leftover.stdout == "", f"QEMU still running: {leftover.stdout}"
