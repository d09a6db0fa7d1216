"""A Debian build chroot with the guest's userspace (its release, glibc and liburing), made with the
image machinery (image.bootstrap) and cached by a hash of its recipe. Host programs that run in
the guest (the kernel's kublk) are compiled in it natively: far faster than in a TCG guest.

run() executes a command in the chroot inside a private mount namespace, with host directories
bound in; the binds vanish with the namespace, whatever happens to the build."""
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from . import image
from .errors import SetupError
from .kernel_tree import _stop_group   # TERM, then KILL, to the whole process group
from .paths import cache_dir

PACKAGES = ("gcc", "make", "libc6-dev", "liburing-dev", "rsync")
RECIPE_FILES = (Path(__file__),)


def recipe_hash(suite: str) -> str:
    h = hashlib.sha256(repr((suite, PACKAGES)).encode())
    for p in RECIPE_FILES:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def root_dir(suite: str) -> Path:
    return cache_dir() / "buildroots" / f"{suite}-{recipe_hash(suite)}"


def ensure(suite: str, log) -> Path:
    """The chroot for suite, bootstrapped first when its recipe changed or none exists."""
    final = root_dir(suite)
    done = final / ".ubd-ready"
    if done.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.is_file():
            return final
        if os.geteuid() != 0:
            raise SetupError("the build chroot needs root (mmdebstrap --mode=root, chroot)")
        if not shutil.which("mmdebstrap"):
            raise SetupError("mmdebstrap is missing: run vm/setup.sh (or `just setup`) to install it")
        work = final.parent / f".build-{final.name}-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        t0 = time.monotonic()
        log(f"  buildroot: bootstrapping a {suite} build chroot ({', '.join(PACKAGES)}); about a minute")
        try:
            image.bootstrap(work, (suite,), PACKAGES, log)
            (work / ".ubd-ready").write_text(f"{suite} {' '.join(PACKAGES)}\n")
            shutil.rmtree(final, ignore_errors=True)
            os.rename(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log(f"  buildroot: ready in {time.monotonic() - t0:.0f} s: {final}")
    return final


def run(root: Path, script: str, binds: dict, log_path: Path, readonly=()) -> int:
    """Runs script (sh) in the chroot with binds {inside: host dir}; output appended to log_path.
    The inside paths are created in the chroot; those in readonly are bound read-only."""
    mounts = []
    for inside, host in binds.items():
        (root / inside.lstrip("/")).mkdir(parents=True, exist_ok=True)
        opts = "bind,ro" if inside in readonly else "bind"
        mounts.append(f"mount -o {opts} {shlex.quote(str(host))} {shlex.quote(str(root) + inside)}")
    outer = " && ".join(mounts + [f"mount -t proc proc {shlex.quote(str(root / 'proc'))}",
                                  f"exec chroot {shlex.quote(str(root))} /bin/sh -ec "
                                  f"{shlex.quote(script)}"])
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8",
           "HOME": "/root"}
    with open(log_path, "a") as log:
        log.write(f"\n$ (chroot {root}) {script}\n")
        log.flush()
        # its own process group, so that an interrupt stops every compiler make started
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-ec", outer],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            _stop_group(proc)
            raise

