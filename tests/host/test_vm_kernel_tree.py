"""--kernel-tree pieces that need no compiler or VM: argument checks, the config check, and the
initramfs that carries a built kernel's modules into the guest."""
import gzip
import subprocess
import sys

import pytest

from vm import initramfs, kernel_tree
from vm.errors import SetupError
from vm.paths import REPO

from .test_vm_image import _read_cpio


def test_a_directory_that_is_not_a_kernel_tree_is_refused_before_anything_starts(tmp_path):
    for args in (["exec", "--kernel-tree", str(tmp_path / "missing"), "--", "true"],
                 ["exec", "--kernel-tree", str(tmp_path), "--", "true"]):
        r = subprocess.run([sys.executable, "-m", "vm", *args], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "not a Linux source tree with the ublk driver" in r.stderr
        assert "drivers/block/ublk_drv.c" in r.stderr


def test_check_tree_accepts_a_tree_and_resolves_it(tmp_path):
    (tmp_path / "drivers/block").mkdir(parents=True)
    (tmp_path / "Makefile").write_text("VERSION = 6\n")
    (tmp_path / "drivers/block/ublk_drv.c").write_text("")
    assert kernel_tree.check_tree(str(tmp_path / "drivers" / "..")) == tmp_path.resolve()
    (tmp_path / "Makefile").unlink()
    with pytest.raises(SetupError):
        kernel_tree.check_tree(tmp_path)


def test_config_mismatches_name_the_option_asked_and_got():
    wanted = kernel_tree.parse_config("CONFIG_BLK_DEV_UBLK=m\n# CONFIG_PANIC_ON_OOPS is not set\n"
                                      "CONFIG_KASAN=y\n")
    got = kernel_tree.parse_config("CONFIG_BLK_DEV_UBLK=m\nCONFIG_PANIC_ON_OOPS=y\n")
    assert kernel_tree.config_mismatches(wanted, got) == [
        "CONFIG_PANIC_ON_OOPS: asked n, got y", "CONFIG_KASAN: asked y, got n"]


def test_the_shipped_fragment_asks_for_every_option_the_bench_requires():
    ubd = kernel_tree.parse_config((REPO / "kernel/ubd.config").read_text())
    assert all(ubd.get(k) in ("y", "m") for k in kernel_tree.REQUIRED)
    assert ubd["CONFIG_BLK_DEV_UBLK"] == "m"   # so the health check's modprobe -r runs its exit path


def test_a_tree_initramfs_carries_the_whole_module_tree_but_not_host_links(tmp_path):
    rel = "6.18.0-rc1-dirty"
    moddir = tmp_path / "staging/lib/modules" / rel
    (moddir / "kernel/drivers/block").mkdir(parents=True)
    (moddir / "kernel/drivers/block/ublk_drv.ko").write_bytes(b"UBLK")
    (moddir / "modules.dep").write_text("kernel/drivers/block/ublk_drv.ko:\n")
    (moddir / "modules.builtin").write_text("kernel/drivers/block/virtio_blk.ko\n")
    (moddir / "build").symlink_to(tmp_path)
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF busybox")
    out = tmp_path / "initrd.img"
    names = initramfs.build_for_tree(busybox, tmp_path / "staging", rel, out)
    assert names == []   # virtio_blk is built in: nothing to insmod
    files = _read_cpio(gzip.decompress(out.read_bytes()))
    assert files[f"kmods/{rel}/kernel/drivers/block/ublk_drv.ko"][1] == b"UBLK"
    assert files[f"kmods/{rel}/modules.dep"][1] == b"kernel/drivers/block/ublk_drv.ko:\n"
    assert f"kmods/{rel}/build" not in files
    assert files[f"kmods/{rel}"][0] & 0o170000 == 0o040000
    assert files["bin/busybox"][1] == b"\x7fELF busybox"
    assert b"/kmods/" in files["init"][1]


def test_a_tree_without_modules_install_output_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="no modules.dep"):
        initramfs.build_for_tree(tmp_path / "busybox", tmp_path, "6.18.0", tmp_path / "out")
