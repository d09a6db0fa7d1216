"""The guest image: a Debian trixie root filesystem built with mmdebstrap, cached by recipe hash.

A cache entry is a directory holding rootfs.img (ext4, never written after the build: guests boot on
throw-away qcow2 overlays), vmlinuz, initrd.img, the SSH client key and the guest's host key. It is
built under a temporary name and renamed into place, so a failed or interrupted build leaves nothing
that looks valid."""
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import flavours, initramfs
from .errors import SetupError
from .mirror import debian_mirror
from .paths import GUESTFS_DIR, cache_dir

PACKAGES = (
    "python3", "openssh-server", "fio", "util-linux", "e2fsprogs", "xfsprogs", "kmod", "udev",
    "procps", "busybox-static", "iproute2", "psmisc",
    "liburing2", "fdisk",   # the kernel's ublk selftests: kublk links liburing; test_part_* uses sfdisk
)
# The `profile` variant (a cache entry of its own): perf, and the sysctls it needs to see kernel
# symbols and other processes, applied by the guest's sysinit.
PROFILE_PACKAGES = ("linux-perf",)
PROFILE_SYSCTL = "kernel.kptr_restrict = 0\nkernel.perf_event_paranoid = -1\n"
ROOTFS_SIZE = "4G"  # sparse; room for the backing files scenarios create
# Files whose content defines the image: change one and the cache key changes.
RECIPE_FILES = (Path(__file__), Path(initramfs.__file__), initramfs.INIT_SCRIPT)


@dataclass(frozen=True)
class Image:
    dir: Path
    flavour: str
    kernel_release: str

    @property
    def rootfs(self): return self.dir / "rootfs.img"
    @property
    def kernel(self): return self.dir / "vmlinuz"
    @property
    def initrd(self): return self.dir / "initrd.img"
    @property
    def client_key(self): return self.dir / "id_ed25519"
    @property
    def host_key_pub(self): return self.dir / "ssh_host_ed25519_key.pub"


def recipe_hash(flavour: flavours.Flavour, profile: bool = False) -> str:
    h = hashlib.sha256()
    h.update(repr((flavour, PACKAGES, ROOTFS_SIZE)).encode())
    if profile:
        h.update(repr((PROFILE_PACKAGES, PROFILE_SYSCTL)).encode())
    for p in RECIPE_FILES:
        h.update(p.name.encode() + p.read_bytes())
    for p in sorted(p for p in GUESTFS_DIR.rglob("*") if p.is_file()):
        h.update(str(p.relative_to(GUESTFS_DIR)).encode() + oct(p.stat().st_mode & 0o111).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _entry_dir(flavour: flavours.Flavour, profile: bool = False) -> Path:
    variant = "-profile" if profile else ""
    return cache_dir() / "images" / f"{flavour.name}{variant}-{recipe_hash(flavour, profile)}"


def _packages(flavour: flavours.Flavour, profile: bool) -> tuple:
    """The kernel, the bench's packages and, for `profile`, perf from the kernel's own suite."""
    suite = flavour.kernel_package.partition("/")[2]
    extra = tuple(p + (f"/{suite}" if suite else "") for p in PROFILE_PACKAGES) if profile else ()
    return (flavour.kernel_package,) + PACKAGES + extra


def _load(d: Path) -> Image:
    meta = json.loads((d / "manifest.json").read_text())
    return Image(dir=d, flavour=meta["flavour"], kernel_release=meta["kernel_release"])


def ensure(flavour_name: str = flavours.DEFAULT, rebuild: bool = False, log=None,
           profile: bool = False) -> Image:
    """The cached image for a flavour (its `profile` variant: with perf), built first if the recipe
    changed or none exists."""
    flavour = flavours.get(flavour_name)
    final = _entry_dir(flavour, profile)
    if not rebuild and (final / "manifest.json").is_file():
        return _load(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; a waiter finds the result
        if not rebuild and (final / "manifest.json").is_file():
            return _load(final)
        _build(flavour, final, log or _stderr, profile)
    return _load(final)


def _stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _run(cmd, log, what, **kw):
    """Runs a build command, streaming mmdebstrap's progress lines; raises SetupError with the tail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    tail = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-30:]
        if line.startswith("I: ") and log:
            log(f"  image: {line[3:]}")
    if proc.wait() != 0:
        raise SetupError(f"image build failed while {what} (exit {proc.returncode}):\n  " +
                         "\n  ".join(tail))


def bootstrap(root: Path, suites, packages, log, extra_args=()):
    """A Debian root filesystem at root from the bench's mirror (the guest's, or a build chroot's):
    suites[0] is the release, the rest are added sources (backports)."""
    mirror = debian_mirror()
    cmd = ["mmdebstrap", "--mode=root", "--variant=apt", "--include=" + ",".join(packages),
           *extra_args,
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
           "--dpkgopt=path-exclude=/usr/share/locale/*",
           suites[0], str(root)] + [f"deb {mirror} {s} main" for s in suites]
    _run(cmd, log, "running mmdebstrap")


def _build(flavour, final: Path, log, profile=False):
    if os.geteuid() != 0:
        raise SetupError("building the guest image needs root (mmdebstrap --mode=root, mkfs.ext4 -d)")
    for tool in ("mmdebstrap", "mkfs.ext4"):
        if not shutil.which(tool):
            raise SetupError(f"{tool} is missing: run vm/setup.sh (or `just setup`) to install it")
    mirror = debian_mirror()
    work = final.parent / f".build-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    log(f"building guest image {final.name} from {mirror} (suite {flavour.suite}); takes about a minute")
    try:
        root = work / "root"
        # The bench boots with its own initramfs: skip the distribution's (slow to build).
        bootstrap(root, (flavour.suite,) + flavour.extra_suites, _packages(flavour, profile),
                  log, ["--essential-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --add "
                        "/usr/sbin/update-initramfs && ln -sf /bin/true \"$1/usr/sbin/update-initramfs\""])
        release = _customize(root, work)
        if profile:
            _add_profiling(root)
        initramfs.build(root, release, work / "initrd.img")
        shutil.copy(root / "boot" / f"vmlinuz-{release}", work / "vmlinuz")
        log("  image: writing the ext4 root filesystem")
        _run(["mkfs.ext4", "-q", "-F", "-L", "ubdroot", "-d", str(root), str(work / "rootfs.img"),
              ROOTFS_SIZE], log, "making the root filesystem")
        shutil.rmtree(root)
        (work / "rootfs.img").chmod(0o444)
        seconds = round(time.monotonic() - started, 1)
        (work / "manifest.json").write_text(json.dumps({
            "flavour": flavour.name, "kernel_release": release, "mirror": mirror,
            "packages": list(_packages(flavour, profile)), "build_seconds": seconds,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
        log(f"guest image ready in {seconds} s: {final}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _customize(root: Path, work: Path) -> str:
    """Installs the bench's guest files and fresh keys; returns the kernel release."""
    releases = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(releases) != 1:
        raise SetupError(f"expected one kernel in the image, found {releases or 'none'}")
    shutil.copytree(GUESTFS_DIR, root, dirs_exist_ok=True, symlinks=True)
    (root / "etc/hostname").write_text("ubd-guest\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 ubd-guest\n")
    # Fresh keys per image: the guest's host key (pinned by the client) and the client's own key.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    subprocess.run(["chroot", str(root), "ssh-keygen", "-q", "-t", "ed25519", "-N", "",
                    "-f", "/etc/ssh/ssh_host_ed25519_key"], check=True)
    subprocess.run(["chroot", str(root), "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                    "ubd-bench", "-f", "/root/bench_client_key"], check=True)
    for name in ("bench_client_key", "bench_client_key.pub"):
        shutil.move(root / "root" / name, work / ("id_ed25519" + name[len("bench_client_key"):]))
    (work / "id_ed25519").chmod(0o600)
    (work / "id_ed25519.pub").chmod(0o600)
    shutil.copy(root / "etc/ssh/ssh_host_ed25519_key.pub", work / "ssh_host_ed25519_key.pub")
    (work / "ssh_host_ed25519_key.pub").chmod(0o600)
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    (ssh_dir / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
    (ssh_dir / "authorized_keys").chmod(0o600)
    (root / "etc/ssh/sshd_config.d/ubd.conf").write_text(
        (root / "etc/ssh/sshd_config.d/ubd.conf").read_text() +
        "HostKey /etc/ssh/ssh_host_ed25519_key\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw 0 1\n")
    (root / "opt/ubd").mkdir(parents=True, exist_ok=True)
    return releases[0]


def _add_profiling(root: Path):
    conf = root / "etc/sysctl.d/90-ubd-profile.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(PROFILE_SYSCTL)
    sysinit = root / "usr/local/sbin/ubd-sysinit"
    sysinit.write_text(sysinit.read_text() + f"sysctl -q -p /{conf.relative_to(root)}\n")
