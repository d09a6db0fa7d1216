"""The engine without a VM: a fake guest and agent stand in, so verdicts, evidence, reuse of guests
and the report can be checked exactly."""
import io
import json
import tarfile
import textwrap
import xml.etree.ElementTree as ET

import pytest

from vm.errors import KernelPanic
from vm.scenario import health, loader, report, runner
from vm.scenario.errors import EXPECTATION, PANIC, PASSED, SPLAT, TIMEOUT
from vm.scenario.progress import Progress
from vm.scenario.result import CaseResult

SCENARIO = """
description = "kill and wait"
[devices.ubd]
target = "null"
queues = 2
[[steps]]
do = "add"
device = "ubd"
[[steps]]
do = "kill"
device = "ubd"
[[steps]]
do = "wait_state"
device = "ubd"
state = "DEAD"
within = 5
[[steps]]
do = "delete"
device = "ubd"
"""


class FakeAgent:
    """Answers like the guest agent; `state` is what wait_state sees, `dmesg` what kmsg holds."""

    def __init__(self, state="DEAD", dmesg=(), leftovers=(), panic_on=None):
        self.state, self.dmesg, self.leftovers, self.panic_on = state, list(dmesg), list(leftovers), panic_on
        self.calls = []

    def call(self, op, timeout=60, **req):
        self.calls.append((op, req))
        if op == self.panic_on:
            self.guest.stopped = True   # QEMU exits on a panic
            raise KernelPanic("guest kernel panic", "Kernel panic - not syncing: test\nmore")
        if op == "run":
            return {"status": 0, "stdout": "", "stderr": "", "elapsed": 0.1, "timed_out": False,
                    "stuck": False}
        if op == "ublk_info":
            return {"state": "LIVE", "daemon_pid": 4321, "queue_tids": {"0": 4322}, "listed": True,
                    "raw": "dev id 0 ..."}
        if op == "signal":
            return {"sent": req["pid"] == 4321}
        if op == "wait_state":
            ok = req["state"] == self.state
            return {"reached": ok, "state": self.state, "elapsed": 0.4 if ok else req["within"],
                    "history": [[0.0, "LIVE"], [0.4, self.state]], "raw": ""}
        if op == "kmsg_mark":
            return {"seq": 7}
        if op == "kmsg_since":
            return {"lines": self.dmesg}
        if op == "snapshot":
            return {"devices": self.leftovers, "servers": [], "tainted": 0, "mounts": [], "loops": []}
        return {}

    def close(self):
        pass


class FakeGuest:
    def __init__(self, tmp_path, n):
        self.name, self.accel, self.boot_seconds = f"guest-{n}", "tcg", 1.0
        self.console_log = tmp_path / f"console-{n}.log"
        self.console_log.write_text("boot\n")
        self.stopped = False

    def is_alive(self):
        return not self.stopped

    def pull(self, remote, local):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            data = b"==> /var/log/ubdsrv/dev0.log <==\nserver says hi\n"
            info = tarfile.TarInfo("server.log")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        local.write_bytes(buf.getvalue())

    def stop(self):
        self.stopped = True


@pytest.fixture
def make_runner(tmp_path, monkeypatch):
    boots = []

    def build(*agents):
        queue = list(agents)

        def acquire(pool):
            if pool.guest is not None and pool.guest.is_alive():
                return pool.guest, pool.agent, False
            boots.append(1)
            pool.guest, pool.agent = FakeGuest(tmp_path, len(boots)), queue.pop(0)
            pool.agent.guest = pool.guest
            return pool.guest, pool.agent, True
        monkeypatch.setattr(runner.GuestPool, "acquire", acquire)
        r = runner.Runner(runner.RunOptions(), tmp_path / "run", Progress(io.StringIO(), live=False))
        return r, boots
    return build


def case(tmp_path, text=SCENARIO, name="k.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return loader.load(p)[0]


def test_passing_case_keeps_the_guest_and_collects_evidence(tmp_path, make_runner):
    r, boots = make_runner(FakeAgent())
    res = r.run_case(case(tmp_path))
    assert res.kind == PASSED, report.failure_text(res)
    assert [s["do"] for s in res.steps] == ["add", "kill", "wait_state", "delete"]
    assert "server says hi" in (tmp_path / "run/k/server.log").read_text()
    assert (tmp_path / "run/k/dmesg.txt").exists() and (tmp_path / "run/k/console.log").exists()
    r.run_case(case(tmp_path))
    assert len(boots) == 1   # reused


def test_wrong_state_is_an_expectation_failure_with_evidence(tmp_path, make_runner):
    r, boots = make_runner(FakeAgent(state="DEAD"), FakeAgent())
    c = case(tmp_path, SCENARIO.replace('state = "DEAD"', 'state = "QUIESCED"'))
    res = r.run_case(c)
    assert res.kind == EXPECTATION
    assert res.where == "step 3/4 (wait ubd QUIESCED within 5s)"
    assert res.expected == "state QUIESCED within 5 s"
    assert res.seen.startswith("DEAD after 5.0 s") and "LIVE@0s -> DEAD@0.4s" in res.seen
    text = report.failure_text(res, tmp_path / "run")
    assert "expected: state QUIESCED" in text and f"{tmp_path}/run/k/server.log" in text
    r.run_case(c)
    assert len(boots) == 2   # a failure gets a fresh guest


def test_kill_signals_the_listed_daemon_pid(tmp_path, make_runner):
    a = FakeAgent()
    r, _ = make_runner(a)
    r.run_case(case(tmp_path))
    assert ("signal", {"pid": 4321, "signal": 9}) in a.calls


def test_splat_fails_a_passing_case_and_retires_the_guest(tmp_path, make_runner):
    warn = "[   12.5] WARNING: CPU: 1 PID: 99 at drivers/block/ublk_drv.c:1234 ublk_abort_queue"
    cut = "[   12.5] ------------[ cut here ]------------"
    r, boots = make_runner(FakeAgent(dmesg=["[ 1.0] ok", cut, warn]), FakeAgent())
    res = r.run_case(case(tmp_path))
    assert res.kind == SPLAT and "WARNING" in res.message and warn.strip() in res.seen
    assert res.message.endswith(warn.strip())   # the line that says what happened, not the marker
    assert res.where == "health check after the steps"
    r.run_case(case(tmp_path))
    assert len(boots) == 2


class BuiltinUblkAgent(FakeAgent):
    """A machine whose kernel has ublk built in (an ssh target): `modprobe -r` cannot unload it."""

    def call(self, op, timeout=60, **req):
        if op == "run" and req.get("cmd") == "modprobe -r ublk_drv":
            self.calls.append((op, req))
            return {"status": 1, "stdout": "", "stderr": "modprobe: FATAL: Module ublk_drv is builtin.",
                    "elapsed": 0.1, "timed_out": False, "stuck": False}
        return super().call(op, timeout, **req)


def test_a_built_in_ublk_drv_is_not_a_failed_unload(tmp_path, make_runner):
    r, boots = make_runner(BuiltinUblkAgent())
    assert r.run_case(case(tmp_path)).kind == "passed"
    r.run_case(case(tmp_path))
    assert len(boots) == 1   # the machine is still clean: reused


def test_leftover_device_is_a_failure(tmp_path, make_runner):
    r, _ = make_runner(FakeAgent(leftovers=["/dev/ublkb0", "/dev/ublkc0"]))
    res = r.run_case(case(tmp_path))
    assert res.kind == EXPECTATION and "device nodes left: /dev/ublkb0" in res.message


def test_panic_mid_case_is_reported_with_the_console(tmp_path, make_runner):
    r, _ = make_runner(FakeAgent(panic_on="wait_state"))
    res = r.run_case(case(tmp_path))
    assert res.kind == PANIC and res.where.startswith("step 3/4")
    assert "Kernel panic - not syncing: test" in report.failure_text(res)


def test_scenario_deadline(tmp_path, make_runner):
    r, _ = make_runner(FakeAgent())
    text = SCENARIO.replace('description = "kill and wait"',
                            'description = "slow"\ntimeout = 1') + \
        '[[steps]]\ndo = "sleep"\nseconds = 5\n'
    res = r.run_case(case(tmp_path, text))
    assert res.kind == TIMEOUT and "runs past the deadline" in res.message
    assert res.where == "step 5/5 (sleep 5s)"


def test_splats_recognised():
    lines = ["[1] BUG: kernel NULL pointer dereference, address: 0000000000000008",
             "[2] INFO: task fio:123 blocked for more than 60 seconds.",
             "[3] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/0:1:12]",
             "[4] rcu: INFO: rcu_preempt self-detected stall on CPU",
             "[5] refcount_t: underflow; use-after-free.",
             "[6] list_del corruption. prev->next should be ffff",
             "[7] blk_print_req_error: 5 callbacks suppressed",
             "[8] I/O error, dev ublkb0, sector 2048 op 0x1:(WRITE) flags 0x0",
             "[9] ==================================================================",
             "[10] BUG: KASAN: slab-use-after-free in ublk_ch_release"]
    kinds = [k for k, _ in health.find_splats(lines)]
    assert kinds == ["BUG", "hung task", "BUG", "RCU stall", "refcount", "list corruption", "BUG"]


def test_taint_decoded():
    assert health.decode_taint((1 << 9) | (1 << 7)) == "D kernel died (oops/BUG), W kernel warning"


def test_junit_and_json(tmp_path):
    ok = CaseResult(id="a", scenario="a", variant={}, description="d", duration=1.0)
    bad = CaseResult(id="b[x=1]", scenario="b", variant={"x": 1}, description="d", kind=TIMEOUT,
                     message="fio hung", where="step 2/3 (fio)", dir="b-x=1", duration=2.0,
                     steps=[{"loop": 1, "step": 1, "do": "add", "what": "add ubd", "ok": True,
                             "seconds": 0.5, "note": "LIVE"}])
    report.write_junit(tmp_path, [ok, bad])
    report.write_json(tmp_path, [ok, bad], {"accel": "tcg"})
    suite = ET.parse(tmp_path / "junit.xml").getroot()
    assert (suite.get("tests"), suite.get("failures")) == ("2", "1")
    f = suite.find("testcase[@name='b[x=1]']/failure")
    assert f.get("type") == TIMEOUT and "step 2/3 (fio)" in f.text
    assert "add ubd" in suite.find("testcase[@name='b[x=1]']/system-out").text
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["exit_status"] == 1 and doc["counts"] == {"passed": 1, "timeout": 1}
    table = report.summary([ok, bad], tmp_path)
    assert "TIMEOUT" in table and "1 passed, 1 failed" in table


def test_plain_progress_lines():
    out = io.StringIO()
    p = Progress(out, live=False)
    p.case_started("kill_daemon[target=null]", 1, 2)
    p.step(2, 3, 4, 8, "kill -KILL ubd")
    assert "[1/2] kill_daemon[target=null]" in out.getvalue()
    assert "loop 2/3 step 4/8 kill -KILL ubd" in out.getvalue() and "\r" not in out.getvalue()


def test_live_progress_draws_with_rich_and_keeps_the_lines_that_stay():
    from types import SimpleNamespace
    out = io.StringIO()
    p = Progress(out, live=True)
    p.case_started("kill_daemon[target=null]", 1, 2)
    p.step(2, 3, 4, 8, "kill -KILL ubd")
    p.note("guest-1: up in 5.0 s (tcg)")
    p.case_done(SimpleNamespace(passed=False, failed=True, kind="timeout", duration=3.2, where="step 4/8",
                                message="no answer"))
    text = out.getvalue()
    assert "\x1b[" in text and "loop 2/3 step 4/8 kill -KILL ubd" in text   # the live line
    assert "kill_daemon[target=null]" in text                               # brackets kept as text
    assert "guest-1: up in 5.0 s (tcg)\n" in text
    assert text.endswith("[1/2] kill_daemon[target=null]: FAIL (timeout) in 3.2 s\n    step 4/8: no answer\n")


# --- across boots: power_cut, the manifest of acknowledged writes, dmesg of every boot ----------
POWER_CUT = """
description = "cut"
[devices.pc]
target = "loop"
size = "64M"
file = "/data/pc.img"
[[steps]]
do = "add"
device = "pc"
[[steps]]
do = "mount"
device = "pc"
[[steps]]
do = "write_acked"
device = "pc"
[[steps]]
do = "power_cut"
[[steps]]
do = "add"
device = "pc"
[[steps]]
do = "mount"
device = "pc"
[[steps]]
do = "verify_acked"
device = "pc"
[[steps]]
do = "umount"
device = "pc"
[[steps]]
do = "delete"
device = "pc"
"""
MANIFEST = "f000001 " + "a" * 64 + " 65536\nf000002 " + "b" * 64 + " 65536\nf00000"


class CrashAgent(FakeAgent):
    """A boot's agent: the first one has a writer's manifest, the second verifies it."""

    def __init__(self, dmesg=(), lost=0):
        super().__init__(state="LIVE", dmesg=dmesg)
        self.lost = lost

    def call(self, op, timeout=60, **req):
        self.calls.append((op, req))
        if op == "read_text":
            return {"missing": False, "text": MANIFEST}
        if op == "verify_acked":
            total = req["manifest"].count("\n")
            return {"ok": total - self.lost, "bad": self.lost,
                    "problems": ["f000002: No such file or directory"][:self.lost]}
        return super().call(op, timeout, **req)


@pytest.fixture
def crash_runner(tmp_path, make_runner, monkeypatch):
    def build(first, second):
        r, boots = make_runner(first, FakeAgent())
        cuts = []

        def power_cut(guest):
            cuts.append("cut")

        def boot_again(guest):
            cuts.append("boot")
            guest.console_log.write_text(guest.console_log.read_text() + "boot again\n")
        monkeypatch.setattr(FakeGuest, "power_cut", power_cut, raising=False)
        monkeypatch.setattr(FakeGuest, "boot_again", boot_again, raising=False)

        def new_agent(guest):
            second.guest = guest
            second.start = lambda: None
            return second
        monkeypatch.setattr(runner, "AgentClient", new_agent)
        return r, boots, cuts
    return build


def test_power_cut_boots_again_checks_the_manifest_and_keeps_every_boots_dmesg(tmp_path,
                                                                              crash_runner):
    first = CrashAgent(dmesg=["[ 5.0] boot one says hi"])
    second = CrashAgent(dmesg=["[ 1.0] boot two says hi"])
    r, boots, cuts = crash_runner(first, second)
    res = r.run_case(case(tmp_path, POWER_CUT))
    assert res.kind == PASSED, report.failure_text(res)
    assert cuts == ["cut", "boot"]
    # the manifest was read before the cut; only its whole lines count
    assert first.calls.index(("read_text", {"path": "/run/ubd-scenario/acked-pc.txt"})) >= 0
    verify = [req for op, req in second.calls if op == "verify_acked"][0]
    assert verify["manifest"] == MANIFEST.rsplit("\n", 1)[0] + "\n"
    assert verify["dir"] == "/mnt/pc/acked"
    assert (tmp_path / "run/k/acked-pc.txt").read_text().count("\n") == 2
    notes = {s["do"]: s["note"] for s in res.steps}
    assert notes["verify_acked"] == "all 2 acknowledged files intact"
    assert notes["power_cut"].startswith("2 files acknowledged on pc; QEMU killed")
    dmesg = (tmp_path / "run/k/dmesg.txt").read_text()
    assert dmesg.index("boot one says hi") < dmesg.index("--- boot 2 of the case ---") < \
        dmesg.index("boot two says hi")
    # the second boot's agent did the health check, and serves the next case on the same guest
    assert ("kill_jobs", {}) in second.calls and ("kill_jobs", {}) not in first.calls
    second.state = "DEAD"
    assert r.run_case(case(tmp_path)).kind == PASSED
    assert len(boots) == 1 and r.pool.agent is second
    assert ("signal", {"pid": 4321, "signal": 9}) in second.calls


def test_a_lost_acknowledged_file_fails_with_the_manifest_as_evidence(tmp_path, crash_runner):
    r, _, _ = crash_runner(CrashAgent(), CrashAgent(lost=1))
    res = r.run_case(case(tmp_path, POWER_CUT))
    assert res.kind == EXPECTATION
    assert res.message == "1 of 2 files acknowledged on pc before the cut are lost or damaged"
    assert res.where == "step 7/9 (verify_acked pc)"
    assert "f000002: No such file or directory" in res.seen
    assert "k/acked-pc.txt" in report.failure_text(res, tmp_path / "run")


def test_a_splat_before_the_cut_fails_the_case(tmp_path, crash_runner):
    warn = "[ 9.9] WARNING: CPU: 0 PID: 1 at drivers/block/ublk_drv.c:1616 ublk_ch_uring_cmd"
    r, _, _ = crash_runner(CrashAgent(dmesg=[warn]), CrashAgent())
    res = r.run_case(case(tmp_path, POWER_CUT))
    assert res.kind == SPLAT and "before the cut" in res.message and warn in res.seen


def test_data_that_does_not_verify_fails_even_where_errors_are_allowed():
    from vm.scenario import steps
    from vm.scenario.errors import StepFailure
    step = type("S", (), {"args": {"expect": "errors_allowed", "job": "j", "verify": "crc32c"}})()
    assert steps.judge_fio(step, 1, {"errors": 1, "error_text": "job j: error 5"}, "") \
        .startswith("fio exit 1")
    with pytest.raises(StepFailure) as e:
        steps.judge_fio(step, 1, {"errors": 1, "error_text": "job j: error 84",
                                  "verify_failed": True}, "")
    assert e.value.message == "fio job j: data did not verify"
    with pytest.raises(StepFailure):
        steps.judge_fio(step, 1, None, "crc32c: verify failed at file /dev/ublkb0 offset 4096")
