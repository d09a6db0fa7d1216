"""The kernel's own ublk selftests (tools/testing/selftests/ublk/): which source, and its build.

Source: a kernel tree's own suite; for a Debian flavour, the linux-source-X.Y package of the
guest's kernel (vm/linux_source.py). A source without the suite (Debian's 6.12 carries a single
stray script) falls back to the newest linux-source package of the flavours' suites: kselftests are
meant to run on older kernels, and a test that needs a newer driver skips itself (exit 4).

Build: kublk and the kselftest runner are compiled and installed (make headers; make -C
tools/testing/selftests TARGETS=ublk install) in a build chroot of the guest's release
(vm/buildroot.py), cached by a hash of what the build reads.

The run in the guest is vm/selftests.py."""
import fcntl
import fnmatch
import hashlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from . import buildroot, flavours, linux_source
from .errors import SetupError
from .paths import cache_dir

COLLECTION = "ublk"
SUITE_DIR = Path("tools/testing/selftests/ublk")
SUITE_FILES = ("Makefile", "kublk.c", "test_common.sh")
# what the build reads: a change to any of these rebuilds (paths relative to the tree)
BUILD_INPUTS = ("Makefile", "include/uapi", "arch/x86/include/uapi", "scripts/headers_install.sh",
                "tools/testing/selftests/Makefile", "tools/testing/selftests/lib.mk",
                "tools/testing/selftests/run_kselftest.sh", "tools/testing/selftests/kselftest",
                "tools/testing/selftests/kselftest.h", str(SUITE_DIR))
BUILD_JOBS = 2


@dataclass(frozen=True)
class Source:
    tree: Path
    label: str             # "linux-source-7.3 7.3.4-1~bpo13+1", "tree /src/linux (v7.4-rc1-12-g...)"
    note: str = ""         # why this source, when it is not the kernel's own


# --- which source -------------------------------------------------------------------------------
def has_suite(tree: Path) -> bool:
    return all((Path(tree) / SUITE_DIR / f).is_file() for f in SUITE_FILES)


def check_suite(tree: Path) -> Path:
    if not has_suite(tree):
        raise SetupError(f"{tree}: no ublk selftests (expected {SUITE_DIR}/ with "
                         f"{', '.join(SUITE_FILES)})")
    return Path(tree) / SUITE_DIR


def git_describe(tree: Path) -> str:
    if not (Path(tree) / ".git").exists():
        return ""
    r = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def source_for_tree(tree: Path) -> Source:
    tree = Path(tree).resolve()
    check_suite(tree)
    described = git_describe(tree)
    return Source(tree, f"tree {tree}" + (f" ({described})" if described else ""))


def all_suites() -> list:
    """Every suite a flavour is built from, in flavours.toml order, without repeats."""
    out = []
    for f in flavours.load_all().values():
        out += [s for s in (f.suite,) + f.extra_suites if s not in out]
    return out


def source_for_flavour(flavour_name: str, kernel_release: str, log) -> Source:
    """The linux-source package of the guest's kernel; the newest one when it has no ublk suite."""
    f = flavours.get(flavour_name)
    name, upstream = linux_source.package_for(kernel_release), linux_source.upstream_of(kernel_release)
    series = name[len("linux-source-"):]
    tree = linux_source.cached(series, upstream)
    label = f"{name} {upstream}"
    if tree is None:
        pkg = linux_source.find((f.suite,) + f.extra_suites, name, upstream)
        tree, label = linux_source.ensure(pkg, log), f"{pkg.name} {pkg.version}"
    if has_suite(tree):
        return Source(tree, label)
    newest = linux_source.newest_in(all_suites())
    why = (f"{label} (the kernel's own source) has no ublk selftests ({tree / SUITE_DIR} lacks "
           f"{', '.join(f for f in SUITE_FILES if not (tree / SUITE_DIR / f).is_file())}); "
           f"running those of {newest.name} {newest.version}, the newest Debian source: tests "
           "needing a newer driver skip themselves, or fail and are listed in the flavour's "
           "selftests baseline")
    if newest.name == name:
        raise SetupError(why.split(";")[0] + " and no newer linux-source package exists")
    newer = linux_source.ensure(newest, log)
    check_suite(newer)
    return Source(newer, f"{newest.name} {newest.version}", why)


# --- the build ----------------------------------------------------------------------------------
def source_hash(tree: Path) -> str:
    h = hashlib.sha256()
    for rel in BUILD_INPUTS:
        p = Path(tree) / rel
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else \
            ([p] if p.is_file() else [])
        for q in files:
            h.update(str(q.relative_to(tree)).encode() + b"\0" + q.read_bytes() + b"\0")
    return h.hexdigest()[:16]


BUILD_SCRIPT = """\
make -s -C /src O=/out/kbuild headers
make -C /src/tools/testing/selftests TARGETS={collection} O=/out/kbuild \\
     KSFT_INSTALL_PATH=/out/install USERCFLAGS='-isystem /out/kbuild/usr/include' -j{jobs} install
"""


def build(source: Source, suite: str, log) -> Path:
    """The installed selftests (run_kselftest.sh, kselftest-list.txt, ublk/kublk ...), built in
    the suite's build chroot unless the cache has them for this source."""
    root = buildroot.ensure(suite, log)
    key = f"{source_hash(source.tree)}-{buildroot.recipe_hash(suite)}"
    final = cache_dir() / "selftests" / f"{COLLECTION}-{key}"
    if (final / "install" / "run_kselftest.sh").is_file():
        return final / "install"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "install" / "run_kselftest.sh").is_file():
            return final / "install"
        work = final.parent / f".build-{final.name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        t0 = time.monotonic()
        log(f"  selftests: building kublk from {source.label} in the {suite} chroot "
            f"(log: {final / 'build.log'})")
        try:
            script = BUILD_SCRIPT.format(collection=COLLECTION, jobs=BUILD_JOBS)
            rc = buildroot.run(root, f"nice -n 10 sh -ec {_q(script)}",
                               {"/src": source.tree, "/out": work}, work / "build.log",
                               readonly=("/src",))
            installed = work / "install"
            if rc != 0 or not (installed / COLLECTION / "kublk").is_file():
                tail = (work / "build.log").read_text(errors="replace").splitlines()[-25:]
                failed = final.with_name(final.name + ".failed.log")
                shutil.copyfile(work / "build.log", failed)
                raise SetupError(f"building the ublk selftests of {source.label} failed (exit {rc}); "
                                 f"log {failed}:\n  " + "\n  ".join(tail))
            shutil.rmtree(work / "kbuild")   # headers and objects: only the install is kept
            shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"  selftests: built in {time.monotonic() - t0:.0f} s")
    return final / "install"


def listed_tests(install: Path) -> list:
    """The suite's tests as the kernel's Makefile lists them: ["test_generic_02.sh", ...]."""
    lines = (install / "kselftest-list.txt").read_text().split()
    return [t.split(":", 1)[1] for t in lines if t.startswith(COLLECTION + ":")]


def select(tests, patterns) -> list:
    """Tests whose name contains any of the patterns (shell globs: `stress_0[12]`); all without one."""
    if not patterns:
        return list(tests)
    return [t for t in tests if any(fnmatch.fnmatchcase(t, f"*{p}*") for p in patterns)]


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"

