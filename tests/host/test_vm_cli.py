"""Bad input to the host commands: one clear message, exit status 2, and no QEMU started."""
import subprocess
import sys

from vm import machine
from vm.errors import SetupError
from vm.paths import REPO


def _qemus():
    r = subprocess.run(["pgrep", "-f", "qemu-system"], capture_output=True, text=True)
    return set(r.stdout.split())


def _vm(*args):
    return subprocess.run([sys.executable, "-m", "vm", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_unknown_flavour_exits_2_without_a_vm():
    before = _qemus()
    r = _vm("exec", "--flavour", "nope", "--", "true")
    assert r.returncode == 2
    assert "unknown kernel flavour 'nope'" in r.stderr and "kernel/flavours.toml" in r.stderr
    assert _qemus() <= before


def test_exec_without_a_command_exits_2():
    r = _vm("exec", "--")
    assert r.returncode == 2 and "no command given" in r.stderr


def test_missing_qemu_is_a_setup_error_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    m = machine.Machine(image=None, run_dir=tmp_path)
    try:
        m.start()
    except SetupError as e:
        assert "qemu-system-x86_64 is not installed" in str(e) and "setup" in str(e)
    else:
        raise AssertionError("start() without QEMU did not fail")


def test_failed_image_build_exits_2_and_leaves_no_cache_entry(tmp_path):
    env = dict(__import__("os").environ, UBD_CACHE=str(tmp_path),
               UBD_DEBIAN_MIRROR="http://127.0.0.1:9/debian")  # nothing listens on port 9
    r = subprocess.run([sys.executable, "-m", "vm", "image"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stderr
    assert "image build failed while running mmdebstrap" in r.stderr
    left = [p.name for p in (tmp_path / "images").iterdir() if p.name != ".lock"]
    assert left == []
