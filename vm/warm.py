"""Warm start: a booted, SSH-ready guest saved once, then restored instead of booted.

A saved state is a folder next to the image it was booted from (<image dir>/warm-<key>/):
  vmstate     QEMU's migration stream of the guest (RAM and devices; paused for the last pass)
  root.qcow2  the root overlay at save time, read-only from then on: the base of each restored
              guest's own throw-away overlay (its backing file is the image's rootfs.img)
  console.log the cold boot's console output, for reading a restored guest's boot
  meta.json   what the key was made of
It is written under a temporary name and renamed into place, so a reader sees all of it or none.

The key hashes everything the restored guest must share with the saved one: the QEMU command line
with the per-guest parts (paths, port) blanked out (so cpus, memory, accelerator, data disk, kernel
command line and devices are all in), the identity of the kernel, initrd and root filesystem files,
and QEMU's version. Anything else falls back to a cold boot.

The data disk is not in the state: the state is saved before the guest formats it, so at save time
it is all zeros, which a new sparse file is as well. A restored guest gets a new raw data disk, with
the same cache mode and power-cut behaviour as a cold-booted one."""
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError

STATE_FORMAT = 1         # bump when what a state folder holds changes
RESTORE_DEADLINE = 30.0  # seconds from QEMU's start to SSH-ready; a cold boot follows past it
SAVE_DEADLINE = 120.0
# One SSH attempt on a restored guest waits this long for the banner. Longer than a booting guest's
# 2 s: on a loaded host the first handshake after a restore (nothing translated by TCG yet) takes
# longer, and an attempt given up throws its work away. Not much longer: a SYN lost while user
# networking learns the guest's MAC is resent only after a retransmission timeout.
CONNECT_SECONDS = 6.0
# QEMU's migration is rate-limited (32 MiB/s by default); a local file needs no limit.
SAVE_BANDWIDTH = 8 << 30
# Fresh randomness after a restore: QEMU's vmgenid device gets a new generation ID in each restoring
# QEMU, and the guest kernel's vmgenid driver reseeds the CRNG on it ("crng reseeded due to virtual
# machine fork"). Host bytes are mixed into the pool as well. A kernel without that driver (a
# --kernel-tree build lacking CONFIG_VMGENID) gets RNDADDENTROPY + RNDRESEEDCRNG from python3 instead.
RESEED_BYTES = 64
VMGENID_DEVICES = "/sys/bus/platform/drivers/vmgenid/*:*"   # a bound device, e.g. QEMUVGID:00
RESEED_PY = ("import fcntl,os,struct,sys;b=bytes.fromhex(sys.argv[1]);f=os.open('/dev/urandom',os.O_WRONLY);"
             "fcntl.ioctl(f,0x40085203,struct.pack('ii',len(b)*8,len(b))+b);fcntl.ioctl(f,0x5207)")


def after_restore_command(epoch: float, seed: bytes) -> str:
    """The guest command run first after a restore: sets the wall clock, which stopped at save time,
    and mixes the host's seed bytes into the CRNG (reseeding it where vmgenid did not)."""
    # Under TCG every program started costs a tenth of a second on a just-restored guest, so this
    # is shell built-ins plus `date`: printf writes the seed (octal escapes: bash's and dash's
    # printf both read them), and python3 runs only on a kernel without vmgenid.
    octal = "".join(f"\\{b:03o}" for b in seed)
    return (f"date -s @{epoch:.3f} >/dev/null || exit; printf '{octal}' > /dev/urandom || exit; "
            f"for d in {VMGENID_DEVICES}; do [ -e \"$d\" ] && exit 0; done; "
            f"exec python3 -S -c {shlex.quote(RESEED_PY)} {seed.hex()}")


_said = set()


def say_once(log, msg):
    """Logs msg the first time this process sees it (a run of many guests says a fallback once)."""
    if msg not in _said:
        _said.add(msg)
        log(msg)


_versions = {}


def qemu_version(qemu: str) -> str:
    if qemu not in _versions:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout
        _versions[qemu] = out.splitlines()[0].strip()
    return _versions[qemu]


def file_identity(p: Path) -> list:
    """A file's resolved path, size and mtime: a rebuilt kernel or image is another file."""
    real = Path(p).resolve()
    st = real.stat()
    return [str(real), st.st_size, st.st_mtime_ns]


def state_key(shape_argv: list, files: list, qemu_ver: str) -> str:
    blob = json.dumps({"format": STATE_FORMAT, "argv": list(shape_argv),
                       "files": [file_identity(f) for f in files], "qemu": qemu_ver})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class State:
    dir: Path

    @property
    def vmstate(self): return self.dir / "vmstate"
    @property
    def root(self): return self.dir / "root.qcow2"
    @property
    def console(self): return self.dir / "console.log"
    @property
    def meta(self): return self.dir / "meta.json"

    def complete(self) -> bool:
        return self.meta.is_file() and self.vmstate.is_file() and self.root.is_file()

    def incoming_uri(self) -> str:
        # QEMU 7.2 (Debian 12) has no file: migration URI (8.2 added it): a cat does the reading
        return "exec:cat " + shlex.quote(str(self.vmstate))


def state_for(image_dir: Path, key: str) -> State:
    return State(Path(image_dir) / f"warm-{key}")


@dataclass(frozen=True)
class Decision:
    """Whether a guest starts warm: state to restore, or None and why not (said once in the log)."""
    state: State = None
    why_cold: str = ""
    save_after_boot: bool = False   # a cold boot that should leave a state for the next guests


def decide(cold: bool, prepared_image: bool, state: State) -> Decision:
    if cold:
        return Decision(why_cold="--cold (or UBD_COLD=1) asks for a cold boot")
    if prepared_image:
        return Decision(why_cold="a prepared image (a mutant's driver) boots cold: its states would "
                                 "be used once")
    if state.complete():
        return Decision(state=state)
    return Decision(why_cold=f"no saved state in {state.dir} for this image, kernel and machine "
                             "shape yet: cold boot, then saving one", save_after_boot=True)


def data_disk_untouched(path: Path) -> bool:
    """True when the (sparse) data disk holds no data at all: nothing wrote to it yet."""
    if path is None:
        return True
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 0, os.SEEK_DATA)
        return False
    except OSError as e:
        if e.errno == errno.ENXIO:
            return True
        raise
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> bool:
    """Renames the finished tmp folder into place; False (tmp removed) when another run was first."""
    try:
        os.rename(tmp, final)
        return True
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False
        raise


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SaveLock:
    """One saver per state (non-blocking): a run that finds it held keeps its cold guest unsaved."""

    def __init__(self, state: State):
        self.path = state.dir.with_name(state.dir.name + ".lock")
        self.f = None

    def __enter__(self) -> bool:
        self.f = open(self.path, "w")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def __exit__(self, *exc):
        self.f.close()


def _qmp_ok(qmp, cmd, **args):
    r = qmp.cmd_obj({"execute": cmd, **({"arguments": args} if args else {})})
    if "error" in r:
        raise SetupError(f"QMP {cmd} failed: {r['error'].get('desc', r['error'])}")
    return r.get("return")


def save(machine, state: State, meta: dict) -> bool:
    """Saves the running guest of machine (SSH closed by the caller) as state, then lets it run on.
    Returns False when another run saved the same state first."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    if not data_disk_untouched(machine.data_disk):
        raise SetupError("the data disk was written before the save: the state would not match a "
                         "new data disk")
    tmp = state.dir.with_name(f".{state.dir.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.mkdir(parents=True)
    tmp_state = State(tmp)
    qmp = QEMUMonitorProtocol(str(machine.qmp_path))
    qmp.connect()
    try:
        try:
            _qmp_ok(qmp, "migrate-set-parameters", **{"max-bandwidth": SAVE_BANDWIDTH})
            # no `stop` first: the stream then records a running guest, which the restoring QEMU
            # resumes by itself (the guest is paused for the final pass all the same)
            _qmp_ok(qmp, "migrate", uri="exec:cat > " + shlex.quote(str(tmp_state.vmstate)))
            deadline = time.monotonic() + SAVE_DEADLINE
            while True:
                st = _qmp_ok(qmp, "query-migrate").get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise SetupError(f"saving the guest's state ended {st or 'nowhere'} "
                                     f"(after {SAVE_DEADLINE:g} s at most)")
                time.sleep(0.05)
            # The block devices are flushed and inactive now: the overlay is a consistent copy.
            shutil.copyfile(machine.overlay, tmp_state.root)
            shutil.copyfile(machine.console_log, tmp_state.console)
        finally:
            # back to running (cont re-activates the disks a completed migration handed over)
            _qmp_ok(qmp, "cont")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        qmp.close()
    for f in (tmp_state.vmstate, tmp_state.root):
        f.chmod(0o444)
        _fsync(f)
    tmp_state.meta.write_text(json.dumps({**meta, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                          time.gmtime())}, indent=1))
    return publish(tmp, state.dir)
