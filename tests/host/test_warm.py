"""Warm start, host side (vm/warm.py): what the saved state's key is made of, when a guest starts
warm or boots cold, that a state appears whole or not at all, and --cold on every front end.
No VM is started here (tests/guest/test_warm_start.py restores real guests)."""
import os
from pathlib import Path

import pytest

from vm import machine as machine_mod, warm
from vm.guest import GuestOptions
from vm.image import Image
from vm.machine import Machine
from vm import options

from .test_guest_options import _argparse_front_ends, clean_env  # noqa: F401 (fixture)


@pytest.fixture
def fake_qemu(monkeypatch):
    """QEMU's binary and version as the key sees them, without running QEMU."""
    monkeypatch.setattr(machine_mod.shutil, "which", lambda name: "/usr/bin/" + name)
    version = {"text": "QEMU emulator version 7.2.22"}
    monkeypatch.setattr(warm, "qemu_version", lambda qemu: version["text"])
    return version


def _image(root: Path, name="cloud-0123456789abcdef") -> Image:
    d = root / name
    d.mkdir(parents=True)
    for f, content in (("vmlinuz", b"kernel"), ("initrd.img", b"initrd"), ("rootfs.img", b"root")):
        (d / f).write_bytes(content)
    return Image(dir=d, flavour="cloud", kernel_release="6.12.0")


def _key(img, run_dir, **kw) -> str:
    shape = dict(cpus=2, memory="2G", accel="tcg", data_disk=False)
    shape.update(kw)
    m = Machine(img, run_dir, log=lambda msg: None, **shape)
    try:
        st = m.warm_state()
        assert st.dir.parent == img.dir, "the state lives next to its image"
        return st.dir.name
    finally:
        m.kill()


def test_key_is_the_same_for_two_guests_of_one_shape(tmp_path, fake_qemu):
    img = _image(tmp_path)
    assert _key(img, tmp_path / "guest-1") == _key(img, tmp_path / "elsewhere" / "guest-2")


@pytest.mark.parametrize("change", [dict(cpus=4), dict(memory="3G"), dict(accel="kvm"),
                                    dict(data_disk=True), dict(append="ublk.foo=1")])
def test_key_changes_with_the_machine_shape(tmp_path, fake_qemu, monkeypatch, change):
    monkeypatch.setattr(Machine, "_choose_accel", lambda self, qemu: self.requested_accel)
    img = _image(tmp_path)
    assert _key(img, tmp_path / "g") != _key(img, tmp_path / "g", **change)


def test_key_changes_with_the_qemu_version(tmp_path, fake_qemu):
    img = _image(tmp_path)
    before = _key(img, tmp_path / "g")
    fake_qemu["text"] = "QEMU emulator version 8.2.0"
    assert _key(img, tmp_path / "g") != before


def test_key_changes_with_the_image_and_its_kernel(tmp_path, fake_qemu):
    img = _image(tmp_path)
    before = _key(img, tmp_path / "g")
    other = _image(tmp_path, "cloud-fedcba9876543210")   # another recipe: another image folder
    assert _key(other, tmp_path / "g") != before
    # a kernel tree rebuilt in place: same path, another kernel file
    (img.dir / "vmlinuz").write_bytes(b"rebuilt kernel")
    assert _key(img, tmp_path / "g") != before


def test_key_follows_a_symlinked_root_filesystem(tmp_path, fake_qemu):
    """A --kernel-tree image links the flavour's rootfs.img: the key follows the real file."""
    img = _image(tmp_path)
    before = _key(img, tmp_path / "g")
    real = tmp_path / "base-rootfs.img"
    real.write_bytes(b"another root")
    (img.dir / "rootfs.img").unlink()
    (img.dir / "rootfs.img").symlink_to(real)
    assert _key(img, tmp_path / "g") != before


def _complete(state: warm.State):
    state.dir.mkdir(parents=True)
    for f in (state.vmstate, state.root, state.meta):
        f.write_text("x")


def test_decide_restores_only_a_complete_state(tmp_path):
    state = warm.state_for(tmp_path, "k")
    d = warm.decide(cold=False, prepared_image=False, state=state)
    assert d.state is None and d.save_after_boot and str(state.dir) in d.why_cold
    state.dir.mkdir()
    state.vmstate.write_text("half a state")   # no meta.json, no root.qcow2
    assert warm.decide(False, False, state).state is None
    state.root.write_text("x")
    state.meta.write_text("{}")
    assert warm.decide(False, False, state).state == state


def test_decide_boots_cold_when_asked_or_for_a_prepared_image(tmp_path):
    state = warm.state_for(tmp_path, "k")
    _complete(state)
    cold = warm.decide(cold=True, prepared_image=False, state=state)
    assert cold.state is None and not cold.save_after_boot and "--cold" in cold.why_cold
    mutant = warm.decide(cold=False, prepared_image=True, state=None)
    assert mutant.state is None and not mutant.save_after_boot


def test_publish_is_all_or_nothing(tmp_path):
    final = warm.state_for(tmp_path, "k")
    first, second = tmp_path / ".tmp-1", tmp_path / ".tmp-2"
    for d, text in ((first, "first"), (second, "second")):
        d.mkdir()
        (d / "vmstate").write_text(text)
    assert warm.publish(first, final.dir)
    assert not first.exists() and (final.dir / "vmstate").read_text() == "first"
    # another run finishing later does not replace (or mix into) the published state
    assert not warm.publish(second, final.dir)
    assert not second.exists() and (final.dir / "vmstate").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.dir.name]


def test_save_lock_lets_one_saver_in(tmp_path):
    state = warm.state_for(tmp_path, "k")
    with warm.SaveLock(state) as first:
        with warm.SaveLock(state) as second:
            assert first and not second
    with warm.SaveLock(state) as again:
        assert again


def test_data_disk_untouched(tmp_path):
    disk = tmp_path / "data.raw"
    with open(disk, "wb") as f:
        f.truncate(machine_mod.DATA_DISK_SIZE)
    assert warm.data_disk_untouched(disk)
    assert warm.data_disk_untouched(None)
    with open(disk, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\0ext4")
    assert not warm.data_disk_untouched(disk)


def test_say_once(monkeypatch):
    monkeypatch.setattr(warm, "_said", set())
    said = []
    for _ in range(3):
        warm.say_once(said.append, "warm start: no saved state")
    warm.say_once(said.append, "warm start: another reason")
    assert said == ["warm start: no saved state", "warm start: another reason"]


@pytest.mark.parametrize("shell", ["bash", "dash"])
@pytest.mark.parametrize("vmgenid", [True, False])
def test_after_restore_command_sets_the_clock_writes_the_seed_and_reseeds(tmp_path, monkeypatch,
                                                                           shell, vmgenid):
    """Runs the command in a host shell, with `date` and `python3` replaced by recorders and the
    vmgenid device folder faked: the clock is set to the host's time, every seed byte reaches
    /dev/urandom through printf, and python3 (the explicit reseed) runs only without vmgenid."""
    import subprocess
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for prog in ("date", "python3"):
        (bin_dir / prog).write_text(f'#!/bin/sh\necho "{prog} $*" >> {calls}\n')
        (bin_dir / prog).chmod(0o755)
    drivers = tmp_path / "vmgenid"
    drivers.mkdir()
    if vmgenid:
        (drivers / "QEMUVGID:00").mkdir()
    monkeypatch.setattr(warm, "VMGENID_DEVICES", f"{drivers}/*:*")
    seed = bytes(range(256))[::-1]
    cmd = warm.after_restore_command(1700000000.25, seed)
    # the seed as printf writes it: /dev/urandom swapped for a file to read it back
    written = tmp_path / "urandom"
    assert cmd.count("> /dev/urandom") == 1
    r = subprocess.run([shell, "-c", cmd.replace("> /dev/urandom", f"> {written}")],
                       env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, capture_output=True)
    assert r.returncode == 0, r.stderr
    assert written.read_bytes() == seed
    lines = calls.read_text().splitlines()
    assert lines[0] == "date -s @1700000000.250"
    if vmgenid:
        assert lines == lines[:1]
    else:
        assert lines[1].startswith("python3 -S -c ") and lines[1].endswith(seed.hex())
        assert "0x5207" in lines[1] and len(lines) == 2


def test_cold_on_every_front_end(clean_env):
    assert options.default("cold") is False
    assert GuestOptions().cold is False
    for name, a in _argparse_front_ends():
        assert a.cold is False, name
        assert options.guest_options(a).cold is False, name
    clean_env.setenv("UBD_COLD", "1")
    for name, a in _argparse_front_ends():
        assert a.cold is True, name
        assert options.guest_options(a).cold is True, name


def test_cold_flag(clean_env):
    from vm import __main__ as vm_cli
    a = vm_cli._parser().parse_args(["exec", "--cold", "--", "true"])
    assert a.cold is True and options.values(a)["cold"] is True
    b = vm_cli._parser().parse_args(["bench-boot", "--boots", "2", "--cold"])
    assert b.cold is True and b.boots == 2
