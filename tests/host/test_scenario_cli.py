"""The front door: names as users type them, listing, and malformed files stopping before any VM."""
import os
import subprocess
import sys

import pytest

from vm.paths import REPO
from vm.scenario import catalog, cli, runner
from vm.scenario.errors import ScenarioError

BROKEN = REPO / "tests/data/scenarios"


@pytest.fixture
def no_vm(monkeypatch):
    """Any attempt to create a guest fails the test."""
    def refuse(*a, **kw):
        raise AssertionError("a guest was started")
    monkeypatch.setattr(runner, "Guest", refuse)
    monkeypatch.setattr(runner.GuestPool, "acquire", refuse)


@pytest.mark.parametrize("name", ["scenario/kill_daemon", "scenarios/kill_daemon",
                                  "scenarios/kill_daemon.toml", "kill_daemon",
                                  str(REPO / "scenarios/kill_daemon.toml")])
def test_names_users_type(name):
    path, variant = catalog.resolve(name)
    assert path == REPO / "scenarios/kill_daemon.toml" and variant is None


def test_variant_selector():
    path, variant = catalog.resolve("scenario/kill_daemon[target=loop]")
    assert path.stem == "kill_daemon" and variant == "target=loop"
    [case] = cli.load_cases(["kill_daemon[target=loop]"])
    assert case.id == "kill_daemon[target=loop]"


def test_unknown_name_suggests():
    with pytest.raises(ScenarioError) as e:
        catalog.resolve("kill_deamon")
    assert 'did you mean "kill_daemon"' in str(e.value)


def test_run_without_a_name_lists_with_descriptions(capsys, no_vm):
    assert cli.main(["run"]) == 0
    out = capsys.readouterr().out
    for name in ("kill_daemon", "heavy_io_delete", "mq_loop", "kill_daemon_recover"):
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20   # the description follows the name


@pytest.mark.parametrize("file,key", [
    ("syntax_error.toml", "not valid TOML"), ("unknown_step.toml", "steps[1].do"),
    ("wrong_type.toml", "devices.ubd.queues"), ("missing_device.toml", "steps[1].device"),
    ("out_of_range.toml", "devices.ubd.depth"), ("bad_signal.toml", "steps[1].signal"),
])
def test_malformed_file_exits_2_before_any_vm(file, key, capsys, no_vm, tmp_path):
    status = cli.main(["run", str(BROKEN / file), "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert status == 2
    assert str(BROKEN / file) in err and key in err
    assert not (tmp_path / "r").exists()   # no run folder either: nothing started


def test_one_bad_file_stops_the_whole_run(capsys, no_vm):
    assert cli.main(["run", "kill_daemon", str(BROKEN / "wrong_type.toml")]) == 2
    assert "devices.ubd.queues" in capsys.readouterr().err


def test_malformed_file_spawns_no_qemu(tmp_path):
    """The real entry point, with a qemu on PATH that leaves a mark if it is ever run."""
    fake = tmp_path / "bin"
    fake.mkdir()
    mark = tmp_path / "qemu-was-run"
    for name in ("qemu-system-x86_64", "qemu-img"):
        (fake / name).write_text(f"#!/bin/sh\ntouch {mark}\nexit 1\n")
        (fake / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")
    r = subprocess.run([sys.executable, "-m", "vm.scenario", "run",
                        str(BROKEN / "unknown_step.toml")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "unknown_step.toml: steps[1].do: unknown step kind 'kil'" in r.stderr
    assert not mark.exists()


def test_check_validates_shipped_scenarios(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "kill_daemon[target=null]" in out and "heavy_io_delete[target=loop,need_get_data=1]" in out


def test_unknown_variant_is_bad_input(capsys, no_vm):
    assert cli.main(["run", "kill_daemon[target=zram]"]) == 2
    assert "target=null" in capsys.readouterr().err


def test_repeat_runs_every_case_n_times_and_writes_the_run_folder(tmp_path, monkeypatch, capsys):
    from vm.scenario.result import CaseResult

    def fake_run_case(self, case, n=1, total=1, repeat=None):
        return CaseResult(id=case.id + (f"#{repeat}" if repeat else ""), scenario=case.scenario,
                          variant=case.variant, description=case.description, duration=0.1)
    monkeypatch.setattr(runner.Runner, "run_case", fake_run_case)
    status = cli.main(["run", "kill_daemon", "--repeat", "2", "--results", str(tmp_path)])
    assert status == 0
    import json
    doc = json.loads((tmp_path / "result.json").read_text())
    assert [c["id"] for c in doc["cases"]] == [
        "kill_daemon[target=null]#1", "kill_daemon[target=null]#2",
        "kill_daemon[target=loop]#1", "kill_daemon[target=loop]#2"]
    assert (tmp_path / "junit.xml").is_file()
    assert "4 passed, 0 failed" in capsys.readouterr().out
