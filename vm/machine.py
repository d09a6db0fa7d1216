"""One QEMU process: direct kernel boot on a throw-away overlay, SSH forwarded, QMP, serial log.

No QEMU may outlive its Machine: stop() escalates from the guest's poweroff to QMP quit to SIGKILL,
QEMU gets PR_SET_PDEATHSIG so it dies with us even on SIGKILL, and an atexit hook kills leftovers.

A Machine may boot more than once on the same disks: power_cut() (SIGKILL, the disks kept) or a
guest reboot (QEMU exits, -no-reboot) followed by start(fresh=False). Each boot appends to the one
console log; `boot_offset` is where the current boot's console output begins.

start(restore=state) starts QEMU from a saved guest (vm/warm.py) instead of booting: the guest's
own overlay is then over the state's root.qcow2. A later start(fresh=False) boots those disks cold."""
import atexit
import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from . import accel as accel_probe, warm
from .console import console_tail, shows_panic
from .errors import SetupError
from .image import Image
from .ports import free_port

QEMU = "qemu-system-x86_64"
# Under multi-threaded TCG (QEMU 7.2) a vCPU can run stale code while the kernel live-patches a
# static branch, and hit the int3 that text_poke_bp left there: "Oops: int3" in sched_clock_tick at
# "sched_clock: Marking stable", about 1 boot in 70 here. tsc=unstable keeps that branch unflipped.
TCG_APPEND = "tsc=unstable "
# The data disk (a second virtio disk, for what must survive a power cut) is a raw file with
# cache=writeback: the guest sees a volatile write cache, its flushes become fdatasync() of the file,
# and a raw image has no metadata of QEMU's own. So every write QEMU acknowledged is in the host's
# page cache (it survives a QEMU kill) and every flushed write is on the host's disk. cache=unsafe
# would drop the flushes; cache=none needs O_DIRECT, which a tmpfs run folder lacks.
DATA_DISK_CACHE = "writeback"
DATA_DISK_SIZE = 2 << 30
_live = set()  # Machines started and not yet stopped, for the atexit hook


def _die_with_parent():
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def _kill_leftovers():
    for m in list(_live):
        m.kill()


class Machine:
    def __init__(self, image: Image, run_dir: Path, cpus=2, memory="2G", accel="auto",
                 append="", log=print, data_disk=False):
        self.image = image
        self.run_dir = Path(run_dir)
        self.cpus = cpus
        self.memory = memory
        self.requested_accel = accel
        self.extra_append = append
        self.log = log
        self.accel = None
        self.port = None
        self.proc = None
        self.console_log = self.run_dir / "console.log"
        # A UNIX socket path must fit in 108 bytes: keep it short, whatever the run directory is.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="ubd-qmp-"))
        self.qmp_path = self._sock_dir / "qmp.sock"
        self.overlay = self.run_dir / "overlay.qcow2"
        self.data_disk = self.run_dir / "data.raw" if data_disk else None
        self.started_at = None
        self.boot_offset = 0   # console log offset where the current boot began
        self.boots = 0
        self.restored_from = None   # the warm.State of the first start, when it was a restore

    # --- start -----------------------------------------------------------------------------------
    def _choose_accel(self, qemu) -> str:
        if self.requested_accel == "tcg":
            return "tcg"
        works = accel_probe.kvm_works(qemu, self.image.kernel)
        if self.requested_accel == "kvm" and not works:
            raise SetupError("KVM was requested (--accel kvm) but QEMU cannot run a guest with it here "
                             "(a test start failed); use --accel auto or tcg")
        return "kvm" if works else "tcg"

    def _cmdline(self, qemu):
        append = ("console=ttyS0 root=/dev/vda rw panic=-1 net.ifnames=0 random.trust_cpu=on "
                  "8250.nr_uarts=1 " + (TCG_APPEND if self.accel == "tcg" else "") +
                  self.extra_append).strip()
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else \
                ["-accel", "tcg,thread=multi", "-cpu", "max"]
        # The root overlay stays cache=unsafe (fast; QEMU still writes its qcow2 caches to the host
        # OS at each guest flush, so a killed QEMU keeps what the guest flushed). What a power cut
        # scenario checks lives on the data disk (DATA_DISK_CACHE above).
        data = ["-drive", f"file={self.data_disk},if=virtio,format=raw,cache={DATA_DISK_CACHE}"] \
            if self.data_disk else []
        return [qemu, "-name", "ubd-guest", "-M", "pc", *accel, "-smp", str(self.cpus),
                "-m", str(self.memory), "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot",  # a panic (panic=-1) or reboot ends QEMU: we see it at once
                # a new generation ID on each restore: the guest kernel reseeds its CRNG (vm/warm.py)
                "-device", "vmgenid",
                "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd), "-append", append,
                "-drive", f"file={self.overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
                *data,
                "-netdev", f"user,id=net0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device", "virtio-net-pci,netdev=net0",
                "-chardev", f"file,id=console,path={self.console_log},append=on",
                "-serial", "chardev:console",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]

    def _qemu(self) -> str:
        qemu = shutil.which(QEMU)
        if not qemu:
            raise SetupError(f"{QEMU} is not installed: run vm/setup.sh (or `just setup`)")
        if self.accel is None:
            self.accel = self._choose_accel(qemu)
        return qemu

    def warm_state(self) -> warm.State:
        """Where a saved guest of this image and machine shape is (it may not exist yet)."""
        qemu = self._qemu()
        port, self.port = self.port, "PORT"
        try:
            argv = self._cmdline(qemu)
        finally:
            self.port = port
        mine = {str(p): name for p, name in ((self.overlay, "OVERLAY"), (self.data_disk, "DATA"),
                                             (self.console_log, "CONSOLE"), (self.qmp_path, "QMP"))
                if p is not None}
        shape = []
        for arg in argv:
            for path, name in mine.items():
                arg = arg.replace(path, name)
            shape.append(arg)
        key = warm.state_key(shape, [self.image.kernel, self.image.initrd, self.image.rootfs],
                             warm.qemu_version(qemu))
        return warm.state_for(self.image.dir, key)

    def start(self, fresh=True, restore: warm.State = None):
        """Boots QEMU. fresh=False boots the disks of the previous boot again (after power_cut()
        or a guest reboot): the overlay and data disk are kept, the console log goes on.
        restore: start from this saved guest instead of booting (fresh only)."""
        qemu = self._qemu()
        if self.alive():
            raise SetupError("internal: Machine.start() while QEMU still runs")
        if restore is not None and not fresh:
            raise SetupError("internal: a restore needs fresh disks")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            base, fmt = (restore.root, "qcow2") if restore else (self.image.rootfs, "raw")
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b",
                            str(base), str(self.overlay)], check=True)
            self.restored_from = restore
            # a restored guest's log starts with the saved guest's boot, so that it reads like any
            # guest's (kernel version, boot messages); what this QEMU adds comes after boot_offset
            saved = restore.console.read_bytes() if restore and restore.console.is_file() else b""
            self.console_log.write_bytes(
                saved + f"[ubd-bench: the boot above is the saved guest's; restored from "
                f"{restore.dir}]\n".encode() if restore else b"")
            if self.data_disk:
                with open(self.data_disk, "wb") as f:   # sparse; the guest formats it
                    f.truncate(DATA_DISK_SIZE)
        elif not self.overlay.exists():
            raise SetupError("internal: boot again without the previous boot's disks")
        self.boots += 1
        for attempt in range(3):  # the port may be taken between probing and QEMU's bind
            self.port = free_port()
            self.boot_offset = self._console_size()
            self.stderr_path = self.run_dir / "qemu.stderr"
            with open(self.stderr_path, "wb") as err:
                incoming = ["-incoming", restore.incoming_uri()] if restore else []
                self.proc = subprocess.Popen(self._cmdline(qemu) + incoming, stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=err, preexec_fn=_die_with_parent)
            _live.add(self)
            self.started_at = time.monotonic()
            time.sleep(0.3)
            if self.proc.poll() is None:
                break
            _live.discard(self)
            err = self.stderr_path.read_text(errors="replace").strip()
            if "hostfwd" not in err and "Could not set up host forwarding" not in err:
                raise SetupError(f"QEMU failed to start (exit {self.proc.returncode}): {err}")
        else:
            raise SetupError(f"QEMU could not forward SSH from a free port after 3 tries: {err}")
        how = "KVM" if self.accel == "kvm" else "TCG (software emulation; KVM is not usable here)"
        what = f"restored from {restore.dir.name}" if restore else "running"
        self.log(f"guest: QEMU pid {self.proc.pid} {what} under {how}, ssh on 127.0.0.1:{self.port}")

    # --- state -----------------------------------------------------------------------------------
    def _console_size(self) -> int:
        try:
            return self.console_log.stat().st_size
        except FileNotFoundError:
            return 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console_text(self) -> str:
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self) -> str:
        return console_tail(self.console_text())

    def console_contains(self, marker: bytes) -> bool:
        """Whether the current boot's console output holds marker."""
        try:
            with open(self.console_log, "rb") as f:
                f.seek(self.boot_offset)
                return marker in f.read()
        except FileNotFoundError:
            return False

    def panicked(self) -> bool:
        return shows_panic(self.console_text())

    def wait_exit(self, timeout) -> bool:
        try:
            self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def wait_running(self, deadline) -> bool:
        """Waits (QMP) until the guest runs: a restore has loaded its state. Connecting earlier
        costs seconds: user networking accepts at once, but its SYN to a guest that does not run
        yet is lost and resent only after a retransmission timeout."""
        from qemu.qmp.legacy import QEMUMonitorProtocol
        qmp = None
        try:
            while self.alive() and time.monotonic() < deadline:
                try:
                    if qmp is None:
                        qmp = QEMUMonitorProtocol(str(self.qmp_path))
                        qmp.connect()
                    r = qmp.cmd_obj({"execute": "query-status"})
                    if r.get("return", {}).get("running"):
                        return True
                except Exception:   # no socket yet, or the greeting did not come (qemu.qmp's errors)
                    if qmp is not None:
                        qmp.close()
                    qmp = None
                time.sleep(0.02)
            return False
        finally:
            if qmp is not None:
                qmp.close()

    # --- stop ------------------------------------------------------------------------------------
    def qmp_quit(self) -> bool:
        try:
            from qemu.qmp.legacy import QEMUMonitorProtocol
            qmp = QEMUMonitorProtocol(str(self.qmp_path))
            qmp.connect()
            try:
                qmp.cmd("quit")
            finally:
                qmp.close()
        except Exception:  # QEMU may already be gone, or the monitor wedged: kill() follows
            return False
        return True

    def stop(self, poweroff=None, deadline=10.0):
        """poweroff: a callable asking the guest to power off; then QMP quit; then SIGKILL."""
        if self.proc is None:
            return
        try:
            if self.alive() and poweroff is not None:
                try:
                    poweroff()
                except Exception:
                    pass
                self.wait_exit(deadline)
            if self.alive() and self.qmp_quit():
                self.wait_exit(3)
        finally:
            self.kill()

    def power_cut(self):
        """Pulls the plug: SIGKILL, so QEMU flushes nothing of its own; the disks stay for
        start(fresh=False). What the guest had not written out to the virtual disks is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _live.discard(self)

    def kill(self):
        """Ends QEMU (SIGKILL) and removes everything this Machine created."""
        self.power_cut()
        for disk in (self.overlay, self.data_disk):
            try:
                if disk is not None:
                    disk.unlink()
            except FileNotFoundError:
                pass
        shutil.rmtree(self._sock_dir, ignore_errors=True)
