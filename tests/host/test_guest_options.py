"""Guest options defined once (vm/options.py): every front end (`vm`, `vm.scenario`, `bench`, the
pytest plugin of tests/ and scenarios/) takes the same options with the same defaults, honours the
same environment variables, and hands them to the guest it boots. No VM is started here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as bench_cli
from vm import __main__ as vm_cli, flavours, options
from vm.paths import REPO
from vm.scenario import cli as scenario_cli, runner

GUEST_ENV = [o.env for o in options.GUEST]
DEFAULTS = {o.dest: o.default for o in options.GUEST}


@pytest.fixture
def clean_env(monkeypatch):
    for name in GUEST_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def fake_tree(tmp_path):
    """What --kernel-tree checks for: a Makefile and the ublk driver's source."""
    tree = tmp_path / "linux"
    (tree / "drivers/block").mkdir(parents=True)
    (tree / "Makefile").write_text("# not built here\n")
    (tree / "drivers/block/ublk_drv.c").write_text("/* */\n")
    return tree


def _argparse_front_ends():
    """(name, parsed namespace) of every argparse front end that boots a guest."""
    return [("vm exec", vm_cli._parser().parse_args(["exec", "--", "true"])),
            ("vm shell", vm_cli._parser().parse_args(["shell"])),
            ("vm bench-boot", vm_cli._parser().parse_args(["bench-boot"])),
            ("vm.scenario run", scenario_cli.parser().parse_args(["run", "kill_daemon"])),
            ("vm.scenario run-all", scenario_cli.parser().parse_args(["run-all"])),
            ("bench", bench_cli._parser().parse_args([]))]


PROBE = """
import json, os
from vm import options

def pytest_configure(config):
    with open(os.environ["PROBE_OUT"], "w") as f:
        json.dump({o.dest: getattr(config.option, o.dest) for o in options.GUEST}, f, default=str)
"""


def _pytest_front_end(tmp_path, env, *paths):
    """The guest options as the pytest plugin parsed them, for a session over `paths`."""
    (tmp_path / "ubd_probe.py").write_text(PROBE)
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "ubd_probe", "-p", "no:cacheprovider",
                        "--collect-only", "-q", *paths], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=dict(env, PYTHONPATH=f"{tmp_path}:{REPO}", PROBE_OUT=str(out)))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.loads(out.read_text())


def _pytest_front_ends(tmp_path, env):
    """tests/conftest.py alone, scenarios/conftest.py alone, and both in one session."""
    return [(f"pytest {' '.join(p)}", _pytest_front_end(tmp_path, env, *p))
            for p in (["tests/host/test_device.py"], ["scenarios"],
                      ["tests/host/test_device.py", "scenarios"])]


def _guest_values(ns) -> dict:
    return {o.dest: getattr(ns, o.dest) for o in options.GUEST}


def test_every_front_end_takes_the_same_options_with_the_same_defaults(clean_env, tmp_path):
    assert DEFAULTS["flavour"] == flavours.DEFAULT
    for name, ns in _argparse_front_ends():
        assert _guest_values(ns) == DEFAULTS, name
    env = {k: v for k, v in os.environ.items() if k not in GUEST_ENV}
    for name, got in _pytest_front_ends(tmp_path, env):
        assert got == DEFAULTS, name


def test_the_environment_reaches_every_front_end(clean_env, tmp_path, fake_tree):
    env = {"UBD_FLAVOUR": "backports", "UBD_ACCEL": "tcg", "UBD_CPUS": "3", "UBD_MEMORY": "3G",
           "UBD_KERNEL_TREE": str(fake_tree), "UBD_KERNEL_DEBUG": "1"}
    for k, v in env.items():
        clean_env.setenv(k, v)
    want = dict(DEFAULTS, flavour="backports", accel="tcg", cpus=3, memory="3G",
                kernel_tree=fake_tree.resolve(), kernel_debug=True)
    for name, ns in _argparse_front_ends():
        assert _guest_values(ns) == want, name
    for name, got in _pytest_front_ends(tmp_path, dict(os.environ)):
        assert got == dict(want, kernel_tree=str(fake_tree.resolve())), name


def test_the_command_line_beats_the_environment(clean_env):
    clean_env.setenv("UBD_FLAVOUR", "backports")
    a = scenario_cli.parser().parse_args(["run", "kill_daemon", "--flavour", flavours.DEFAULT])
    assert a.flavour == flavours.DEFAULT


def test_a_bad_value_in_the_environment_stops_every_front_end_with_status_2(clean_env):
    clean_env.setenv("UBD_FLAVOUR", "nope")
    for argv in (["-m", "vm", "exec", "--", "true"], ["-m", "vm.scenario", "run", "kill_daemon"],
                 ["-m", "bench", "--list"]):
        r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, (argv, r.stderr)
        assert "unknown kernel flavour 'nope'" in r.stderr and "UBD_FLAVOUR" in r.stderr, argv


def test_the_options_reach_the_guest_of_each_front_end(clean_env, monkeypatch, tmp_path):
    """UBD_FLAVOUR=backports: the GuestOptions each front end builds name that flavour."""
    clean_env.setenv("UBD_FLAVOUR", "backports")
    clean_env.setenv("UBD_RESULTS", str(tmp_path / "results"))
    seen = []

    class Booted(Exception):
        pass

    def fake_guest(opts):
        seen.append(opts)
        raise Booted

    monkeypatch.setattr(vm_cli, "Guest", fake_guest)
    monkeypatch.setattr("vm.guest.Guest", fake_guest)   # bench imports it when it runs
    monkeypatch.setattr(runner, "Guest", fake_guest)
    with pytest.raises(Booted):
        vm_cli.cmd_exec(vm_cli._parser().parse_args(["exec", "--", "true"]))
    with pytest.raises(Booted):
        bench_cli._main(bench_cli._parser().parse_args(["--quick"]))
    with pytest.raises(Booted):
        scenario_cli.main(["run", "kill_daemon[target=null]"])
    assert [o.flavour for o in seen] == ["backports"] * 3
    # the run folders of bench and vm.scenario are new ones under UBD_RESULTS (vm exec keeps none)
    names = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert len(names) == 2 and names[0][:2].isdigit() and names[1].startswith("bench-"), names


def test_pytest_run_folder_is_shared_and_under_ubd_results(clean_env, tmp_path):
    clean_env.setenv("UBD_RESULTS", str(tmp_path))

    class Config:
        option = type("O", (), {"results": None})()
    c = Config()
    first = options.pytest_run_dir(c)
    assert first.parent == tmp_path and first.name.startswith("pytest-")
    assert options.pytest_run_dir(c) == first
    assert Path(c.option.results) == first


def test_the_readme_table_names_every_guest_option_and_its_variable():
    text = (REPO / "README.md").read_text()
    for o in options.GUEST:
        row = next((line for line in text.splitlines() if line.startswith(f"| `{o.flag}")), None)
        assert row is not None, f"README.md: no row for {o.flag} in the guest options table"
        assert f"`{o.env}" in row, f"README.md: the {o.flag} row does not name {o.env}"
