"""Kernel health after every case: what makes a pass trustworthy.

dmesg since the case began must hold no splat, the taint mask must not have grown, no ublk device
node or server process may be left, and ublk_drv must unload (unless the kernel has it built in,
as an existing machine's may). Then (always, pass or fail) the guest
is cleaned up so that the next case on it starts from nothing; if that fails, it is not reused."""
from dataclasses import dataclass, field

from ..device import find_splats, headline
from .errors import EXPECTATION, SPLAT

# /proc/sys/kernel/tainted bits, as Documentation/admin-guide/tainted-kernels.rst names them.
TAINT = {0: "P proprietary module", 1: "F forced module load", 2: "S unsafe SMP",
         3: "R forced module unload", 4: "M machine check", 5: "B bad page", 6: "U user request",
         7: "D kernel died (oops/BUG)", 8: "A ACPI overridden", 9: "W kernel warning",
         10: "C staging driver", 11: "I firmware workaround", 12: "O out-of-tree module",
         13: "E unsigned module", 14: "L soft lockup", 15: "K live patched", 16: "X auxiliary",
         17: "T struct randomization", 18: "N in-kernel test"}


# how modprobe -r refuses a driver compiled into the kernel: nothing to unload, nothing wrong
BUILT_IN = "is builtin."


@dataclass
class Health:
    problems: list = field(default_factory=list)   # (kind, message) in the order found
    dmesg: list = field(default_factory=list)
    splat_lines: list = field(default_factory=list)
    new_taint: int = 0
    clean_after: bool = True                       # the guest ended up clean: reusable


def decode_taint(mask: int) -> str:
    return ", ".join(TAINT.get(b, f"bit {b}") for b in range(32) if mask >> b & 1)


def check(agent, kmsg_seq: int, taint_before: int, steps_passed: bool) -> Health:
    """Runs the checks; leftovers count as problems only when the steps themselves passed (after a
    failed step they are expected and merely cleaned up). Always leaves the guest clean if it can."""
    h = Health()
    agent.call("kill_jobs", timeout=20)
    snap = agent.call("snapshot", timeout=30)
    leftovers = []
    if snap["mounts"]:
        leftovers.append(f"still mounted: {', '.join(snap['mounts'])}")
    if snap["devices"]:
        leftovers.append(f"device nodes left: {' '.join(snap['devices'])}")
    if snap["loops"]:
        leftovers.append(f"kernel loop devices left: {' '.join(snap['loops'])}")
    if snap["servers"]:
        leftovers.append("server processes left: " +
                         "; ".join(f"{p['pid']} {p['cmdline'][:80]}" for p in snap["servers"]))
    if steps_passed:
        h.problems += [(EXPECTATION, "health: " + m) for m in leftovers]
    if leftovers:
        _clean(agent, snap)
    r = agent.call("run", timeout=60, cmd="modprobe -r ublk_drv")
    msg = (r.get("stderr") or r.get("stdout") or "").strip() or f"exit {r.get('status')}"
    if r.get("status") != 0 and not msg.endswith(BUILT_IN):
        h.clean_after = False
        if steps_passed or not leftovers:
            h.problems.append((EXPECTATION, f"health: `modprobe -r ublk_drv` failed: {msg}"))
    # Read dmesg after the unload, so a splat during module removal is caught too.
    h.dmesg = agent.call("kmsg_since", timeout=30, seq=kmsg_seq).get("lines", [])
    splats = find_splats(h.dmesg)
    if splats:
        h.splat_lines = [line for _, line in splats]
        kinds = sorted({k for k, _ in splats})
        h.problems.append((SPLAT, f"kernel splat in dmesg ({', '.join(kinds)}): {headline(splats)}"))
    taint = agent.call("snapshot", timeout=30)["tainted"]
    h.new_taint = taint & ~taint_before
    if h.new_taint:
        h.problems.append((SPLAT, f"kernel tainted during the case: {decode_taint(h.new_taint)}"))
        h.clean_after = False
    if leftovers:
        after = agent.call("snapshot", timeout=30)
        if any(after[k] for k in ("devices", "servers", "mounts", "loops")):
            h.clean_after = False
    return h


def _clean(agent, snap):
    """Best effort, bounded: unmount, delete all devices, kill what is left of the server."""
    for m in snap["mounts"]:
        agent.call("run", timeout=30, cmd=f"umount -l {m}")
    agent.call("run", timeout=60, cmd="ublk del -a")
    agent.call("kill_servers", timeout=20)
    agent.call("run", timeout=30, cmd="ublk del -a; losetup -D; true")
