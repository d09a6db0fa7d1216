"""Crash consistency across boots: a writer that records what the kernel acknowledged as durable,
the power cut and the clean reboot (machine-level acts of vm/guest.py), and the check afterwards.

`write_acked` writes files on a mounted device, each fsync()ed with its directory before it is
listed in a manifest kept off the device (in the guest's /run). `power_cut` first reads that
manifest to the host: every line was durable before the host read it, so every file it names must
survive the cut whole. Then QEMU is killed, the same disks boot again, the runner's hook starts the
agent in the new boot, and the following steps (add, mount, verify_acked, fsck) run there."""
import shlex
import time

from ..guest import REBOOT_DEADLINE
from .errors import EXPECTATION, TIMEOUT, StepFailure
from .session import AGENT_REMOTE
from .steps import _ublk, collect_steps

MANIFEST_DIR = "/run/ubd-scenario"   # tmpfs in the guest: off the device, read by the host
ACKED_SUBDIR = "acked"               # under the device's mountpoint


def manifest_path(d) -> str:
    return f"{MANIFEST_DIR}/acked-{d.name}.txt"


def step_write_acked(ctx, step, timeout):
    d, size = _ublk(ctx, step), step.args["size"]
    path = manifest_path(d)
    cmd = (f"rm -f {path} && exec python3 -u {AGENT_REMOTE} write_acked "
           f"{shlex.quote(f'{d.mountpoint}/{ACKED_SUBDIR}')} {path} {size} 0")
    ctx.agent.call("spawn", timeout=10, job=f"acked-{d.name}", cmd=cmd, cwd="/")
    ctx.writers[d.name] = path
    return f"writing {size}-byte files, each fsync()ed before it is listed"


def _read_manifests(ctx) -> str:
    """Copies each running writer's manifest to the host (whole lines only: one may be half
    appended while we read)."""
    counts = []
    for name, path in ctx.writers.items():
        r = ctx.agent.call("read_text", timeout=30, path=path)
        text = "" if r.get("missing") else r.get("text", "")
        text = text[:text.rfind("\n") + 1]
        ctx.acked[name] = text
        ctx.evidence[f"acked-{name}.txt"] = text
        counts.append(f"{text.count(chr(10))} files acknowledged on {name}")
    ctx.writers.clear()
    return ", ".join(counts)


def _end_boot(ctx, why):
    """Keeps this boot's part of the case's dmesg for the health check (the kernel log restarts)."""
    lines = ctx.agent.call("kmsg_since", timeout=30, seq=ctx.kmsg_mark).get("lines", [])
    ctx.earlier_dmesg += [f"--- boot {ctx.boots + 1} of the case, up to the {why} ---", *lines]
    ctx.agent.close()


def _boot_again(ctx) -> float:
    """The same disks once more; what lived in the old boot (devices, servers, background jobs)
    is gone. Boot failures propagate (a panic, a boot timeout)."""
    t0 = time.monotonic()
    for table in (ctx.running, ctx.loop_devices, ctx.daemon_pids, ctx.writers, ctx.deletes,
                  ctx.stopped):
        table.clear()
    ctx.guest.boot_again()
    ctx.boots += 1
    ctx.new_boot(ctx)
    return time.monotonic() - t0


def step_power_cut(ctx, step, timeout):
    acked = _read_manifests(ctx)
    _end_boot(ctx, "power cut")
    ctx.guest.power_cut()
    took = _boot_again(ctx)
    return (acked + "; " if acked else "") + f"QEMU killed, booted again in {took:.1f} s"


def step_reboot(ctx, step, timeout):
    acked = _read_manifests(ctx)
    _end_boot(ctx, "reboot")
    deadline = min(timeout, REBOOT_DEADLINE)
    if not ctx.guest.reboot(deadline):
        ctx.guest.power_cut()       # so the case can go on to its evidence
        _boot_again(ctx)
        raise StepFailure(TIMEOUT, f"the guest did not go down within {deadline:g} s of `reboot`; "
                                   "it was powered off hard",
                          expected="a clean reboot", seen="still running at the deadline",
                          evidence=["console.log"])
    took = _boot_again(ctx)
    return (acked + "; " if acked else "") + f"rebooted cleanly, up again in {took:.1f} s"


def step_verify_acked(ctx, step, timeout):
    d = _ublk(ctx, step)
    manifest = ctx.acked.get(d.name, "")
    total = manifest.count("\n")
    if total == 0:
        raise StepFailure(EXPECTATION, f"no file on {d.name} was acknowledged before the cut, so "
                                       "the check would prove nothing",
                          expected="write_acked had at least one file fsync()ed",
                          seen="an empty manifest (did the writer start? was the cut too early?)",
                          evidence=["server.log", "dmesg.txt"])
    r = ctx.agent.call("verify_acked", timeout=timeout, manifest=manifest,
                       dir=f"{d.mountpoint}/{ACKED_SUBDIR}")
    if "error" in r:
        raise StepFailure(EXPECTATION, f"verify_acked on {d.name}: agent error: {r['error']}")
    if r["bad"]:
        raise StepFailure(EXPECTATION, f"{r['bad']} of {total} files acknowledged on {d.name} "
                                       "before the cut are lost or damaged",
                          expected="every file fsync()ed before the cut reads back whole",
                          seen="\n".join(r["problems"][:8]),
                          evidence=[f"acked-{d.name}.txt", "dmesg.txt", "server.log"])
    return f"all {r['ok']} acknowledged files intact"


RUN = collect_steps(globals())
