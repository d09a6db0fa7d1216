"""Where the server's CPU goes per IO, from a bench.profile run's perf record of the queue processes:

    python -m bench.profile.breakdown RUN_DIR [RUN_DIR ...]

Per device and preemption mode: the server's CPU per IO in the perf window (perf's event count over
the IOs the device completed meanwhile), split into the kernel paths below (inclusive time, from
`perf report --children`) and user space (python and its libraries, from the flat report); then
each as a multiple of the user-space time per IO, which the issue found the same on both kernels
and which a loaded host inflates like the rest (under TCG a busy host slows every guest instruction
alike), so those multiples compare across runs and kernels."""
import json
import re
import sys
from pathlib import Path

# label -> symbols whose inclusive share counts (the first one found in the report is used)
PATHS = (
    ("io_uring_enter", ("__do_sys_io_uring_enter",)),
    ("  commit+fetch (ublk)", ("ublk_ch_uring_cmd_local", "__ublk_ch_uring_cmd")),
    ("    complete request", ("__ublk_complete_rq",)),
    ("      copy to request", ("ublk_copy_user_pages", "ublk_copy_user_pages.isra.0")),
    ("  wait for CQEs", ("io_cqring_wait",)),
    ("context switch", ("__schedule",)),
    ("timer interrupt", ("asm_sysvec_apic_timer_interrupt",)),
    ("  preempted in kernel", ("preempt_schedule_irq",)),
)
_LINE = re.compile(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[[.k]\]\s+(\S+)")


def _children(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m and m.group(3) not in out:
            out[m.group(3)] = float(m.group(1))
    return out


def _event_ns(path: Path) -> float:
    m = re.search(r"Event count \(approx\.\): (\d+)", path.read_text())
    return float(m.group(1)) if m else 0.0


def _user_share(path: Path) -> float:
    total = 0.0
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 4 and f[0].endswith("%") and f[2] != "[kernel.kallsyms]":
            total += float(f[0][:-1])
    return total


def breakdown(run: Path) -> dict:
    out_dir = run / "out" if (run / "out").is_dir() else run
    doc = json.loads((out_dir / "results.json").read_text())
    rows = {}
    for key, p in sorted(doc.get("perf", {}).items()):
        rec = p.get("record")
        children = out_dir / "perf" / f"{key}.record.children.txt"
        flat = out_dir / "perf" / f"{key}.record.flat.txt"
        if not rec or not rec.get("ios") or not children.is_file():
            continue
        us = _event_ns(children) / 1000 / rec["ios"]     # the server's CPU per IO
        shares = _children(children)
        row = {"total": us, "user": us * _user_share(flat) / 100}
        for label, syms in PATHS:
            pct = next((shares[s] for s in syms if s in shares), 0.0)
            row[label] = us * pct / 100
        rows[key] = row
    return {"kernel": doc["info"]["uname"], "rows": rows}


def table(runs) -> str:
    lines = []
    for run in runs:
        b = breakdown(Path(run))
        keys = list(b["rows"])
        lines.append(f"{b['kernel']} ({run}): server CPU per IO in the perf window, us "
                     "(and / user-space us per IO)")
        lines.append(f"{'':26}" + "".join(f"{k:>22}" for k in keys))
        for label in ("total", "user", *(lbl for lbl, _ in PATHS)):
            cells = []
            for k in keys:
                r = b["rows"][k]
                rel = r[label] / r["user"] if r["user"] else 0.0
                cells.append(f"{r[label]:9.1f} ({rel:5.2f}x)")
            lines.append(f"{label:26}" + "".join(f"{c:>22}" for c in cells))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    print(table(sys.argv[1:]))
