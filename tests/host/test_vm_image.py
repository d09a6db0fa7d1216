"""Image recipe pieces that need no VM: the initramfs, the cache key, flavours."""
import gzip
import lzma
import shutil

import pytest

from vm import flavours, image, image_cache, initramfs
from vm.errors import BenchError


def _read_cpio(blob):
    entries, off = {}, 0
    while True:
        hdr = blob[off:off + 110].decode()
        assert hdr[:6] == "070701"
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = blob[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        data = blob[off:off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data, (fields[9], fields[10]))


def test_initramfs_holds_busybox_init_and_modules_in_dependency_order(tmp_path):
    root = tmp_path / "root"
    moddir = root / "lib/modules/6.12.0-test"
    (moddir / "kernel").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "bin/busybox").write_bytes(b"\x7fELF busybox")
    (moddir / "kernel/virtio_blk.ko.xz").write_bytes(lzma.compress(b"BLK"))
    (moddir / "kernel/virtio_ring.ko.xz").write_bytes(lzma.compress(b"RING"))
    (moddir / "kernel/unrelated.ko.xz").write_bytes(lzma.compress(b"NO"))
    (moddir / "modules.dep").write_text(
        "kernel/virtio_blk.ko.xz: kernel/virtio_ring.ko.xz\nkernel/virtio_ring.ko.xz:\n"
        "kernel/unrelated.ko.xz:\n")
    out = tmp_path / "initrd.img"
    names = initramfs.build(root, "6.12.0-test", out)
    assert names == ["virtio_ring.ko", "virtio_blk.ko"]
    files = _read_cpio(gzip.decompress(out.read_bytes()))
    assert files["modules/virtio_blk.ko"][1] == b"BLK"
    assert files["modules/virtio_ring.ko"][1] == b"RING"
    assert "modules/unrelated.ko" not in files
    assert files["modules.list"][1] == b"virtio_ring.ko\nvirtio_blk.ko\n"
    assert files["init"][0] & 0o777 == 0o755 and files["init"][1].startswith(b"#!/bin/busybox sh")
    assert files["dev/console"][2] == (5, 1)


def test_cache_key_follows_the_guest_files(tmp_path, monkeypatch):
    flavour = flavours.get("cloud")
    before = image.recipe_hash(flavour)
    copy = tmp_path / "guestfs"
    shutil.copytree(image.GUESTFS_DIR, copy)
    monkeypatch.setattr(image, "GUESTFS_DIR", copy)
    assert image.recipe_hash(flavour) == before
    (copy / "etc/inittab").write_text((copy / "etc/inittab").read_text() + "# changed\n")
    assert image.recipe_hash(flavour) != before
    assert image.recipe_hash(flavours.get("backports")) != image.recipe_hash(flavour)


def test_unknown_flavour_names_the_known_ones():
    with pytest.raises(BenchError, match=r"unknown kernel flavour 'nope' \(known: backports, cloud"):
        flavours.get("nope")


def test_prune_removes_only_what_no_current_recipe_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("UBD_CACHE", str(tmp_path))
    images = tmp_path / "images"
    current = [image._entry_dir(f) for f in flavours.load_all().values()]
    stale = [images / "cloud-0000000000000000", images / "gone-1111111111111111",
             images / ".build-cloud-2222222222222222-99"]
    for d in current + stale:
        d.mkdir(parents=True)
        (d / "rootfs.img").write_bytes(b"x" * 8192)
    assert image_cache.stale_entries() == sorted(stale)
    removed = []
    freed = image_cache.prune(removed.append)
    assert freed >= 3 * 8192 and len(removed) == 3
    assert all(d.is_dir() for d in current) and not any(d.exists() for d in stale)
