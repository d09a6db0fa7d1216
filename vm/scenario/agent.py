#!/usr/bin/env python3
"""Guest-side helper of the scenario engine (standard library only; pushed to the guest).

Under TCG every SSH exec costs ~0.65 s, so the host starts this once per guest over one channel
(`agent.py serve`: a JSON request per stdin line, a JSON answer per stdout line) and sends it the
steps. `agent.py call BASE64` answers one request, for a host that cannot keep a channel open.
State that must survive between calls (background jobs) lives in files under STATE_DIR.

It also owns the one dangerous primitive, sending a signal: the pid must be a positive number
above 1, exist, and belong to the ubdsrv server (an empty pid once killed a peer's sshd).

`agent.py write_acked DIR MANIFEST SIZE COUNT` is the crash-consistency writer a scenario runs in
the background: one file after another, each written, fsync()ed with its directory, and only then
listed in MANIFEST (kept off the device under test). Every line of MANIFEST is a file the kernel
acknowledged as durable; after a power cut each must read back intact.

`agent.py closing_reads DEV SECONDS` is the reader of `partition_rescan`: rounds of Linux AIO direct
reads of DEV whose file is closed as soon as they are submitted, so that the completion of the last
one drops the last reference to the block device's file."""
import base64
import glob
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

STATE_DIR = "/run/ubd-scenario"
JOBS_DIR = STATE_DIR + "/jobs"
OUT_LIMIT = 64 << 10
EILSEQ = 84
UBD_DIR = "/opt/ubd"        # the pushed ubdsrv package (control commands go through it)

if UBD_DIR not in sys.path:
    sys.path.insert(0, UBD_DIR)
# which processes are the server's: the server's own definition (ubdsrv/proc.py)
from ubdsrv import proc as server_proc  # noqa: E402


# --- helpers -------------------------------------------------------------------------------------
def _tail(s, limit=OUT_LIMIT):
    return s if len(s) <= limit else "...(cut)...\n" + s[-limit:]


def _read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def _cmdline(pid):
    raw = _read(f"/proc/{pid}/cmdline", None)
    return None if raw is None else raw.replace("\0", " ").strip()


def _proc_state(pid):
    """The one-letter state from /proc/PID/stat, or None when there is no such process."""
    stat = _read(f"/proc/{pid}/stat", None)
    if not stat:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _reap_children():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _kill_group(pgid):
    if isinstance(pgid, int) and pgid > 1:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def server_pids():
    """Processes of the ubdsrv server (daemons, queue processes, a `ublk` CLI in progress)."""
    pids = server_proc.server_pids(exclude={os.getpid(), os.getppid()})
    return [{"pid": pid, "cmdline": _cmdline(pid) or ""} for pid in pids]


# --- `ublk list` ---------------------------------------------------------------------------------
_STATE_RE = re.compile(r"daemon pid\s+(-?\d+)\s+state\s+(\S+)")
_QUEUE_RE = re.compile(r"^\s*queue\s+(\d+):\s+tid\s+(-?\d+)", re.M)


def parse_list(text):
    """`ublk list -n N` output -> {"state", "daemon_pid", "queue_tids"}; state None if absent."""
    m = _STATE_RE.search(text)
    return {"state": m.group(2) if m else None,
            "daemon_pid": int(m.group(1)) if m else None,
            "queue_tids": {int(q): int(t) for q, t in _QUEUE_RE.findall(text)}}


def ublk_info(dev, timeout=20):
    r = op_run({"cmd": f"ublk list -n {int(dev)}", "timeout": timeout})
    info = parse_list(r["stdout"])
    info["listed"] = r["status"] == 0 and info["state"] is not None
    info["raw"] = (r["stdout"] + r["stderr"]).strip()
    # Gone means deleted: no longer listed and its char device removed. A CLI that fails while
    # the device still exists (a timeout, a kernel error) is reported as such, not as GONE.
    info["gone"] = not info["listed"] and not os.path.exists(f"/dev/ublkc{int(dev)}")
    if not info["listed"] and not info["gone"]:
        why = "timed out" if r["timed_out"] else (r["stderr"].strip().splitlines() or ["?"])[-1]
        info["state"] = f"UNKNOWN (ublk list: {why[:120]})"
    return info


# --- fio -----------------------------------------------------------------------------------------
def fio_summary(path):
    """The numbers the report shows, from a fio --output-format=json file (may be partial)."""
    text = _read(path)
    start = text.find("{")
    if start < 0:
        return {"parsed": False, "errors": None}
    try:
        data = json.loads(text[start:])
    except ValueError:
        return {"parsed": False, "errors": None}
    s = {"parsed": True, "errors": 0, "read_iops": 0.0, "write_iops": 0.0,
         "read_bw_kib": 0.0, "write_bw_kib": 0.0, "error_text": "", "verify_failed": False}
    for job in data.get("jobs", []):
        if job.get("error"):
            s["errors"] += 1
            # fio ends a job whose data did not verify with EILSEQ; an IO error is EIO & co.
            s["verify_failed"] = s["verify_failed"] or job["error"] == EILSEQ
            s["error_text"] = s["error_text"] or f"job {job.get('jobname')}: error {job['error']}"
        for d in ("read", "write"):
            part = job.get(d, {})
            s[f"{d}_iops"] += float(part.get("iops", 0.0))
            s[f"{d}_bw_kib"] += float(part.get("bw", 0.0))
    return s


# --- operations ----------------------------------------------------------------------------------
def op_ping(req):
    return {"pid": os.getpid(), "uname": os.uname().release}


def op_run(req):
    """A shell command with a deadline; on expiry its whole process group is killed.

    Output goes to files, not pipes, and we wait for the process, not for EOF: `ublk add` leaves a
    daemon behind that may hold inherited descriptors open for as long as the device lives."""
    timeout = float(req.get("timeout", 60))
    t0 = time.monotonic()
    os.makedirs(STATE_DIR, exist_ok=True)
    out_path, err_path = f"{STATE_DIR}/run.out", f"{STATE_DIR}/run.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen(["bash", "-c", req["cmd"]], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=err, start_new_session=True, cwd=req.get("cwd") or "/")
    timed_out = stuck = False
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(p.pid)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            stuck = True   # uninterruptible (D state): SIGKILL cannot take it; leave it be
    res = {"status": p.returncode, "stdout": _tail(_read(out_path)), "stderr": _tail(_read(err_path)),
           "elapsed": time.monotonic() - t0, "timed_out": timed_out, "stuck": stuck}
    if req.get("fio_json"):
        res["fio"] = fio_summary(req["fio_json"])
    return res


def op_spawn(req):
    """Starts a background job; its exit status lands in JOBS_DIR/<job>/status."""
    d = f"{JOBS_DIR}/{req['job']}"
    os.makedirs(d, exist_ok=True)
    for f in ("status", "pid", "out"):
        try:
            os.unlink(f"{d}/{f}")
        except FileNotFoundError:
            pass
    # a subshell, so that an `exit` in the command still leaves the status behind
    script = f"( {req['cmd']}\n)\necho $? > {d}/status.tmp && mv {d}/status.tmp {d}/status\n"
    with open(f"{d}/out", "wb") as out:
        p = subprocess.Popen(["bash", "-c", script], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=req.get("cwd") or "/")
    with open(f"{d}/pid", "w") as f:
        f.write(str(p.pid))
    with open(f"{d}/started", "w") as f:
        f.write(str(time.monotonic()))
    return {"pid": p.pid}


def _job(name):
    d = f"{JOBS_DIR}/{name}"
    pid = _read(f"{d}/pid").strip()
    status = _read(f"{d}/status").strip()
    return d, (int(pid) if pid.isdigit() else None), (int(status) if status.isdigit() else None)


def op_reap(req):
    """Waits for a background job until the deadline, then kills its process group."""
    d, pid, status = _job(req["job"])
    if pid is None:
        return {"error": f"no such job: {req['job']}"}
    deadline = time.monotonic() + float(req.get("timeout", 60))
    timed_out = False
    while status is None:
        _reap_children()
        d, pid, status = _job(req["job"])
        if status is not None:
            break
        if _proc_state(pid) in (None, "Z"):
            _reap_children()
            status = _job(req["job"])[2]   # it may have written the status just now
            if status is None:
                status = -1                # died without writing one: killed
            break
        if time.monotonic() > deadline:
            timed_out = True
            _kill_group(pid)
            time.sleep(1)
            _reap_children()
            status = -9
            break
        time.sleep(0.2)
    started = float(_read(f"{d}/started", "0") or 0)
    res = {"status": status, "timed_out": timed_out, "out": _tail(_read(f"{d}/out"), 8192),
           "elapsed": time.monotonic() - started if started else None}
    if req.get("fio_json"):
        res["fio"] = fio_summary(req["fio_json"])
    return res


def op_kill_jobs(req):
    """Kills every job still running (after a failure); returns their names."""
    killed = []
    for d in glob.glob(f"{JOBS_DIR}/*"):
        name = os.path.basename(d)
        _, pid, status = _job(name)
        if pid and status is None and _proc_state(pid) not in (None, "Z"):
            _kill_group(pid)
            killed.append(name)
    time.sleep(0.5 if killed else 0)
    _reap_children()
    return {"killed": killed}


def op_ublk_info(req):
    return ublk_info(req["dev"])


def op_wait_state(req):
    """Polls `ublk list -n N` until the device is in `state` (GONE: no longer listed)."""
    t0 = time.monotonic()
    deadline = t0 + float(req["within"])
    history = []
    while True:
        info = ublk_info(req["dev"])
        seen = "GONE" if info["gone"] else info["state"]
        if not history or history[-1][1] != seen:
            history.append((round(time.monotonic() - t0, 2), seen))
        if seen == req["state"]:
            return {"reached": True, "state": seen, "elapsed": time.monotonic() - t0,
                    "history": history, "raw": info["raw"]}
        if time.monotonic() >= deadline:
            return {"reached": False, "state": seen, "elapsed": time.monotonic() - t0,
                    "history": history, "raw": info["raw"]}
        time.sleep(0.3)


def op_signal(req):
    """Signals a ubdsrv process (or one thread of it) after checking the pid is really one."""
    pid, sig = req.get("pid"), req.get("signal")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return {"sent": False, "error": f"refused: pid {pid!r} is not a number above 1"}
    if not isinstance(sig, int) or not 1 <= sig <= 64:
        return {"sent": False, "error": f"refused: bad signal {sig!r}"}
    if pid in (os.getpid(), os.getppid()):
        return {"sent": False, "error": f"refused: pid {pid} is the agent itself"}
    cmd = _cmdline(pid)
    if cmd is None or _proc_state(pid) in (None, "Z"):
        return {"sent": False, "error": f"refused: no process {pid}"}
    if not server_proc.is_server_argv(server_proc.cmdline(pid) or []):
        return {"sent": False, "error": f"refused: pid {pid} is not a ubdsrv process ({cmd!r})"}
    tgid = int(re.search(r"^Tgid:\s*(\d+)", _read(f"/proc/{pid}/status"), re.M).group(1))
    if tgid != pid:
        # A queue thread: direct the signal at that thread (tgkill), not its whole process.
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(234, tgid, pid, sig) != 0:   # SYS_tgkill on x86_64
            return {"sent": False, "error": f"tgkill failed: errno {ctypes.get_errno()}"}
    else:
        os.kill(pid, sig)
    return {"sent": True, "cmdline": cmd, "tgid": tgid}


def op_wait_exit(req):
    """Waits for a process to go away (after a graceful stop)."""
    pid = req["pid"]
    deadline = time.monotonic() + float(req["timeout"])
    while time.monotonic() < deadline:
        _reap_children()
        if _proc_state(pid) in (None, "Z"):
            return {"exited": True}
        time.sleep(0.2)
    return {"exited": False, "state": _proc_state(pid)}


def op_kmsg_mark(req):
    """The sequence number of the newest kernel log record: later records belong to the case."""
    recs = _kmsg_records()
    return {"seq": recs[-1][0] if recs else -1}


def op_kmsg_since(req):
    lines = [f"[{ts / 1e6:12.6f}] {msg}" for seq, ts, msg in _kmsg_records() if seq > req["seq"]]
    return {"lines": lines}


def _kmsg_records():
    """(seq, usec, text) for every record /dev/kmsg still holds."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    recs = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:   # overwritten while we read: continue with the next
                continue
            head, _, body = rec.decode(errors="replace").partition(";")
            fields = head.split(",")
            msg = body.split("\n", 1)[0]   # continuation lines (" KEY=value") are metadata
            recs.append((int(fields[1]), int(fields[2]), msg))
    finally:
        os.close(fd)
    return recs


def op_snapshot(req):
    """What the health check looks at, in one trip."""
    return {"devices": sorted(glob.glob("/dev/ublkb*") + glob.glob("/dev/ublkc*")),
            "servers": server_pids(),
            "tainted": int(_read("/proc/sys/kernel/tainted", "0").strip() or 0),
            "mounts": [l.split()[1] for l in _read("/proc/mounts").splitlines()
                       if l.startswith("/dev/ublkb")],
            # kernel loop devices attached to a file (kernel_loop devices of a scenario)
            "loops": sorted(os.path.basename(os.path.dirname(os.path.dirname(p)))
                            for p in glob.glob("/sys/block/loop*/loop/backing_file"))}


def op_kill_servers(req):
    """Cleanup after a failure: SIGKILL every ubdsrv process (each pid checked by op_signal)."""
    done = []
    for p in server_pids():
        r = op_signal({"pid": p["pid"], "signal": 9})
        if r.get("sent"):
            done.append(p["pid"])
    time.sleep(0.5 if done else 0)
    return {"killed": done}


def op_read_text(req):
    """A small text file (a manifest), or missing=True."""
    text = _read(req["path"], None)
    return {"missing": True} if text is None else {"missing": False, "text": _tail(text, 4 << 20)}


def op_verify_acked(req):
    """Checks every acknowledged file ("name sha256 size" lines) under dir: present, whole, same
    sha256. Returns the counts and the first problems."""
    problems, ok = [], 0
    for line in req["manifest"].splitlines():
        name, digest, size = line.split()
        path = os.path.join(req["dir"], name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            problems.append(f"{name}: {e.strerror}")
            continue
        if len(data) != int(size):
            problems.append(f"{name}: {len(data)} bytes, {size} were acknowledged")
        elif hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{name}: content differs from what was acknowledged")
        else:
            ok += 1
    return {"ok": ok, "bad": len(problems), "problems": problems[:20]}


def write_acked(directory, manifest, size, count):
    """The writer behind `write_acked` (see the module doc); runs until killed or count files."""
    os.makedirs(directory, exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    with open(manifest, "a") as out:
        i = 0
        while count == 0 or i < count:
            i += 1
            name = f"f{i:06d}"
            data = os.urandom(size)
            fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dfd)   # the directory entry too: the file must be findable after the cut
            out.write(f"{name} {hashlib.sha256(data).hexdigest()} {size}\n")
            out.flush()
    os.close(dfd)


# Linux AIO through syscall(2): the standard library has no binding (x86_64 numbers)
NR_IO_SETUP, NR_IO_GETEVENTS, NR_IO_SUBMIT = 206, 208, 209
IOCB = "<QIIHhIQQqQII"   # struct iocb: data, key, rw_flags, opcode, reqprio, fd, buf, nbytes, offset, ...
IOCB_CMD_PREAD = 0
AIO_BATCH, AIO_BLOCK = 32, 4096


def closing_reads(dev, seconds):
    """The reader behind `partition_rescan` (see the module doc). Prints how many rounds it did."""
    import ctypes
    import mmap
    import random
    import struct
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(nr, *args):
        r = libc.syscall(nr, *args)
        if r < 0:
            raise OSError(ctypes.get_errno(), f"syscall {nr}: {os.strerror(ctypes.get_errno())}")
        return r
    ctx = ctypes.c_ulong(0)
    call(NR_IO_SETUP, AIO_BATCH, ctypes.byref(ctx))
    buf = mmap.mmap(-1, AIO_BATCH * AIO_BLOCK)   # page-aligned, as O_DIRECT needs
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    with open(f"/sys/class/block/{os.path.basename(os.path.realpath(dev))}/size") as f:
        blocks = int(f.read()) * 512 // AIO_BLOCK
    iocbs = (ctypes.c_char * struct.calcsize(IOCB) * AIO_BATCH)()
    ptrs = (ctypes.c_void_p * AIO_BATCH)(*(ctypes.addressof(iocbs[i]) for i in range(AIO_BATCH)))
    events = (ctypes.c_char * 32 * AIO_BATCH)()   # struct io_event
    end, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        for i in range(AIO_BATCH):
            struct.pack_into(IOCB, iocbs[i], 0, i, 0, 0, IOCB_CMD_PREAD, 0, fd, base + i * AIO_BLOCK,
                             AIO_BLOCK, random.randrange(blocks) * AIO_BLOCK, 0, 0, 0)
        n = call(NR_IO_SUBMIT, ctx, AIO_BATCH, ptrs)
        os.close(fd)   # the reads in flight now hold the last references to the file
        done = 0
        while done < n:
            done += call(NR_IO_GETEVENTS, ctx, 1, AIO_BATCH, events, None)
        rounds += 1
    print(f"{rounds} rounds of {AIO_BATCH} reads", flush=True)


def op_ublk_ctrl(req):
    """A control command the `ublk` CLI does not offer (UPDATE_SIZE, QUIESCE_DEV), through the pushed
    ubdsrv package. Always reports the kernel's features and the device's flags, so a caller can
    tell "the kernel lacks it" from "the command failed"."""
    from ubdsrv import uapi
    from ubdsrv.ctrl import Ctrl, UblkError
    res = {}
    with Ctrl() as c:
        f = c.get_features()
        res["features"] = f
        res["feature_names"] = uapi.flag_names(f) if f is not None else []
        try:
            res["dev_flags"] = uapi.flag_names(c.get_dev_info(req["dev"]).flags)
        except UblkError as e:
            res["dev_flags"], res["dev_error"] = [], str(e)
        if req.get("cmd"):
            try:
                res["result"] = c.command(req["cmd"], req["dev"], data0=int(req.get("data0", 0)))
            except UblkError as e:
                res["error"], res["errno"] = str(e), e.errno
    return res


OPS = {name[3:]: fn for name, fn in globals().items() if name.startswith("op_")}


def handle(req):
    fn = OPS.get(req.get("op"))
    if fn is None:
        return {"error": f"unknown op {req.get('op')!r}"}
    try:
        return fn(req)
    except Exception as e:  # the host shows it; the agent keeps serving
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv):
    os.makedirs(JOBS_DIR, exist_ok=True)
    if argv[1:2] == ["call"]:
        print(json.dumps(handle(json.loads(base64.b64decode(argv[2])))), flush=True)
        return 0
    if argv[1:2] == ["write_acked"] and len(argv) == 6:
        write_acked(argv[2], argv[3], int(argv[4]), int(argv[5]))
        return 0
    if argv[1:2] == ["closing_reads"] and len(argv) == 4:
        closing_reads(argv[2], float(argv[3]))
        return 0
    if argv[1:2] != ["serve"]:
        print("usage: agent.py serve | call BASE64-JSON | write_acked DIR MANIFEST SIZE COUNT | "
              "closing_reads DEV SECONDS", file=sys.stderr)
        return 2
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError as e:
            print(json.dumps({"error": f"bad request: {e}"}), flush=True)
            continue
        print(json.dumps(handle(req)), flush=True)
        _reap_children()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
