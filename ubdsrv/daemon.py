"""The device daemon: one opener process plus one process per queue.

The opener opens /dev/ublkcN, maps every queue's descriptor area (the driver pins the mapping to the
first mm that maps it, so children cannot map their own; they inherit these mappings), then forks one
process per queue. A queue process dies with the opener (PR_SET_PDEATHSIG SIGKILL), so `kill -9` of
the pid `list` shows takes the whole server down, as with a threaded server. Each queue sets up its own
io_uring and submits FETCH_REQ for every tag, then reports ready; only then the opener issues START_DEV
(or END_USER_RECOVERY) with its own pid: 6.12 scans partitions synchronously inside START_DEV, so the
queues must already be serving.

`spawn()` is what `add` and `recover` call: it detaches the daemon (double fork + setsid, stdio to the
device log) and waits for its verdict over a pipe.

Memory pressure: every queue process is an IO flusher (PR_SET_IO_FLUSHER: its allocations never recurse
into IO, and its dirty-page throttling looks only at the device it writes to), since reclaim that writes
back to this very device would wait for the queue doing the reclaim. Daemon and queues also carry
oom_score_adj -1000: an OOM kill of the server takes the device down.

SIGTERM (to the daemon; the queues ignore it, so a signal to the whole group changes nothing) is a
graceful stop: the daemon issues STOP_DEV. The driver fails IO submitted from then on, drains the IO
already issued (the queues keep serving it), then aborts every fetch; the queues exit, the daemon exits 0
within STOP_TIMEOUT. The device is left stopped (state DEAD, daemon pid -1), listed until `ublk del`.
"""
import ctypes
import errno
import json
import mmap
import os
import select
import signal
import sys
import threading
import time
import traceback

from . import targets, uapi
from .ctrl import Ctrl
from .log import Log
from .queue import Queue

STATE_DIR = os.environ.get("UBDSRV_STATE_DIR") or "/run/ubdsrv"
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_IO_FLUSHER = 57
OOM_SCORE_ADJ_MIN = -1000
#: how long /dev/ublkcN may stay missing or busy (udev probing it) before the daemon gives up
OPEN_TIMEOUT = 10.0
#: SIGTERM: how long the queues may take to drain after STOP_DEV before they are killed
STOP_TIMEOUT = 30.0

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option, arg2=0):
    """prctl(2) with unsigned long arguments; returns 0 or the errno."""
    ul = ctypes.c_ulong
    if _libc.prctl(option, ul(arg2), ul(0), ul(0), ul(0)) != 0:
        return ctypes.get_errno()
    return 0


# ---- saved state ----------------------------------------------------------------------------------
#: dev_info fields that must match between the saved state and the device (fixed at ADD_DEV)
IDENTITY = ("flags", "nr_hw_queues", "queue_depth", "max_io_buf_bytes")


def state_path(dev_id):
    return os.path.join(STATE_DIR, f"dev{dev_id}.json")


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def cdev_identity(dev_id):
    """What tells this /dev/ublkcN from an earlier device with the same id: the inode number of its
    sysfs directory. sysfs numbers every new kernel object afresh (cyclic ids), so a device deleted and
    added again, by anyone, gets a new one; unlike ublksrv_pid it does not change on STOP_DEV or
    recovery. None when sysfs is not mounted."""
    try:
        return os.stat(f"/sys/class/ublk-char/ublkc{dev_id}").st_ino
    except OSError:
        return None


def read_state(dev_id, info):
    """The saved state of device `dev_id` and why it is not usable: (state, None) when it was written
    for the device that GET_DEV_INFO's `info` describes, in this boot, else (None, reason)."""
    path = state_path(dev_id)
    try:
        with open(path) as f:
            st = json.load(f)
    except FileNotFoundError:
        return None, f"no saved state ({path})"
    except (OSError, ValueError) as e:
        return None, f"unreadable saved state {path}: {e}"
    if not isinstance(st, dict) or st.get("dev_id") != dev_id:
        return None, f"{path} does not describe device {dev_id}"
    if st.get("boot_id") != boot_id():
        return None, f"{path} was written before the last reboot"
    for key in IDENTITY:
        if st.get(key) != getattr(info, key):
            return None, (f"{path} is stale: {key} {st.get(key)} there, {getattr(info, key)} now "
                          f"(device {dev_id} was deleted and added again)")
    if st.get("cdev_ino") != cdev_identity(dev_id):
        return None, f"{path} is stale: device {dev_id} was deleted and added again since it was written"
    return st, None


def load_state(dev_id, info):
    """The saved server state (target spec, daemon pid, queue tids) of device `dev_id`, or None when
    there is none or it belongs to an earlier device with the same id (deleted and added again, maybe
    by another tool, or before a reboot). `info` is the device's DevInfo from GET_DEV_INFO; `list` and
    `recover` must trust nothing else. `read_state` gives the reason too."""
    return read_state(dev_id, info)[0]


def save_state(dev_id, state):
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = state_path(dev_id) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, state_path(dev_id))


def remove_state(dev_id):
    try:
        os.unlink(state_path(dev_id))
    except FileNotFoundError:
        pass


def _set_name(name):
    try:
        _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
    except Exception:
        pass


def _open_cdev(dev_id, flags, log, timeout=OPEN_TIMEOUT):
    """Open /dev/ublkcN, waiting while its node is not there yet (udev/devtmpfs) or another process
    holds it (the driver allows one opener: udev probing the new node, or a dying server's last fd)."""
    path = f"/dev/ublkc{dev_id}"
    deadline = time.monotonic() + timeout
    waited = None
    while True:
        try:
            fd = os.open(path, flags)
            if waited is not None:
                log(f"daemon: opened {path} after {time.monotonic() - waited:.1f} s")
            return fd
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EBUSY):
                raise
            if waited is None:
                waited = time.monotonic()
                log(f"daemon: {path}: {os.strerror(e.errno)}; retrying for up to {timeout:.0f} s")
            if time.monotonic() > deadline:
                what = "still held by another process" if e.errno == errno.EBUSY else "never appeared"
                raise OSError(e.errno, f"{path} {what} after {timeout:.0f} s") from None
            time.sleep(0.05)


def _protect_from_oom(log):
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ_MIN))
    except OSError as e:
        log(f"daemon: cannot set oom_score_adj {OOM_SCORE_ADJ_MIN}: {e}")


def _queue_child(dev_id, q_id, info, cdev, desc, target, log, ready_w, opener, cpus, close_fds):
    """Body of a queue process. Never returns."""
    code = 1
    try:
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != opener:      # the opener died before prctl took effect
            os._exit(1)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # the daemon's to handle (graceful stop)
        err = _prctl(PR_SET_IO_FLUSHER, 1)
        if err:
            log(f"queue {q_id}: PR_SET_IO_FLUSHER failed: {os.strerror(err)}")
        _set_name(f"ubdq{dev_id}.{q_id}")
        # Pinning a queue to the CPUs blk-mq maps to it makes it compete with the submitter on the
        # same CPU; measured slower on small guests, so it is opt-in (UBDSRV_AFFINITY=1).
        if cpus and os.environ.get("UBDSRV_AFFINITY") == "1":
            try:
                os.sched_setaffinity(0, cpus)
            except OSError:
                pass
        q = Queue(dev_id, q_id, info, cdev, desc, target, log)
        q.setup()
        q.fetch_all()
        os.write(ready_w, f"{q_id} ok {os.getpid()}\n".encode())
        os.close(ready_w)
        ready_w = -1
        log(f"queue {q_id}: serving (tid {os.getpid()}, depth {q.depth}, cpus {cpus})")
        q.run()
        log(f"queue {q_id}: all tags aborted, exiting ({q.cqes_seen} completions in {q.enters} "
            f"io_uring_enter calls)")
        code = 0
    except BaseException as e:
        msg = f"{type(e).__name__}: {e}"
        log(f"queue {q_id}: fatal: {msg}\n{traceback.format_exc()}")
        if ready_w >= 0:
            try:
                os.write(ready_w, f"{q_id} err {msg}\n".replace("\n", " ").encode() + b"\n")
            except OSError:
                pass
    os._exit(code)


def serve(dev_id, info, spec, mode, report, log, ready_timeout=60.0, report_fd=-1):
    """Run the daemon in this process (already detached). `report(line)` tells the launcher how the
    start went ("OK" or "ERR message"); returns the exit status."""
    target = targets.from_spec(spec)
    nq, depth = info.nr_hw_queues, info.queue_depth
    log(f"daemon: {mode} dev {dev_id}: {nq} queues, depth {depth}, max io {info.max_io_buf_bytes}, "
        f"flags 0x{info.flags:x} [{' '.join(uapi.flag_names(info.flags))}], target {json.dumps(spec)}")
    # SIGTERM and SIGCHLD are taken in the reaping loop (sigwaitinfo); one during setup stays pending
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGCHLD})
    _protect_from_oom(log)
    flags = os.O_RDWR | os.O_CLOEXEC
    if info.flags & uapi.UBLK_F_USER_COPY:
        # the driver's file has no FMODE_NOWAIT: without O_NONBLOCK io_uring hands every copy SQE to an
        # io-wq thread; with it, the copies (plain memcpy in the driver) run inline
        flags |= os.O_NONBLOCK
    cdev = _open_cdev(dev_id, flags, log)
    target.open(log)
    page = mmap.PAGESIZE
    descs = []
    for q in range(nq):
        descs.append(_map_desc(cdev, q, depth, page))
    with Ctrl() as ctrl:
        cpus = []
        for q in range(nq):
            try:
                cpus.append(ctrl.get_queue_affinity(dev_id, q))
            except Exception:
                cpus.append([])
    ready_r, ready_w = os.pipe()
    me = os.getpid()
    children = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for q in range(nq):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            _queue_child(dev_id, q, info, cdev, descs[q], target, log, ready_w, me, cpus[q],
                         (report_fd,) if report_fd >= 0 else ())
        children[pid] = q
    os.close(ready_w)
    tids = {}
    err = _collect_ready(ready_r, nq, tids, ready_timeout)
    os.close(ready_r)
    if err is None:
        try:
            with Ctrl() as ctrl:
                if mode == "recover":
                    log(f"daemon: END_USER_RECOVERY pid {me}")
                    ctrl.end_user_recovery(dev_id, me)
                else:
                    log(f"daemon: START_DEV pid {me}")
                    ctrl.start_dev(dev_id, me)
        except Exception as e:
            err = str(e)
    if err is not None:
        log(f"daemon: start failed: {err}; killing queues")
        _kill_all(children)
        report(f"ERR {err}")
        return 1
    _set_io_timeout(dev_id, log)
    state = {"dev_id": dev_id, "daemon_pid": me, "target": spec, "target_json": target.describe(),
             "boot_id": boot_id(), "cdev_ino": cdev_identity(dev_id),
             "queues": [{"q_id": q, "tid": tids.get(q, 0), "affinity": cpus[q]} for q in range(nq)]}
    state.update((key, getattr(info, key)) for key in IDENTITY)
    save_state(dev_id, state)
    log(f"daemon: device {dev_id} {'recovered' if mode == 'recover' else 'started'}; queue tids "
        f"{[tids.get(q) for q in range(nq)]}")
    report("OK")
    status = _serve_until_done(dev_id, children, log)
    target.close()      # e.g. loop: fsync the backing file
    return status


def _set_io_timeout(dev_id, log):
    """Shorten the block layer's request timeout of /dev/ublkbN (default 30 s).

    Before 6.15, when the server dies while it holds every tag of a queue, no cancelable command is
    left to notice, and only this timeout aborts the queue (ublk_timeout acts only if the daemon is
    dying; with a live server it just re-arms). A shorter timeout brings DEAD/QUIESCED sooner and
    costs a healthy server nothing. UBDSRV_IO_TIMEOUT_MS overrides; 0 keeps the kernel's value."""
    ms = int(os.environ.get("UBDSRV_IO_TIMEOUT_MS", "10000") or 0)
    if ms <= 0:
        return
    path = f"/sys/block/ublkb{dev_id}/queue/io_timeout"
    try:
        with open(path, "w") as f:
            f.write(str(ms))
        log(f"daemon: {path} = {ms}")
    except OSError as e:
        log(f"daemon: cannot set {path}: {e}")


def _map_desc(cdev, q, depth, page):
    length = uapi.cmd_buf_size(depth, page)
    off = uapi.cmd_buf_offset(q, page)
    try:
        return mmap.mmap(cdev, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=off, trackfd=False)
    except TypeError:
        return mmap.mmap(cdev, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=off)


def _collect_ready(fd, nq, tids, timeout):
    deadline = time.monotonic() + timeout
    buf = b""
    ok = 0
    while ok < nq:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"queues not ready after {timeout:.0f} s ({ok}/{nq})"
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return f"a queue process exited during setup ({ok}/{nq} ready); see the log"
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            parts = line.decode(errors="replace").split(" ", 2)
            if len(parts) >= 3 and parts[1] == "ok":
                tids[int(parts[0])] = int(parts[2])
                ok += 1
            elif len(parts) >= 2 and parts[1] == "err":
                return f"queue {parts[0]}: {parts[2] if len(parts) > 2 else 'failed'}"
    return None


def _kill_all(children):
    for pid in list(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        children.pop(pid, None)


def _reap_exited(children, log):
    """Collect the queues that exited; returns 1 if one died abnormally. Such a death takes the others
    down (like a crash of a threaded server), so the driver sees the whole server gone."""
    status = 0
    while children:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            break
        if pid == 0:
            break
        q = children.pop(pid, None)
        if q is None:
            continue
        if os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0:
            log(f"daemon: queue {q} (pid {pid}) exited")
            continue
        why = (f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"status {os.WEXITSTATUS(st)}")
        log(f"daemon: queue {q} (pid {pid}) died ({why}); stopping the other queues")
        status = 1
        _kill_all(children)
    return status


def _stop_dev(dev_id, log, failed):
    try:
        with Ctrl() as ctrl:
            ctrl.stop_dev(dev_id)
        log("daemon: STOP_DEV done")
    except Exception as e:
        failed.append(e)
        log(f"daemon: {e}")


def _serve_until_done(dev_id, children, log):
    """Wait until every queue has exited: the device was stopped or deleted, or SIGTERM stopped it.
    Returns the daemon's exit status."""
    status = 0
    deadline = None
    stopper = None
    failed = []
    while True:
        status |= _reap_exited(children, log)
        if not children:
            break
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            log(f"daemon: queues still serving {STOP_TIMEOUT:.0f} s after SIGTERM; killing them")
            _kill_all(children)
            status = 1
            break
        waited = {signal.SIGCHLD, signal.SIGTERM}
        if deadline is None:
            sig = signal.sigwaitinfo(waited)
        else:
            sig = signal.sigtimedwait(waited, min(1.0, deadline - now))
        if sig is not None and sig.si_signo == signal.SIGTERM and deadline is None:
            log(f"daemon: SIGTERM (from pid {sig.si_pid}): STOP_DEV; in-flight IO is served first")
            deadline = time.monotonic() + STOP_TIMEOUT
            # in a thread: STOP_DEV returns only once the queues drained, and they must not outlive
            # the deadline if it never does
            stopper = threading.Thread(target=_stop_dev, args=(dev_id, log, failed), daemon=True)
            stopper.start()
    if stopper is not None:
        stopper.join(5.0)
        if failed or stopper.is_alive():
            status = 1
    log(f"daemon: exit (status {status})")
    return status


# ---- launcher side ------------------------------------------------------------------------------
class SpawnError(Exception):
    def __init__(self, msg, pid=0):
        super().__init__(msg)
        self.pid = pid


def spawn(dev_id, info, spec, mode, timeout=120.0, before_detach=None):
    """Start a detached daemon for `dev_id`; return its pid once the device runs, or raise SpawnError
    (with `.pid` of the daemon if it got that far)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # intermediate child
        code = 1
        try:
            os.close(r)
            if before_detach is not None:
                before_detach()
            os.setsid()
            if os.fork() > 0:
                os._exit(0)
            code = _daemon_main(dev_id, info, spec, mode, w)
        except BaseException:
            try:
                os.write(w, ("ERR " + traceback.format_exc().replace("\n", " | ") + "\n").encode())
            except OSError:
                pass
        os._exit(code)
    os.close(w)
    os.waitpid(pid, 0)
    daemon_pid = 0
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SpawnError(f"daemon did not report within {timeout:.0f} s", daemon_pid)
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                raise SpawnError("daemon exited without reporting; see the log", daemon_pid)
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith("PID "):
                    daemon_pid = int(text[4:])
                elif text == "OK":
                    return daemon_pid
                elif text.startswith("ERR "):
                    raise SpawnError(text[4:], daemon_pid)
    finally:
        os.close(r)


def _daemon_main(dev_id, info, spec, mode, w):
    log = Log(dev_id, "daemon")
    # detach stdio: stdin from /dev/null, stdout/stderr to the device log (tracebacks land there)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if log.fd >= 0:
        os.dup2(log.fd, 1)
        os.dup2(log.fd, 2)
    else:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _set_name(f"ubdsrv{dev_id}")
    os.write(w, f"PID {os.getpid()}\n".encode())
    reported = []

    def report(line):
        if not reported:
            reported.append(line)
            try:
                os.write(w, (line + "\n").encode())
            except OSError:
                pass
            os.close(w)

    try:
        return serve(dev_id, info, spec, mode, report, log, report_fd=w)
    except BaseException as e:
        log(f"daemon: fatal: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        report(f"ERR {type(e).__name__}: {e}")
        return 1
