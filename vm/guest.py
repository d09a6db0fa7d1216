"""A booted guest: machine + SSH session, with the Python server pushed in. The unit tests and the
scenario engine work with.

Machine-level acts live here too: power_cut() pulls the plug (QEMU killed mid-IO), reboot() is a
clean reboot, and boot_again() boots the same disks once more and reconnects. A guest started with
data_disk=True has a second disk mounted at DATA_DIR whose flushes reach the host (see
machine.DATA_DISK_CACHE): what must survive a power cut lives there.

Unless opts.cold, a guest starts warm: restored from the state the first cold boot of its image and
machine shape saved (vm/warm.py), its clock set and its CRNG reseeded from the host. A restore that
fails or does not answer SSH in time falls back to a cold boot."""
import os
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import image as image_mod, kernel_tree, options, warm
from .errors import BootTimeout, GuestLost, KernelPanic, SetupError
from .machine import Machine
from .paths import UBDSRV_DIR
from .ssh import ExecResult, Session, wait_ready

GUEST_UBD_DIR = "/opt/ubd"
SSHD_READY_MARKER = b"Server listening on"  # sshd -D -e logs to the console (vm/guestfs/etc/inittab)
BOOT_DEADLINE = 120.0
# a KASAN + lockdep kernel (--debug-kernel) took 77 s to SSH-ready under TCG here, against ~6 s
DEBUG_KERNEL_BOOT_FACTOR = 3
# Boots under TCG that panic before userspace (emulation: see machine.TCG_APPEND) are tried again; a
# CI run saw two in a row once (an injected one, then an "Oops: int3" in enqueue_timer).
BOOT_ATTEMPTS_TCG = 3
DATA_DIR = "/data"     # where the data disk is mounted in the guest
DATA_DEV = "/dev/vdb"
# ext4 commits its journal every 5 s by itself; at 60 s only an fsync() makes a change to the data
# disk durable within a case, so a server that skips one loses what it acknowledged, every time.
DATA_MOUNT_OPTIONS = "commit=60"
REBOOT_DEADLINE = 60.0


@dataclass
class GuestOptions:
    flavour: str = options.default("flavour")
    accel: str = options.default("accel")
    cpus: int = options.default("cpus")
    memory: str = options.default("memory")
    run_dir: Path = None  # where console.log and the overlay go; a temp dir when None
    boot_deadline: float = BOOT_DEADLINE
    push_server: bool = True
    append: str = ""
    kernel_tree: Path = None  # boot a kernel built from this source tree (on the flavour's root)
    kernel_debug: bool = False  # ... with kernel/debug.config (KASAN, lockdep, ...)
    profile_image: bool = False  # the flavour's image with perf (vm/image.py PROFILE_PACKAGES)
    data_disk: bool = False     # a second disk at DATA_DIR that survives power cuts
    server_dir: Path = None     # push this ubdsrv tree instead of the repo's (tests of broken servers)
    image: object = None        # boot this prepared Image instead (a mutant's driver: vm/mutants.py)
    cold: bool = options.default("cold")   # never restore a saved guest (vm/warm.py)
    log: object = field(default=print, repr=False)



def install_server(machine, server_dir=None):
    """Installs ubdsrv/ (or server_dir) as GUEST_UBD_DIR/ubdsrv on a guest or a target (anything with
    exec and push), replacing what an earlier push left."""
    machine.exec(f"rm -rf {GUEST_UBD_DIR}/ubdsrv", timeout=30, check=True)
    machine.push(server_dir or UBDSRV_DIR, f"{GUEST_UBD_DIR}/ubdsrv")

class Guest:
    def __init__(self, opts: GuestOptions = None):
        self.opts = opts or GuestOptions()
        self.machine = None
        self.session = None
        self._tmp = None
        self.boot_seconds = None
        self._warm_target = None   # the warm.State this guest's image and shape would use
        self._waiting_for = self.boot_deadline()

    # --- lifecycle -------------------------------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        o = self.opts
        img = o.image or image_mod.ensure(o.flavour, log=o.log, profile=o.profile_image)
        if o.kernel_tree and not o.image:
            img = kernel_tree.ensure(o.kernel_tree, img, debug=o.kernel_debug, log=o.log)
        run_dir = o.run_dir
        if run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ubd-guest-")
            run_dir = Path(self._tmp.name)
        plan = self._warm_plan(img, Path(run_dir))
        if plan.state is not None and self._restore(img, Path(run_dir), plan.state):
            self._after_boot(first=True)
            return
        for attempt in range(1, BOOT_ATTEMPTS_TCG + 1):
            try:
                self._boot(img, Path(run_dir))
                break
            except KernelPanic:
                # A panic before userspace under TCG is emulation, not the code under test (see
                # machine.TCG_APPEND); keep its console and boot once more. Under KVM: report it.
                if self.machine.accel != "tcg" or attempt == BOOT_ATTEMPTS_TCG:
                    raise
                kept = self.machine.console_log.with_name(f"console.boot-panic-{attempt}.log")
                self.machine.console_log.replace(kept)
                self.machine.kill()
                o.log(f"guest: kernel panicked during boot under TCG (console kept in {kept}); "
                      "booting again")
        self.boot_seconds = time.monotonic() - self.machine.started_at
        if plan.save_after_boot:
            self._save_warm_state()
        self._after_boot(first=True)

    def _machine(self, img, run_dir: Path) -> Machine:
        o = self.opts
        return Machine(img, run_dir, cpus=o.cpus, memory=o.memory, accel=o.accel, append=o.append,
                       log=o.log, data_disk=o.data_disk)

    def _boot(self, img, run_dir: Path):
        self.machine = self._machine(img, run_dir)
        self.machine.start()
        self._connect()

    # --- warm start (vm/warm.py) -----------------------------------------------------------------
    def _warm_plan(self, img, run_dir: Path) -> warm.Decision:
        o = self.opts
        prepared = o.image is not None
        state = None
        if not (o.cold or prepared):
            probe = self._machine(img, run_dir)   # for the key only; never started
            try:
                state = probe.warm_state()
            finally:
                probe.kill()
        plan = warm.decide(o.cold, prepared, state)
        if plan.state is None and not o.cold:
            warm.say_once(o.log, f"warm start: {plan.why_cold}")
        self._warm_target = state
        return plan

    def _restore(self, img, run_dir: Path, state: warm.State) -> bool:
        """Starts the guest from state; False (said once, everything undone) when that fails."""
        self.machine = self._machine(img, run_dir)
        try:
            self.machine.start(restore=state)
            self._connect(deadline=self.machine.started_at + self.restore_deadline(), console=False)
            self._fix_after_restore()
        except Exception as e:   # whatever it was (QEMU, QMP, SSH, qemu-img): a cold boot follows
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            warm.say_once(self.opts.log, f"warm start: restoring {state.dir} failed ({why}); "
                                         "cold boot instead")
            if self.session is not None:
                self.session.close()
                self.session = None
            log = self.machine.console_log
            if log.exists():
                log.replace(log.with_name("console.restore-failed.log"))
            self.machine.kill()
            return False
        self.boot_seconds = time.monotonic() - self.machine.started_at
        return True

    def _fix_after_restore(self):
        """The wall clock stopped at save time, and every guest restored from one state would draw
        the same random numbers: set the clock, credit host bytes and reseed the CRNG."""
        r = self.exec(warm.after_restore_command(time.time(), os.urandom(warm.RESEED_BYTES)),
                      timeout=30, kill_in_guest=False)
        if not r.ok:
            raise SetupError(f"setting the clock and reseeding after the restore failed: "
                             f"{(r.stderr or r.stdout).strip()[-300:]}")

    def _save_warm_state(self):
        """Saves this freshly booted guest for the next guests, then lets it run on."""
        state, o, m = self._warm_target, self.opts, self.machine
        with warm.SaveLock(state) as mine:
            if not mine or state.complete():
                return   # another run saves (or saved) it
            meta = {"image": str(m.image.dir), "flavour": m.image.flavour,
                    "kernel_release": m.image.kernel_release, "cpus": m.cpus, "memory": m.memory,
                    "accel": m.accel, "data_disk": m.data_disk is not None, "append": m.extra_append}
            self.session.close()
            self.session = None
            t0 = time.monotonic()
            try:
                saved = warm.save(m, state, meta)
            except Exception as e:   # only the next guests lose: this one runs on
                warm.say_once(o.log, f"warm start: saving the guest failed ({type(e).__name__}: "
                                     f"{e}); later guests boot cold")
                saved = False
            self._connect(deadline=time.monotonic() + self.boot_deadline(), console=False)
            self._fix_after_restore()
            if saved:
                o.log(f"warm start: saved the booted guest in {state.dir} "
                      f"({time.monotonic() - t0:.1f} s); later guests start from it")

    def _connect(self, deadline=None, console=True):
        img = self.machine.image
        self.session = Session("127.0.0.1", self.machine.port, img.client_key, img.host_key_pub)
        if deadline is None:
            deadline = self.machine.started_at + self.boot_deadline()
        self._waiting_for = deadline - self.machine.started_at   # for the timeout's message
        if console:
            self._wait_for_sshd(deadline)
        else:   # a restored guest's sshd listens already: nothing new on the console
            self.machine.wait_running(deadline)
        wait_ready(self.session, deadline, self.machine.alive, self._boot_failure,
                   **({} if console else {"attempt_seconds": warm.CONNECT_SECONDS}))

    def _after_boot(self, first):
        if self.opts.data_disk:
            # formatted on the first boot; later boots mount it (ext4 replays its journal)
            mkfs = f"mkfs.ext4 -q -F -L ubd-data {DATA_DEV} && " if first else ""
            r = self.exec(f"{mkfs}mkdir -p {DATA_DIR} && mount -o {DATA_MOUNT_OPTIONS} {DATA_DEV} "
                          f"{DATA_DIR}", timeout=120)
            if not r.ok:
                raise SetupError(f"the data disk could not be {'formatted and ' if first else ''}"
                                 f"mounted at {DATA_DIR}: {(r.stderr or r.stdout).strip()[-500:]}")
        if self.opts.push_server:
            self.push_server()

    # --- machine-level acts ----------------------------------------------------------------------
    def power_cut(self):
        """The plug pulled mid-IO: QEMU killed at once, nothing flushed on the way down."""
        self.session.close()
        self.machine.power_cut()

    def reboot(self, deadline=REBOOT_DEADLINE) -> bool:
        """A clean reboot (busybox init runs the shutdown script; -no-reboot makes QEMU exit).
        Returns False when the guest did not go down within deadline; it is still up then."""
        chan = self.session.client.get_transport().open_session(timeout=10)
        chan.exec_command("busybox reboot")
        went_down = self.machine.wait_exit(deadline)
        self.session.close()
        if went_down and self.machine.panicked():
            tail = self.machine.console_tail()
            raise KernelPanic(f"the guest kernel panicked on its way down; console tail:\n{tail}", tail)
        return went_down

    def boot_again(self):
        """Boots the same disks again (after power_cut() or reboot()) and reconnects."""
        if self.machine.alive():
            raise SetupError("internal: boot_again() while the guest still runs")
        self.machine.start(fresh=False)
        self._connect()
        self._after_boot(first=False)

    def boot_deadline(self) -> float:
        o = self.opts
        return o.boot_deadline * (DEBUG_KERNEL_BOOT_FACTOR if o.kernel_tree and o.kernel_debug else 1)

    def restore_deadline(self) -> float:
        debug = self.opts.kernel_tree and self.opts.kernel_debug
        return min(self.boot_deadline(), warm.RESTORE_DEADLINE * (DEBUG_KERNEL_BOOT_FACTOR if debug else 1))

    def _wait_for_sshd(self, deadline):
        """Waits for sshd's "listening" line on the console. Connecting earlier costs seconds: QEMU
        accepts the TCP connection while the guest's network is still down and the banner never comes."""
        while not self.machine.console_contains(SSHD_READY_MARKER):
            if not self.machine.alive():
                raise self._boot_failure("exited", None)
            if time.monotonic() > deadline:
                raise self._boot_failure("timeout", "sshd never reported listening on the console")
            time.sleep(0.05)

    def _boot_failure(self, why, last_error):
        tail = self.machine.console_tail()
        if self.machine.panicked():
            return KernelPanic(f"the guest kernel panicked while booting; console tail:\n{tail}", tail)
        if why == "exited":
            err = self.machine.stderr_path.read_text(errors="replace").strip()
            return GuestLost(f"QEMU exited while the guest booted ({err or 'no error printed'}); "
                             f"console tail:\n{tail}", tail)
        return BootTimeout(f"the guest did not answer SSH within {self._waiting_for:.0f} s "
                           f"(last error: {last_error}); console tail:\n{tail}", tail)

    def stop(self):
        if self.machine is not None:
            self.machine.stop(poweroff=self._poweroff if self.session else None)
        if self.session is not None:
            self.session.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _poweroff(self):
        # busybox init runs the shutdown script and powers off; don't wait for an answer.
        chan = self.session.client.get_transport().open_session(timeout=3)
        chan.exec_command("busybox poweroff")

    # --- use -------------------------------------------------------------------------------------
    @property
    def accel(self):
        return self.machine.accel

    @property
    def console_log(self) -> Path:
        return self.machine.console_log

    def is_alive(self) -> bool:
        return self.machine is not None and self.machine.alive()

    def exec(self, command, timeout=60.0, check=False, **kw) -> ExecResult:
        try:
            return self.session.exec(command, timeout=timeout, check=check, alive=self.is_alive, **kw)
        except GuestLost as e:
            raise self._lost(e) from e

    def _lost(self, e: GuestLost):
        # QEMU exits on panic (panic=-1, -no-reboot); give it a moment to finish writing the console.
        self.machine.wait_exit(5)
        tail = self.machine.console_tail()
        if self.machine.panicked():
            return KernelPanic(f"guest kernel panic ({e}); console tail:\n{tail}", tail)
        return GuestLost(f"{e}; console tail:\n{tail}", tail)

    def push(self, local, remote):
        self.session.push(Path(local), remote)

    def pull(self, remote, local):
        self.session.pull(remote, Path(local))

    def push_server(self):
        """Installs the current ubdsrv/ (or opts.server_dir); the `ublk` wrapper is in the image."""
        install_server(self, self.opts.server_dir)

    def ssh_argv(self) -> list:
        """OpenSSH command line for this guest, pinned to the image's host key like the bench is."""
        img = self.machine.image
        known = self.machine.run_dir / "known_hosts"
        known.write_text(f"[127.0.0.1]:{self.machine.port} {img.host_key_pub.read_text().strip()}\n")
        return ["ssh", "-i", str(img.client_key), "-p", str(self.machine.port),
                "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                "-o", "LogLevel=ERROR", "root@127.0.0.1"]

    def ssh_command(self) -> str:
        """What a user types to log into this guest while it stays up."""
        return shlex.join(self.ssh_argv())
