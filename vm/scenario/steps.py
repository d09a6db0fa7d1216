"""What each step kind does in the guest and how its outcome is judged.

A step function gets the running case's context, the Step and its deadline in seconds; it returns a
short note of what it saw (for the step log) or raises StepFailure. Commands are composed so that
a step costs one round trip to the guest agent where possible."""
import shlex
import signal
import time
from dataclasses import dataclass, field

from .. import device
from .errors import EXPECTATION, TIMEOUT, StepFailure
from .model import WORK_DIR, Case, Device

FIO_DIR = f"{WORK_DIR}/fio"


@dataclass
class Context:
    """State of one running case, shared by its steps."""
    case: Case
    agent: object
    loop: int = 0                                    # 0-based
    loop_devices: dict = field(default_factory=dict)  # device name -> /dev/loopN (kernel_loop)
    running: dict = field(default_factory=dict)       # background job -> its fio Step
    fio: list = field(default_factory=list)           # summaries of finished fio runs
    comparisons: list = field(default_factory=list)
    daemon_pids: dict = field(default_factory=dict)   # device name -> pid seen at add/recover
    deletes: dict = field(default_factory=dict)       # device name -> its background `ublk del` job
    stopped: dict = field(default_factory=dict)       # (device, queue) -> pids `stop` stopped
    # --- across boots (power_cut, reboot): the runner's hook starts the agent on a new boot ---
    new_boot: object = None                           # callable(ctx): agent, kmsg mark, taint
    kmsg_mark: int = -1                               # dmesg of this boot after this seq is the case's
    taint0: int = 0                                   # taint mask of this boot when the case began
    boots: int = 0                                    # boots begun by steps (power cuts, reboots)
    earlier_dmesg: list = field(default_factory=list)  # the case's dmesg of the boots before
    writers: dict = field(default_factory=dict)       # device name -> guest manifest of write_acked
    acked: dict = field(default_factory=dict)         # device name -> manifest read before the cut
    evidence: dict = field(default_factory=dict)      # file name -> text, saved in the case folder

    @property
    def guest(self):
        return self.agent.guest

    def dev_path(self, d: Device) -> str:
        return self.loop_devices[d.name] if not d.is_ublk else f"/dev/ublkb{d.id}"

    def run(self, cmd, timeout, what, **kw) -> dict:
        """Runs a shell command; a deadline overrun is a TIMEOUT failure with its output."""
        r = self.agent.call("run", timeout=timeout, cmd=cmd, **kw)
        if "error" in r:
            raise StepFailure(EXPECTATION, f"{what}: agent error: {r['error']}")
        if r["timed_out"]:
            stuck = " and could not be killed (stuck in D state)" if r["stuck"] else ""
            raise StepFailure(TIMEOUT, f"{what} did not finish within {timeout:g} s{stuck}",
                              expected=f"done within {timeout:g} s", seen=_out(r) or "no output",
                              evidence=["dmesg.txt (blocked tasks dumped with sysrq-w)"])
        return r

    def check(self, cmd, timeout, what, **kw) -> dict:
        r = self.run(cmd, timeout, what, **kw)
        if r["status"] != 0:
            raise StepFailure(EXPECTATION, f"{what} failed (exit {r['status']})",
                              expected="exit status 0", seen=_out(r) or f"exit {r['status']}",
                              evidence=["server.log", "dmesg.txt"])
        return r


def _out(r, limit=600) -> str:
    text = (r.get("stderr", "") + "\n" + r.get("stdout", "")).strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _ublk(ctx, step) -> Device:
    return ctx.case.devices[step.args["device"]]


def _create_file(d: Device) -> str:
    f = shlex.quote(d.file)
    return f"mkdir -p \"$(dirname {f})\" && {{ [ -e {f} ] || truncate -s {d.size} {f}; }}"


# --- devices -------------------------------------------------------------------------------------
def step_add(ctx, step, timeout):
    d = _ublk(ctx, step)
    prep = _create_file(d) + " && " if d.file else ""
    if not d.is_ublk:
        r = ctx.check(f"{prep}modprobe loop && {device.add_command(d)}", timeout, f"losetup {d.file}")
        ctx.loop_devices[d.name] = r["stdout"].strip().splitlines()[-1]
        return ctx.loop_devices[d.name] + _set_scheduler(ctx, d, timeout)
    if step.args["expect"] == "fails":
        return _add_fails(ctx, d, prep, timeout)
    ctx.check(prep + device.add_command(d), timeout, f"ublk add ({d.name})")
    info = ctx.agent.call("ublk_info", timeout=30, dev=d.id)
    if info.get("state") != "LIVE":
        raise StepFailure(EXPECTATION, f"device {d.name} is not LIVE after `ublk add`",
                          expected="state LIVE", seen=info.get("raw") or str(info),
                          evidence=["server.log"])
    ctx.daemon_pids[d.name] = info["daemon_pid"]
    for key in [k for k in ctx.stopped if k[0] == d.name]:   # pids of an earlier server
        del ctx.stopped[key]
    return f"/dev/ublkb{d.id} LIVE, daemon pid {info['daemon_pid']}" + _set_scheduler(ctx, d, timeout)


def _set_scheduler(ctx, d, timeout) -> str:
    cmd = device.scheduler_command(d, ctx.dev_path(d))
    if not cmd:
        return ""
    ctx.check(cmd, timeout, f"I/O scheduler {d.scheduler} on {d.name}")
    return f", scheduler {d.scheduler}"


def _add_fails(ctx, d, prep, timeout):
    """`ublk add` that must fail (the server dies while it starts): the CLI has to say so and
    remove what it added; a server process left behind is the health check's to find."""
    r = ctx.run(prep + device.add_command(d), timeout, f"ublk add ({d.name})")
    if r["status"] == 0:
        raise StepFailure(EXPECTATION, f"`ublk add` of {d.name} succeeded",
                          expected="`ublk add` fails: its server dies while it starts",
                          seen=_out(r), evidence=["server.log"])
    w = ctx.agent.call("wait_state", timeout=60, dev=d.id, state="GONE", within=30)
    if not w.get("reached"):
        raise StepFailure(EXPECTATION, f"the failed `ublk add` left {d.name} behind",
                          expected=f"no device /dev/ublkc{d.id} after the failed add",
                          seen=f"{w.get('state')} ({w.get('raw', '')[:300]})",
                          evidence=["server.log", "dmesg.txt"])
    why = (r["stderr"].strip().splitlines() or ["?"])[-1][:160]
    return f"failed as expected (exit {r['status']}: {why}); no device left"


def step_delete(ctx, step, timeout):
    d = _ublk(ctx, step)
    if step.args["background"]:
        ctx.agent.call("spawn", timeout=10, job=f"del-{d.name}", cmd=f"ublk del -n {d.id}", cwd="/")
        ctx.deletes[d.name] = f"del-{d.name}"
        return "`ublk del` started in the background"
    if not d.is_ublk:
        ctx.check(f"losetup -d {ctx.loop_devices.pop(d.name)}", timeout, f"losetup -d ({d.name})")
        return "detached"
    r = ctx.check(f"ublk del -n {d.id}", timeout, f"ublk del -n {d.id} ({d.name})")
    return f"deleted in {r['elapsed']:.1f} s"


def _target_pid(ctx, d: Device, queue=None) -> int:
    info = ctx.agent.call("ublk_info", timeout=30, dev=d.id)
    pid = info.get("daemon_pid") if queue is None else info.get("queue_tids", {}).get(str(queue))
    who = "daemon" if queue is None else f"queue {queue} task"
    # Never signal a pid we could not read: an empty or small pid reaches process groups.
    if not isinstance(pid, int) or pid <= 1:
        raise StepFailure(EXPECTATION, f"no valid {who} pid for {d.name} in `ublk list -n {d.id}`",
                          expected=f"a {who} pid > 1",
                          seen=info.get("raw") or str(info.get("state") or "nothing listed"),
                          evidence=["server.log"])
    return pid


def _signal(ctx, d, pid, sig):
    r = ctx.agent.call("signal", timeout=10, pid=pid, signal=sig)
    if not r.get("sent"):
        raise StepFailure(EXPECTATION, f"could not signal {d.name}: {r.get('error')}",
                          expected="a ubdsrv process to signal", seen=r.get("error", ""))


def step_kill(ctx, step, timeout):
    d, sig, q = _ublk(ctx, step), step.args["signal"], step.args["queue"]
    # a server stopped by `stop` is signalled by the pids seen then: `ublk list` may block while a
    # delete of its device waits for it (STOP_DEV holds the device's mutex)
    stopped = ctx.stopped.get((d.name, q))
    pid = stopped[0] if stopped else _target_pid(ctx, d, q)
    _signal(ctx, d, pid, sig)
    if sig == signal.SIGKILL:
        ctx.stopped.pop((d.name, q), None)
    return f"sent {signal.Signals(sig).name} to pid {pid}"


BUSY = ("EBUSY", "busy", "errno 16", "Errno 16")


def step_recover(ctx, step, timeout):
    """6.12 answers START_USER_RECOVERY with EBUSY until the old daemon's fd is closed: retry."""
    d = _ublk(ctx, step)
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        left = max(1.0, deadline - time.monotonic())
        r = ctx.run(f"ublk recover -n {d.id}", left, f"ublk recover -n {d.id}")
        if r["status"] == 0:
            return f"recovered after {tries} attempt(s)"
        if not any(b in _out(r, 4000) for b in BUSY) or time.monotonic() > deadline:
            raise StepFailure(EXPECTATION, f"ublk recover -n {d.id} ({d.name}) failed",
                              expected="exit status 0", seen=_out(r), evidence=["server.log"])
        time.sleep(0.5)


def step_wait_state(ctx, step, timeout):
    d, want, within = _ublk(ctx, step), step.args["state"], step.args["within"]
    r = ctx.agent.call("wait_state", timeout=within + 30, dev=d.id, state=want, within=within)
    if "error" in r:
        raise StepFailure(EXPECTATION, f"reading the state of {d.name}: {r['error']}")
    path = " -> ".join(f"{s}@{t:g}s" for t, s in r["history"])
    if not r["reached"]:
        raise StepFailure(EXPECTATION, f"{d.name} did not reach {want} within {within:g} s",
                          expected=f"state {want} within {within:g} s",
                          seen=f"{r['state']} after {r['elapsed']:.1f} s (states seen: {path})",
                          evidence=["server.log", "dmesg.txt"])
    note = f"{want} after {r['elapsed']:.1f} s"
    if want == "GONE" and d.name in ctx.deletes:   # the background `ublk del` must end, and well
        job = ctx.deletes.pop(d.name)
        j = ctx.agent.call("reap", timeout=within + 30, job=job)
        if j.get("timed_out") or j.get("status") != 0:
            raise StepFailure(EXPECTATION, f"the background `ublk del -n {d.id}` failed",
                              expected="exit status 0 once the device is gone",
                              seen=(j.get("out") or "")[-400:] or f"status {j.get('status')}",
                              evidence=["server.log"])
        note += "; the background `ublk del` exited 0"
    return note


# --- IO ------------------------------------------------------------------------------------------
def fio_command(ctx, step) -> tuple:
    """(command, json path). Verify jobs get disjoint regions, so parallel jobs don't overwrite
    each other's blocks and a crc32c mismatch means the data path lost or mixed data."""
    a = step.args
    if a["device"]:
        d = ctx.case.devices[a["device"]]
        target, total = ctx.dev_path(d), d.size
    else:
        target, total = a["file"], a["size"] * a["numjobs"]
    out = f"{FIO_DIR}/{a['job']}-loop{ctx.loop + 1}.json"
    args = ["fio", f"--name={a['job']}", f"--filename={target}", f"--rw={a['rw']}",
            f"--bs={a['bs']}", f"--iodepth={a['iodepth']}", f"--numjobs={a['numjobs']}",
            f"--ioengine={a['ioengine']}", f"--direct={int(a['direct'])}", "--group_reporting",
            "--output-format=json", f"--output={out}"]
    if a["runtime"]:
        args += [f"--runtime={a['runtime']:g}", "--time_based"]
    size = a["size"]
    if a["verify"] != "none":
        per_job = (size or total // a["numjobs"]) // a["bs"] * a["bs"]
        args += [f"--verify={a['verify']}", "--do_verify=1", "--verify_fatal=1",
                 "--verify_state_save=0", f"--size={per_job}", f"--offset_increment={per_job}"]
    elif size:
        args.append(f"--size={size}")
    return f"mkdir -p {FIO_DIR} && " + shlex.join(args), out


VERIFY_FAILED = ("verify failed", "bad magic header", "verify: bad header")


def judge_fio(step, status, summary, output) -> str:
    """Checks a finished fio run against the step's `expect`; returns what was seen."""
    expect = step.args["expect"]
    errors = (summary or {}).get("errors")
    failed = status != 0 or bool(errors)
    seen = f"fio exit {status}" + (f", {summary['error_text']}" if errors else "")
    if status != 0 and output.strip():
        seen += "; " + output.strip().splitlines()[-1][:300]
    # data that reads back wrong is never an allowed error, whatever `expect` says
    if (summary or {}).get("verify_failed") or any(m in output for m in VERIFY_FAILED):
        raise StepFailure(EXPECTATION, f"fio job {step.args['job']}: data did not verify",
                          expected="every block reads back as written", seen=seen,
                          evidence=[f"fio/{step.args['job']}-*.json", "dmesg.txt", "server.log"])
    if expect == "ok" and failed:
        raise StepFailure(EXPECTATION, f"fio job {step.args['job']} failed",
                          expected="fio exit 0, no IO errors" +
                          (", data verified" if step.args["verify"] != "none" else ""),
                          seen=seen, evidence=[f"fio/{step.args['job']}-*.json", "dmesg.txt"])
    if expect == "errors" and not failed:
        raise StepFailure(EXPECTATION, f"fio job {step.args['job']} saw no IO errors",
                          expected="IO errors (the device should fail IO here)", seen=seen,
                          evidence=[f"fio/{step.args['job']}-*.json"])
    return seen


def _record_fio(ctx, step, r):
    s = dict(r.get("fio") or {})
    s.update(job=step.args["job"], loop=ctx.loop + 1, status=r["status"], step=step.describe())
    ctx.fio.append(s)
    return s


def step_fio(ctx, step, timeout):
    cmd, out = fio_command(ctx, step)
    if step.args["background"]:
        ctx.agent.call("spawn", timeout=10, job=step.args["job"], cmd=cmd, cwd=WORK_DIR)
        ctx.running[step.args["job"]] = step
        return "started in the background"
    r = ctx.run(cmd, timeout, f"fio {step.args['job']}", fio_json=out, cwd=WORK_DIR)
    s = _record_fio(ctx, step, r)
    return judge_fio(step, r["status"], s, r["stderr"] + r["stdout"]) + _rate(s)


def reap(ctx, job, timeout) -> str:
    """Waits for a background fio and judges it (used by `wait` and at the end of a loop)."""
    step = ctx.running.pop(job)
    out = f"{FIO_DIR}/{job}-loop{ctx.loop + 1}.json"
    r = ctx.agent.call("reap", timeout=timeout, job=job, fio_json=out)
    if "error" in r:
        raise StepFailure(EXPECTATION, f"reaping fio {job}: {r['error']}")
    if r["timed_out"]:
        raise StepFailure(TIMEOUT, f"background fio {job} did not end within {timeout:g} s "
                                   "(IO hung?)", expected=f"fio done within {timeout:g} s",
                          seen=r["out"][-400:] or "no output", evidence=["dmesg.txt"])
    s = _record_fio(ctx, step, r)
    return judge_fio(step, r["status"], s, r["out"]) + _rate(s)


def _rate(s):
    if not s.get("parsed"):
        return ""
    return f" ({s['read_iops'] + s['write_iops']:.0f} IOPS)"


def step_wait(ctx, step, timeout):
    return reap(ctx, step.args["job"], timeout)


def step_compare(ctx, step, timeout):
    a, b = step.args["jobs"]
    runs = {s["job"]: s for s in ctx.fio if s["loop"] == ctx.loop + 1}
    ra, rb = runs.get(a), runs.get(b)
    if not (ra and rb and ra.get("parsed") and rb.get("parsed")):
        raise StepFailure(EXPECTATION, f"compare: no fio numbers for {a} and {b}",
                          expected="both jobs finished with JSON output", seen=str(list(runs)))
    ia, ib = ra["read_iops"] + ra["write_iops"], rb["read_iops"] + rb["write_iops"]
    ratio = ia / ib if ib else float("inf")
    row = {"loop": ctx.loop + 1, "a": a, "b": b, "iops_a": ia, "iops_b": ib, "ratio": ratio,
           "bw_kib_a": ra["read_bw_kib"] + ra["write_bw_kib"],
           "bw_kib_b": rb["read_bw_kib"] + rb["write_bw_kib"]}
    ctx.comparisons.append(row)
    seen = f"{a} {ia:.0f} IOPS vs {b} {ib:.0f} IOPS: ratio {ratio:.2f}"
    floor = step.args["min_ratio"]
    if floor is not None and ratio < floor:
        raise StepFailure(EXPECTATION, f"{a} is slower than {floor:g} x {b}",
                          expected=f"ratio >= {floor:g}", seen=seen, evidence=["fio/"])
    return seen


# --- filesystems ---------------------------------------------------------------------------------
def _manifest(d):
    """Kept outside the filesystem, keyed by the backing file when there is one: a kernel_loop
    device over the same file then checks what the ublk device wrote."""
    import os.path
    key = os.path.basename(d.file) if d.file else d.name
    return shlex.quote(f"{WORK_DIR}/{key}.sha256")   # a shell word: file names may hold anything


def step_mkfs(ctx, step, timeout):
    d = _ublk(ctx, step)
    tool = {"xfs": "mkfs.xfs -f -q", "ext4": "mkfs.ext4 -F -q", "ext2": "mkfs.ext2 -F -q"}
    ctx.check(f"{tool[step.args['fs']]} {shlex.quote(ctx.dev_path(d))}", timeout,
              f"mkfs.{step.args['fs']}")
    return step.args["fs"]


def step_mount(ctx, step, timeout):
    d = _ublk(ctx, step)
    opts = f"-o {step.args['options']} " if step.args["options"] else ""
    mnt = shlex.quote(d.mountpoint)
    ctx.check(f"mkdir -p {mnt} && mount {opts}{shlex.quote(ctx.dev_path(d))} {mnt}",
              timeout, f"mount {d.name}")
    return d.mountpoint


def step_write_files(ctx, step, timeout):
    d, n, size = _ublk(ctx, step), step.args["count"], step.args["size"]
    ctx.check(f"cd {shlex.quote(d.mountpoint)} && mkdir -p data && for i in $(seq 1 {n}); do "
              f"head -c {size} /dev/urandom > data/f$i || exit 1; done && sync && "
              f"sha256sum data/* > {_manifest(d)}", timeout, f"write_files on {d.name}")
    return f"{n} x {size} bytes"


def step_checksum(ctx, step, timeout):
    d = _ublk(ctx, step)
    r = ctx.run(f"sync && echo 3 > /proc/sys/vm/drop_caches && cd {shlex.quote(d.mountpoint)} && "
                f"sha256sum -c --quiet {_manifest(d)}", timeout, f"checksum on {d.name}")
    if r["status"] != 0:
        raise StepFailure(EXPECTATION, f"data on {d.name} does not match what was written",
                          expected="every file's sha256 as written (data verified)",
                          seen=_out(r), evidence=["dmesg.txt", "server.log"])
    return "data verified"


def step_umount(ctx, step, timeout):
    d = _ublk(ctx, step)
    ctx.check(f"umount {shlex.quote(d.mountpoint)}", timeout, f"umount {d.name}")
    return "unmounted"


def step_fsck(ctx, step, timeout):
    d = _ublk(ctx, step)
    tool = "xfs_repair -n" if step.args["fs"] == "xfs" else "e2fsck -fn"
    r = ctx.run(f"{tool} {shlex.quote(ctx.dev_path(d))}", timeout, f"fsck {d.name}")
    if r["status"] != 0:
        raise StepFailure(EXPECTATION, f"the filesystem on {d.name} is not clean",
                          expected=f"`{tool}` exit 0", seen=_out(r), evidence=["dmesg.txt"])
    return "clean"


# --- misc ----------------------------------------------------------------------------------------
def step_sleep(ctx, step, timeout):
    seconds = step.args["seconds"]
    if seconds > timeout:   # the scenario deadline is nearer than the end of the sleep
        time.sleep(timeout)
        raise StepFailure(TIMEOUT, f"a sleep of {seconds:g} s runs past the deadline",
                          expected=f"done within {timeout:.1f} s")
    time.sleep(seconds)
    return ""


def step_shell(ctx, step, timeout):
    r = ctx.run(step.args["run"], timeout, "shell step", cwd=WORK_DIR)
    if r["status"] != step.args["expect_status"]:
        raise StepFailure(EXPECTATION, f"shell step exited {r['status']}",
                          expected=f"exit status {step.args['expect_status']}",
                          seen=_out(r) or f"exit {r['status']}")
    return (r["stdout"].strip().splitlines() or [""])[-1][:120]


def collect_steps(namespace) -> dict:
    """`do` name -> function, for every step_* in a module's namespace."""
    return {name[5:]: fn for name, fn in namespace.items() if name.startswith("step_")}


RUN = collect_steps(globals())
# Fault and machine-level steps live in their own modules; they use the helpers above.
from . import steps_crash, steps_faults  # noqa: E402
RUN.update(steps_faults.RUN)
RUN.update(steps_crash.RUN)
