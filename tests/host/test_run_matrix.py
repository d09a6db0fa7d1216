"""run-matrix, --flavour all, -j N and the baselines through the real command line (vm.scenario.cli),
the real loader, baselines and report; only the guest work is a stand-in (Runner.run_case), which
also says which kernel its guest ran, as a booted guest's image does."""
import json
import subprocess
import xml.etree.ElementTree as ET

import pytest

from vm import flavours
from vm.scenario import baseline, cli, kernel_info, runner
from vm.scenario.errors import SPLAT
from vm.scenario.result import CaseResult

RELEASES = {"cloud": "6.12.117+deb13-cloud-amd64", "backports": "7.3.4+deb13-cloud-amd64"}


@pytest.fixture
def fake_guests(monkeypatch):
    """run_case without a guest: every case passes, except those in `failing` (by flavour)."""
    failing, seen = {}, []

    def run_case(self, case, n=1, total=1, repeat=None):
        flavour = self.opts.guest["flavour"]
        self.pool.kernel_release, self.pool.accel_used = RELEASES[flavour], "tcg"
        seen.append((flavour, case.id, self.opts.guest_prefix))
        res = CaseResult(id=case.id, scenario=case.scenario, variant=case.variant,
                         description=case.description, duration=0.1, dir=case.safe_id)
        if case.id in failing.get(flavour, ()):
            res.kind, res.message = SPLAT, "WARNING at ublk_drv.c"
        return res
    monkeypatch.setattr(runner.Runner, "run_case", run_case)
    return failing, seen


def _listed_on_cloud_only():
    cloud, other = baseline.load("cloud").known, baseline.load("backports").known
    only = sorted(set(cloud) - set(other))
    assert only, "kernel/baselines/cloud.toml lists no case that backports.toml does not"
    return only[0]


def test_a_known_failure_is_expected_on_its_kernel_and_a_regression_on_the_other(
        fake_guests, tmp_path, capsys):
    failing, _ = fake_guests
    case = _listed_on_cloud_only()
    failing.update(cloud={case}, backports={case})
    status = cli.main(["run-matrix", case, "--results", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 1   # the regression on backports fails the run
    cloud = json.loads((tmp_path / "cloud" / "result.json").read_text())
    bp = json.loads((tmp_path / "backports" / "result.json").read_text())
    assert [c["verdict"] for c in cloud["cases"]] == [baseline.EXPECTED] and cloud["exit_status"] == 0
    assert [c["verdict"] for c in bp["cases"]] == [baseline.REGRESSION] and bp["exit_status"] == 1
    # the console table: one row, a column per kernel naming the release
    head, _, row = out[out.index("scenario x kernel"):].splitlines()[1:4]
    assert f"cloud {RELEASES['cloud']}" in head and f"backports {RELEASES['backports']}" in head
    assert row.split(None, 1) == [case, row.split(None, 1)[1]]
    assert "expected failure" in row and "REGRESSION" in row
    # JUnit: an expected failure is reported as pytest reports an xfail; the kernel is named
    suite = ET.parse(tmp_path / "cloud" / "junit.xml").getroot()
    assert suite.get("failures") == "0" and suite.find("testcase/skipped") is not None
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["kernel_release"] == RELEASES["cloud"] and props["kernel_accel"] == "tcg"
    assert ET.parse(tmp_path / "backports" / "junit.xml").getroot().get("failures") == "1"


def test_a_listed_case_that_passes_is_reported_and_does_not_fail(fake_guests, tmp_path, capsys):
    case = _listed_on_cloud_only()
    assert cli.main(["run", case, "--flavour", "cloud", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert baseline.UNEXPECTED_PASS in out and f"kernel {RELEASES['cloud']} (flavour cloud, tcg)" in out
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["kernel"] == {"release": RELEASES["cloud"], "flavour": "cloud", "tree": "",
                             "tree_describe": "", "debug": False, "accel": "tcg"}


def test_update_baseline_writes_the_flavours_list(fake_guests, tmp_path, monkeypatch, capsys):
    failing, _ = fake_guests
    monkeypatch.setattr(baseline, "BASELINE_DIR", tmp_path / "baselines")
    failing["backports"] = {"kill_daemon[target=loop]"}
    status = cli.main(["run", "kill_daemon", "--flavour", "backports", "--update-baseline",
                       "--results", str(tmp_path / "run")])
    assert status == 1
    known = baseline.load("backports", tmp_path / "baselines").known
    assert list(known) == ["kill_daemon[target=loop]"] and "kernel splat" in known[
        "kill_daemon[target=loop]"]


def test_flavour_all_runs_every_flavour_and_adds_the_tree(fake_guests, tmp_path, capsys):
    _, seen = fake_guests
    assert cli.main(["run", "kill_daemon[target=null]", "--flavour", "all",
                     "--results", str(tmp_path)]) == 0
    assert sorted({f for f, _, _ in seen}) == sorted(flavours.load_all())
    merged = json.loads((tmp_path / "result.json").read_text())
    assert len(merged["cases"]) == len(flavours.load_all())
    assert (tmp_path / "table.txt").read_text() in capsys.readouterr().out
    tree = tmp_path / "linux"
    (tree / "drivers/block").mkdir(parents=True)
    (tree / "Makefile").write_text("")
    (tree / "drivers/block/ublk_drv.c").write_text("")
    a = cli.parser().parse_args(["run-matrix", "--kernel-tree", str(tree)])
    got = [(t.label, t.guest["flavour"], bool(t.guest["kernel_tree"]), t.baseline)
           for t in cli.targets(a)]
    assert got == [(f, f, False, f) for f in sorted(flavours.load_all())] + \
        [("tree", flavours.DEFAULT, True, None)]


def test_j2_runs_every_case_once_in_two_named_workers_into_one_report(fake_guests, tmp_path):
    _, seen = fake_guests
    assert cli.main(["run", "kill_daemon", "stall_then_delete", "-j", "2", "--flavour", "cloud",
                     "--results", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "result.json").read_text())
    ids = [c["id"] for c in doc["cases"]]
    assert sorted(ids) == sorted(i for _, i, _ in seen) and len(set(ids)) == len(ids) == 4
    assert ids[:2] == ["kill_daemon[target=null]", "kill_daemon[target=loop]"]   # plan order
    assert {p for _, _, p in seen} <= {"w1-", "w2-"} and doc["jobs"] == 2
    assert ET.parse(tmp_path / "junit.xml").getroot().get("tests") == "4"


@pytest.mark.parametrize("argv, what", [(["-j", "0"], "1 to 16"), (["-j", "2", "--keep"], "--keep"),
                                        (["--shard", "3/2"], "--shard"),
                                        (["--flavour", "nope"], "unknown kernel flavour")])
def test_bad_run_options_exit_2_before_any_guest(fake_guests, argv, what, capsys):
    _, seen = fake_guests
    try:
        status = cli.main(["run-all", *argv])
    except SystemExit as e:
        status = e.code
    assert status == 2 and what in capsys.readouterr().err and not seen


def test_git_describe_names_a_dirty_tree(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "Makefile").write_text("a\n")
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    clean = kernel_info.git_describe(tmp_path)
    (tmp_path / "Makefile").write_text("b\n")
    assert clean and not clean.endswith("-dirty")
    assert kernel_info.git_describe(tmp_path) == clean + "-dirty"
    assert kernel_info.git_describe(tmp_path / "nope") == ""
    k = kernel_info.describe({"flavour": "cloud", "kernel_tree": tmp_path, "kernel_debug": True},
                             "7.4.0-rc1", "tcg")
    assert k["debug"] and k["tree_describe"] == clean + "-dirty"
    assert f"at {clean}-dirty, debug build, tcg" in kernel_info.line(k)


def test_a_guest_that_cannot_start_is_a_setup_error_that_stops_the_run(monkeypatch, tmp_path):
    from vm.errors import SetupError
    from vm.scenario.errors import SETUP

    def acquire(self, data_disk=False):
        raise SetupError("the guest did not answer SSH within 120 s")
    monkeypatch.setattr(runner.GuestPool, "acquire", acquire)
    assert cli.main(["run", "kill_daemon", "--flavour", "backports", "--results", str(tmp_path)]) == 2
    [case] = json.loads((tmp_path / "result.json").read_text())["cases"]
    assert case["kind"] == SETUP and "did not answer SSH" in case["message"]
