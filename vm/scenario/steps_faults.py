"""Fault steps on a live guest: freezing and thawing the server, its graceful stop, reloading the
driver, the control commands only newer kernels have (UPDATE_SIZE, QUIESCE_DEV), and partition
rescans racing the last close of the device.

Same contract as steps.py: (ctx, step, timeout) -> a short note, or StepFailure."""
import math
import signal

from .errors import EXPECTATION, TIMEOUT, StepFailure
from .session import AGENT_REMOTE
from .steps import _out, _signal, _target_pid, _ublk, collect_steps

# What the server documents for SIGTERM (ubdsrv/daemon.py): the daemon stops the device and exits;
# the device stays, DEAD, until `ublk del`.
TERMINATED_STATE = "DEAD"
# The kernel release that brought each control command: named when a kernel lacks one.
CTRL_SINCE = {"UPDATE_SIZE": "6.14", "QUIESCE": "6.15"}


def _server_pids(ctx, d, queue) -> list:
    """queue None: the daemon and every queue task `ublk list` shows (a queue runs in a process of
    its own, so stopping the daemon alone would not stop IO); else that queue's task."""
    if queue is not None:
        return [_target_pid(ctx, d, queue)]
    info = ctx.agent.call("ublk_info", timeout=30, dev=d.id)
    pids = [info.get("daemon_pid")] + sorted(set(info.get("queue_tids", {}).values()))
    # Never signal a pid we could not read: an empty or small pid reaches process groups.
    if not all(isinstance(p, int) and p > 1 for p in pids) or len(pids) < 2:
        raise StepFailure(EXPECTATION, f"no valid server pids for {d.name} in `ublk list -n {d.id}`",
                          expected="a daemon pid and queue task ids > 1",
                          seen=info.get("raw") or "nothing listed", evidence=["server.log"])
    return list(dict.fromkeys(pids))


def _signal_server(ctx, step, sig) -> str:
    """`stop` remembers whom it stopped; `cont` (and `kill`) signal those without asking `ublk
    list`, which may block while a delete waits for the stopped server."""
    d, q = _ublk(ctx, step), step.args["queue"]
    if sig == signal.SIGCONT and (d.name, q) in ctx.stopped:
        pids = ctx.stopped.pop((d.name, q))
    else:
        pids = _server_pids(ctx, d, q)
    if sig == signal.SIGSTOP:
        ctx.stopped[(d.name, q)] = pids
    for pid in pids:
        _signal(ctx, d, pid, sig)
    who = f"queue {q} task" if q is not None else "daemon and queue tasks"
    return f"{signal.Signals(sig).name} to {d.name}'s {who} {' '.join(map(str, pids))}"


def step_stop(ctx, step, timeout):
    """SIGSTOP: the server (or one queue) freezes holding whatever IO it has."""
    return _signal_server(ctx, step, signal.SIGSTOP)


def step_cont(ctx, step, timeout):
    return _signal_server(ctx, step, signal.SIGCONT)


def step_terminate(ctx, step, timeout):
    """SIGTERM, the server's graceful stop: the daemon must exit and leave the device as documented."""
    d = _ublk(ctx, step)
    pid = _target_pid(ctx, d)
    _signal(ctx, d, pid, signal.SIGTERM)
    r = ctx.agent.call("wait_exit", timeout=timeout, pid=pid)
    if not r.get("exited"):
        raise StepFailure(TIMEOUT, f"daemon {pid} of {d.name} did not exit after SIGTERM",
                          expected=f"exit within {timeout:g} s", seen=f"state {r.get('state')}",
                          evidence=["server.log"])
    w = ctx.agent.call("wait_state", timeout=60, dev=d.id, state=TERMINATED_STATE, within=30)
    if not w.get("reached"):
        raise StepFailure(EXPECTATION, f"{d.name} is not {TERMINATED_STATE} after its daemon's "
                                       "graceful stop", expected=f"state {TERMINATED_STATE}",
                          seen=f"{w.get('state')} ({w.get('raw', '')[:200]})", evidence=["server.log"])
    return f"daemon {pid} exited, device {TERMINATED_STATE}"


MODULE_RELOAD = (
    "modprobe -r ublk_drv || { echo 'modprobe -r ublk_drv failed' >&2; exit 1; }; "
    "[ -e /sys/module/ublk_drv ] && { echo 'ublk_drv still loaded after modprobe -r' >&2; exit 1; }; "
    "[ -e /dev/ublk-control ] && { echo '/dev/ublk-control still there without the module' >&2; "
    "exit 1; }; "
    "modprobe ublk_drv || { echo 'modprobe ublk_drv failed' >&2; exit 1; }; "
    "for i in $(seq 50); do [ -c /dev/ublk-control ] && exit 0; sleep 0.1; done; "
    "echo '/dev/ublk-control did not come back after modprobe ublk_drv' >&2; exit 1")


def step_module_reload(ctx, step, timeout):
    r = ctx.run(MODULE_RELOAD, timeout, "module_reload")
    if r["status"] != 0:
        raise StepFailure(EXPECTATION, "reloading ublk_drv failed",
                          expected="module gone after modprobe -r, /dev/ublk-control back after "
                                   "modprobe", seen=_out(r), evidence=["dmesg.txt"])
    return "unloaded and loaded again, /dev/ublk-control back"


def _ctrl(ctx, d, cmd, need, data0=0, dev_flag=None) -> dict:
    """A control command through the agent, after checking the kernel (and the device) have it."""
    info = ctx.agent.call("ublk_ctrl", timeout=30, dev=d.id)
    if "error" in info and "feature_names" not in info:
        raise StepFailure(EXPECTATION, f"reading the driver's features: {info['error']}")
    if info["features"] is None or need not in info["feature_names"]:
        raise StepFailure(EXPECTATION, f"this kernel's ublk_drv lacks UBLK_F_{need} (Linux "
                                       f"{CTRL_SINCE[need]}+): {cmd} cannot run here",
                          expected=f"UBLK_F_{need} among the driver's features",
                          seen="features: " + (" ".join(info["feature_names"]) or "none reported"))
    if dev_flag and dev_flag not in info["dev_flags"]:
        raise StepFailure(EXPECTATION, f"{d.name} was added without UBLK_F_{dev_flag}: the kernel "
                                       f"refuses {cmd} for it",
                          expected=f"UBLK_F_{dev_flag} in the device's flags",
                          seen="device flags: " + " ".join(info["dev_flags"]))
    r = ctx.agent.call("ublk_ctrl", timeout=60, dev=d.id, cmd=cmd, data0=data0)
    if "error" in r:
        raise StepFailure(EXPECTATION, f"{cmd} on {d.name} failed: {r['error']}",
                          expected="the command succeeds", seen=r["error"], evidence=["dmesg.txt"])
    return r


def step_partition_rescan(ctx, step, timeout):
    """BLKRRPART in a loop (each rescan holds the disk's open_mutex while it reads the partition
    table through the server) while agent.py's closing_reads closes the device under its own AIO
    reads. A driver that completes those reads with softirqs on runs the last fput, and so
    blkdev_release, in the server's task: it waits for open_mutex, the rescan waits for the server,
    and the step times out with both in the blocked-task dump (c258f5c4502c)."""
    d = _ublk(ctx, step)
    dev, secs = ctx.dev_path(d), step.args["seconds"]
    cmd = (f"python3 {AGENT_REMOTE} closing_reads {dev} {secs:g} & reads=$!; "
           f"end=$((SECONDS + {math.ceil(secs)})); n=0; "
           f"while [ $SECONDS -lt $end ]; do blockdev --rereadpt {dev} 2>/dev/null; n=$((n + 1)); done; "
           f"wait $reads && echo \"$n rescans\"")
    out = ctx.check(cmd, timeout, f"partition_rescan on {d.name}")["stdout"].split("\n")
    return ", ".join(line for line in out if line)


def step_update_size(ctx, step, timeout):
    d, size = _ublk(ctx, step), step.args["size"]
    _ctrl(ctx, d, "UPDATE_SIZE", "UPDATE_SIZE", data0=size >> 9)
    r = ctx.check(f"cat /sys/block/ublkb{d.id}/size", timeout, f"reading the size of {d.name}")
    seen = int(r["stdout"].strip() or -1)
    if seen != size >> 9:
        raise StepFailure(EXPECTATION, f"{d.name} did not take its new size",
                          expected=f"{size >> 9} sectors", seen=f"{seen} sectors")
    return f"{size >> 9} sectors"


def step_quiesce(ctx, step, timeout):
    """QUIESCE_DEV: the kernel parks IO and hands the server's commands back; the device must then
    be QUIESCED (a `recover` brings it back)."""
    d, within = _ublk(ctx, step), step.args["within"]
    _ctrl(ctx, d, "QUIESCE_DEV", "QUIESCE", data0=int(within * 1000), dev_flag="QUIESCE")
    w = ctx.agent.call("wait_state", timeout=within + 30, dev=d.id, state="QUIESCED", within=within)
    if not w.get("reached"):
        raise StepFailure(EXPECTATION, f"{d.name} is not QUIESCED after QUIESCE_DEV",
                          expected="state QUIESCED", seen=str(w.get("state")), evidence=["server.log"])
    return f"QUIESCED after {w['elapsed']:.1f} s"


RUN = collect_steps(globals())
