"""A guest kernel built from the user's own source tree, booted on a flavour's root filesystem.

The build is out of tree (make O=...) in the cache, so the user's tree is only read and a rerun
after an edit recompiles what changed. The config is x86_64 defconfig plus kernel/ubd.config (the
virtio bits built in, ublk_drv and null_blk as modules, as in Debian's kernels) and, with debug,
kernel/debug.config. The modules travel in the initramfs, which copies them into the guest's root
(a throw-away overlay) before its init runs: `modprobe ublk_drv` and `modprobe -r` work as usual.

The result is an image cache entry of its own: the built kernel and initramfs, and links to the base
image's root filesystem and SSH keys."""
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import initramfs
from .errors import SetupError
from .image import Image
from .paths import KERNEL_DIR, REPO, cache_dir

# options that must come out as written in ubd.config, or the guest cannot boot or test the driver
REQUIRED = ("CONFIG_BLK_DEV_UBLK", "CONFIG_VIRTIO_BLK", "CONFIG_VIRTIO_NET", "CONFIG_VIRTIO_PCI",
            "CONFIG_EXT4_FS", "CONFIG_DEVTMPFS", "CONFIG_IO_URING", "CONFIG_SERIAL_8250_CONSOLE")
LINKED_FROM_BASE = ("rootfs.img", "id_ed25519", "ssh_host_ed25519_key.pub")
DRIVER_SOURCE = "drivers/block/ublk_drv.c"
DRIVER_MODULE = "kernel/drivers/block/ublk_drv.ko"   # its place in the installed module tree


def _log_default(msg):
    print(msg, file=sys.stderr, flush=True)


def check_tree(tree: Path) -> Path:
    tree = Path(tree).expanduser().resolve()
    if not (tree / "Makefile").is_file() or not (tree / DRIVER_SOURCE).is_file():
        raise SetupError(f"--kernel-tree {tree}: not a Linux source tree with the ublk driver "
                         f"(expected Makefile and {DRIVER_SOURCE})")
    return tree


def fragments(debug: bool) -> list:
    return [KERNEL_DIR / "ubd.config"] + ([KERNEL_DIR / "debug.config"] if debug else [])


def parse_config(text: str) -> dict:
    """CONFIG_X -> 'y' / 'm' / value / 'n' (for '# CONFIG_X is not set')."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(CONFIG_\w+)=(.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = re.match(r"# (CONFIG_\w+) is not set", line)
        if m:
            out[m.group(1)] = "n"
    return out


def config_mismatches(wanted: dict, got: dict) -> list:
    """The options of a fragment that did not come out as asked (a dependency was missing)."""
    return [f"{k}: asked {v}, got {got.get(k, 'n')}" for k, v in wanted.items() if got.get(k, "n") != v]


def _entry_dir(tree: Path, debug: bool) -> Path:
    key = hashlib.sha256(f"{tree}|debug={debug}".encode()).hexdigest()[:12]
    return cache_dir() / "kernels" / f"{tree.name}-{'debug-' if debug else ''}{key}"


def _ensure_build_tools():
    setup = REPO / "vm" / "setup.sh"
    r = subprocess.run(["bash", str(setup), "--kernel-build"])
    if r.returncode != 0:
        raise SetupError("the host lacks the tools to build a kernel (see the setup message above)")


class _Make:
    """make -C tree O=build, its output in build.log, a progress line every 20 s."""

    def __init__(self, tree: Path, out: Path, log_path: Path, log):
        self.tree, self.out, self.log_path, self.log = tree, out, log_path, log

    def __call__(self, *targets, what, capture=False):
        cmd = ["make", "-C", str(self.tree), f"O={self.out}", *targets]
        with open(self.log_path, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            if capture:
                r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
                if r.returncode != 0:
                    raise self._failed(what, r.returncode)
                return r.stdout
            # its own process group, so that an interrupt stops every compiler make started
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            t0 = last = time.monotonic()
            try:
                for line in proc.stdout:
                    f.write(line)
                    now = time.monotonic()
                    if now - last >= 20:
                        last = now
                        self.log(f"  kernel: {what}: {now - t0:.0f} s, at {line.strip()[:90]}")
                rc = proc.wait()
            except BaseException:
                _stop_group(proc)
                raise
        if rc != 0:
            raise self._failed(what, rc)
        return ""

    def _failed(self, what, rc):
        tail = self.log_path.read_text(errors="replace").splitlines()[-25:]
        return SetupError(f"kernel build failed while {what} (exit {rc}); full log {self.log_path}:\n  "
                          + "\n  ".join(tail))


def _stop_group(proc):
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def _configure(make: _Make, out: Path, frags: list, log):
    """defconfig + fragments + olddefconfig, redone when a fragment changed; checks the outcome."""
    stamp = out / ".ubd-fragments"
    want = "".join(p.read_text() for p in frags)
    if (out / ".config").is_file() and stamp.is_file() and stamp.read_text() == want:
        return
    log("  kernel: configuring (x86_64 defconfig + " + " + ".join(f"kernel/{p.name}" for p in frags) + ")")
    make("defconfig", what="making defconfig")
    with open(out / ".config", "a") as f:
        f.write("\n# --- the bench's fragments ---\n" + want)
    make("olddefconfig", what="resolving the config")
    got = parse_config((out / ".config").read_text())
    bad = [(p, b) for p in frags for b in config_mismatches(parse_config(p.read_text()), got)]
    fatal = [b for _, b in bad if b.split(":")[0] in REQUIRED]
    if fatal:
        raise SetupError("the kernel config lacks what the bench needs: " + "; ".join(fatal))
    for p, b in bad:
        log(f"  kernel: note: kernel/{p.name}: {b} (a dependency is off in this tree)")
    stamp.write_text(want)


def _busybox_from(rootfs: Path, dest: Path):
    """The static busybox for the initramfs, read out of the base image with debugfs."""
    r = subprocess.run(["debugfs", "-R", f"dump /bin/busybox {dest}", str(rootfs)],
                       capture_output=True, text=True)
    if r.returncode != 0 or not dest.is_file() or dest.stat().st_size == 0:
        raise SetupError(f"cannot read /bin/busybox out of {rootfs}: {r.stderr.strip()}")


def ensure(tree, base: Image, debug=False, log=None) -> Image:
    """Builds (incrementally) the tree's kernel and returns an image that boots it on base's root."""
    log = log or _log_default
    tree = check_tree(tree)
    _ensure_build_tools()
    entry = _entry_dir(tree, debug)
    (entry / "build").mkdir(parents=True, exist_ok=True)
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per tree and config at a time
        return _build(tree, entry, base, debug, log)


def _build(tree: Path, entry: Path, base: Image, debug: bool, log) -> Image:
    out = entry / "build"
    make = _Make(tree, out, entry / "build.log", log)
    (entry / "build.log").write_text(f"kernel tree {tree}, debug={debug}\n")
    t0 = time.monotonic()
    _configure(make, out, fragments(debug), log)
    log(f"  kernel: building {tree} (log: {entry / 'build.log'}); only what changed is "
        "compiled, a first build takes ~15 min on 2 cores")
    make(f"-j{os.cpu_count() or 2}", "bzImage", "modules", what="compiling")
    release = make("-s", "kernelrelease", what="reading the release", capture=True).strip()
    staging = entry / "modules"
    shutil.rmtree(staging, ignore_errors=True)
    make("modules_install", f"INSTALL_MOD_PATH={staging}", "INSTALL_MOD_STRIP=1",
         what="installing the modules")
    busybox = entry / "busybox"
    if not busybox.is_file():
        _busybox_from(base.rootfs, busybox)
    initramfs.build_for_tree(busybox, staging, release, entry / "initrd.img")
    shutil.copyfile(out / "arch/x86/boot/bzImage", entry / "vmlinuz")
    for name in LINKED_FROM_BASE:
        link = entry / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(base.dir / name)
    (entry / "manifest.json").write_text(json.dumps(
        {"tree": str(tree), "debug": debug, "kernel_release": release, "base": str(base.dir)}, indent=1))
    log(f"  kernel: {release} ready in {time.monotonic() - t0:.0f} s")
    return Image(dir=entry, flavour=f"tree:{tree}", kernel_release=release)


def build_module(tree, src_dir: Path, debug=False, log=None) -> Path:
    """Builds the external module whose Kbuild is in src_dir against the tree's built kernel
    (ensure() first): only src_dir is written, neither the tree nor its build. Returns the .ko."""
    log = log or _log_default
    tree = check_tree(tree)
    entry = _entry_dir(tree, debug)
    if not (entry / "manifest.json").is_file():
        raise SetupError(f"{tree} has no finished build in {entry}: build the tree first")
    src_dir = Path(src_dir).resolve()
    with open(entry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # not while ensure() rebuilds that tree
        _Make(tree, entry / "build", src_dir / "build.log", log)(
            f"M={src_dir}", "modules", what=f"building the module in {src_dir}")
    kos = sorted(src_dir.glob("*.ko"))
    if len(kos) != 1:
        raise SetupError(f"the module build in {src_dir} gave {len(kos)} .ko files, expected one")
    return kos[0]


def with_driver_module(img: Image, ko: Path, out: Path, label: str) -> Image:
    """A tree image (from ensure()) with another ublk_drv.ko: same kernel and root filesystem, its
    own initramfs in out. The module is stripped of debug info as modules_install does."""
    staging = out / "modules"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(img.dir / "modules", staging, symlinks=True)
    dest = staging / "lib/modules" / img.kernel_release / DRIVER_MODULE
    if not dest.is_file():
        raise SetupError(f"{img.dir / 'modules'} has no {DRIVER_MODULE}: is CONFIG_BLK_DEV_UBLK=m?")
    subprocess.run(["strip", "--strip-debug", "-o", str(dest), str(ko)], check=True)
    initramfs.build_for_tree(img.dir / "busybox", staging, img.kernel_release, out / "initrd.img")
    for name in ("vmlinuz",) + LINKED_FROM_BASE:
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to((img.dir / name).resolve())
    (out / "manifest.json").write_text(json.dumps(
        {"from": str(img.dir), "driver_module": str(ko), "kernel_release": img.kernel_release},
        indent=1))
    return Image(dir=out, flavour=f"{img.flavour}+{label}", kernel_release=img.kernel_release)
