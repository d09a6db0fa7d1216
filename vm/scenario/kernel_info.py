"""Which kernel produced a result: written into result.json (`kernel`), the JUnit <properties> and
the console summary, and read back by matrix.py to name a column."""
import subprocess
from pathlib import Path


def git_describe(tree) -> str:
    """`git describe --always --dirty` of a kernel tree; "" when it is no git tree."""
    if not tree:
        return ""
    try:
        r = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return r.stdout.strip() if r.returncode == 0 else ""


def describe(guest: dict, release: str, accel: str) -> dict:
    """guest: the GuestOptions fields of the run (vm/options.py values())."""
    tree = guest.get("kernel_tree")
    return {"release": release or "", "flavour": guest.get("flavour", ""),
            "tree": str(Path(tree).resolve()) if tree else "",
            "tree_describe": git_describe(tree),
            "debug": bool(tree and guest.get("kernel_debug")), "accel": accel or ""}


def line(k: dict) -> str:
    """One line for the console: `kernel 6.12.57+deb13-cloud-amd64 (flavour cloud, tcg)`."""
    source = f"tree {k['tree']}" + (f" at {k['tree_describe']}" if k["tree_describe"] else "") \
        if k.get("tree") else f"flavour {k.get('flavour')}"
    extra = ", debug build" if k.get("debug") else ""
    return f"kernel {k.get('release') or '(no guest booted)'} ({source}{extra}, {k.get('accel') or '?'})"
