"""The fault and machine-level steps on real guests, and the fault scenarios against broken servers.

A scenario is worth what it catches: each broken server below is the repo's ubdsrv with one patch
(the fault it guards against put back in), pushed instead of the real one (RunOptions.server_dir),
and the scenario must go red for the right reason. The healthy server passes the same scenarios as
pytest items of scenarios/ (tests/ runs those too). The broken servers and the second kernel cost a
guest each: they run nightly (`just nightly`)."""
import shutil

import pytest

from vm import options
from vm.paths import REPO, UBDSRV_DIR
from vm.scenario import loader, report
from vm.scenario.errors import EXPECTATION, PASSED
from vm.scenario.progress import Progress
from vm.scenario.runner import RunOptions, Runner

pytestmark = pytest.mark.guest
DATA = REPO / "tests/data/scenarios"
SCENARIOS = REPO / "scenarios"


@pytest.fixture
def run(pytestconfig, tmp_path):
    """run(path, variant=None, flavour=None, server_dir=None) -> {case id: CaseResult}."""
    runners = []

    def go(path, variant=None, flavour=None, server_dir=None):
        values = options.values(pytestconfig.option)
        if flavour:   # the flavour's own packaged kernel
            values.update(flavour=flavour, kernel_tree=None, kernel_debug=False)
        r = Runner(RunOptions(guest=values, server_dir=server_dir),
                   tmp_path / f"run-{len(runners)}", Progress(live=False))
        runners.append(r)
        cases = [c for c in loader.load(path) if variant is None or c.variant_id == variant]
        assert cases, f"{path}: no variant {variant}"
        results = {}
        try:
            for c in cases:
                res = r.run_case(c)
                res.folder = r.run_dir / res.dir
                print(report.failure_text(res) if not res.passed else f"{res.id}: passed")
                results[res.id] = res
        finally:
            r.close()
        return results
    yield go
    for r in runners:
        r.close()


def notes(res) -> dict:
    return {s["what"]: s["note"] for s in res.steps}


# --- the vocabulary --------------------------------------------------------------------------------
def test_queue_stop_cont_terminate_module_reload_and_a_clean_reboot(run):
    [res] = run(DATA / "machine_steps.toml").values()
    assert res.kind == PASSED, report.failure_text(res)
    n = notes(res)
    assert n["stop ubd"].startswith("SIGSTOP to ubd's queue 1 task ")
    assert n["terminate ubd"].endswith("exited, device DEAD")
    assert n["module_reload"] == "unloaded and loaded again, /dev/ublk-control back"
    assert n["reboot"].startswith("rebooted cleanly, up again in ")
    dmesg = (res.folder / "dmesg.txt").read_text()
    assert "--- boot 1 of the case, up to the reboot ---" in dmesg and "--- boot 2 of the case ---" in dmesg


# flavour -> what update_size and quiesce must say there (None: it works)
CTRL = {
    "cloud": ("this kernel's ublk_drv lacks UBLK_F_UPDATE_SIZE (Linux 6.14+): UPDATE_SIZE cannot "
              "run here",
              "this kernel's ublk_drv lacks UBLK_F_QUIESCE (Linux 6.15+): QUIESCE_DEV cannot run here"),
    # 7.x has both; `ublk add` does not ask for UBLK_F_QUIESCE, which QUIESCE_DEV needs per device
    "backports": (None, "ubd was added without UBLK_F_QUIESCE: the kernel refuses QUIESCE_DEV for it"),
}


@pytest.mark.parametrize("flavour", [pytest.param(f, marks=[pytest.mark.nightly] if f != "cloud"
                                                  else []) for f in CTRL])
def test_update_size_and_quiesce_run_where_they_can_and_say_why_not(run, flavour):
    size_why, quiesce_why = CTRL[flavour]
    [size] = run(DATA / "ctrl_update_size.toml", flavour=flavour).values()
    if size_why is None:
        assert size.kind == PASSED, report.failure_text(size)
        assert notes(size)["update_size ubd"] == f"{512 << 11} sectors"
    else:
        assert size.kind == EXPECTATION and size.where == "step 2/4 (update_size ubd)"
        assert size.message == size_why
    [quiesce] = run(DATA / "ctrl_quiesce.toml", flavour=flavour).values()
    assert quiesce.kind == EXPECTATION and quiesce.where == "step 2/4 (quiesce ubd)"
    assert quiesce.message == quiesce_why


# --- the fault scenarios against the faults they guard against ----------------------------------
# name -> (file in ubdsrv/, the healthy code, the broken code)
BROKEN = {
    # a loop server that acknowledges FLUSH without fdatasync()
    "ignores_flush": ("targets/loop.py",
                      "prep(tag, op, IORING_OP_FSYNC, self.fd, op_flags=IORING_FSYNC_DATASYNC)",
                      "return 0"),
    # a fault target whose injected errors reach nobody: the request "succeeds"
    "swallows_errors": ("targets/fault.py", "return -self.errno", "return nr_sectors << 9"),
    # a CLI that leaves the device behind when the server it started dies
    "keeps_failed_device": ("cli.py", "_remove(dev_id, log, daemon_pid, failed_add=True)", "pass"),
}


@pytest.fixture
def broken_server(tmp_path):
    def make(name):
        rel, healthy, broken = BROKEN[name]
        tree = tmp_path / f"server-{name}" / "ubdsrv"
        shutil.copytree(UBDSRV_DIR, tree, ignore=shutil.ignore_patterns("__pycache__"))
        f = tree / rel
        text = f.read_text()
        assert text.count(healthy) == 1, \
            f"ubdsrv/{rel} changed: the {name} patch no longer applies; update BROKEN"
        f.write_text(text.replace(healthy, broken))
        return tree
    return make


@pytest.mark.nightly
def test_power_cut_catches_a_server_that_ignores_flush(run, broken_server):
    [res] = run(SCENARIOS / "power_cut.toml", server_dir=broken_server("ignores_flush")).values()
    assert res.kind == EXPECTATION, report.failure_text(res)
    # red after the cut: the filesystem gone (mkfs's own writes were never made durable), not
    # clean, or acknowledged files lost, depending on how much the data disk committed by itself
    step = int(res.where.split()[1].split("/")[0])
    assert step > 6 and res.where.split("(")[1].split()[0] in ("mount", "fsck", "verify_acked"), \
        res.where
    assert (res.folder / "acked-ubd.txt").read_text().count("\n") > 0


@pytest.mark.nightly
def test_io_errors_catches_a_server_that_swallows_errors(run, broken_server):
    [res] = run(SCENARIOS / "io_errors.toml", server_dir=broken_server("swallows_errors")).values()
    assert res.kind == EXPECTATION, report.failure_text(res)
    assert res.message == "fio job fio5 saw no IO errors"


@pytest.mark.nightly
def test_kill_during_fetch_catches_a_cli_that_keeps_a_failed_device(run, broken_server):
    [res] = run(SCENARIOS / "kill_during_fetch.toml",
                server_dir=broken_server("keeps_failed_device")).values()
    # on 6.12 the kernel's WARN of that path outranks it (kernel/baselines/cloud.toml)
    found = [res.message] + [p.split(": ", 2)[-1] for p in res.problems]
    assert "the failed `ublk add` left early behind" in found, report.failure_text(res)
    assert res.where == "step 1/6 (add early)"
