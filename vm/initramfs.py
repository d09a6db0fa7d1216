"""A minimal initramfs: static busybox, the root disk's modules, and vm/initramfs_init.sh.

The distribution's initramfs runs udev and scripts that cost seconds under TCG; the bench only needs
virtio_blk (and whatever modules.dep says it depends on) before it can mount /dev/vda."""
import gzip
import io
import lzma
import os
from pathlib import Path

INIT_SCRIPT = Path(__file__).with_name("initramfs_init.sh")
ROOT_MODULES = ("virtio_blk",)


def _module_paths(moddir: Path, names) -> list:
    """Relative module paths for names and their dependencies, dependencies first."""
    deps = {}
    by_name = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = os.path.basename(path).split(".ko")[0].replace("-", "_")
        by_name[base] = path
    order = []

    def visit(path):
        if path in order:
            return
        for dep in deps.get(path, ()):
            visit(dep)
        order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
    return order


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    if path.suffix == ".zst":
        raise RuntimeError(f"zstd-compressed module {path} is not supported by the bench's initramfs")
    return data


class _Cpio:
    """Writer for the newc cpio format the kernel unpacks."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_b), 0))
        self.ino += 1
        self.buf.write(hdr.encode() + name_b)
        self.buf.write(b"\0" * (-(110 + len(name_b)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name):
        self._entry(name, 0o040755)

    def chardev(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def file(self, name, data, mode=0o644):
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def _common(cpio: _Cpio, busybox: bytes):
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules", "kmods"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)  # the kernel opens it for init's stdio before /init runs
    cpio.file("bin/busybox", busybox, 0o755)
    cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)


def _add_root_modules(cpio: _Cpio, moddir: Path) -> list:
    names = []
    for rel in _module_paths(moddir, ROOT_MODULES):
        name = os.path.basename(rel).split(".ko")[0] + ".ko"
        cpio.file("modules/" + name, _read_module(moddir / rel))
        names.append(name)
    cpio.file("modules.list", ("\n".join(names) + "\n").encode())
    return names


def build(rootfs: Path, kernel_release: str, out: Path) -> list:
    """Writes a gzip'd initramfs to out; returns the module names it loads."""
    cpio = _Cpio()
    _common(cpio, (rootfs / "bin/busybox").read_bytes())
    names = _add_root_modules(cpio, rootfs / "lib/modules" / kernel_release)
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
    return names


def build_for_tree(busybox: Path, staging: Path, kernel_release: str, out: Path) -> list:
    """The initramfs of a kernel built from a tree: the root disk's modules as above, and the
    kernel's whole module tree (`staging` from modules_install) under kmods/, which the init
    script copies into the root filesystem, whose /usr/lib/modules has nothing for this kernel."""
    moddir = staging / "lib/modules" / kernel_release
    if not (moddir / "modules.dep").is_file():
        raise RuntimeError(f"{moddir} has no modules.dep: did modules_install run?")
    cpio = _Cpio()
    _common(cpio, busybox.read_bytes())
    names = _add_root_modules(cpio, moddir)
    cpio.dir("kmods/" + kernel_release)
    for p in sorted(moddir.rglob("*")):
        rel = "kmods/" + kernel_release + "/" + str(p.relative_to(moddir))
        if p.is_symlink():
            continue  # build/source links point into the host's tree
        if p.is_dir():
            cpio.dir(rel)
        else:
            cpio.file(rel, p.read_bytes())
    out.write_bytes(gzip.compress(cpio.finish(), compresslevel=6))
    return names
