"""results.json of bench/profile/guest_run.py -> a text table: per device and preemption mode, the
median over the rounds (and the min-max spread) of IOPS, ubd / null_blk, the server's user and system
time per IO, the whole guest's busy time per IO; then perf stat's event counts per IO."""
import statistics
from collections import defaultdict


def _spread(xs, fmt):
    med = statistics.median(xs)
    return f"{fmt.format(med)} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def table(doc) -> str:
    runs = [r for r in doc["runs"] if not r.get("error")]
    groups = defaultdict(list)
    for r in runs:
        groups[(r["preempt"], r["device"])].append(r)
    # ratio per round against the null_blk run of the same round and mode (same host load)
    base = {(r["preempt"], r["round"]): r["iops"] for r in runs if r["device"] == "null_blk"}
    # the server's CPU per IO over the whole guest's busy time per IO of null_blk in the same round:
    # a host that slows the guest down inflates both alike
    nb_busy = {(r["preempt"], r["round"]): sum(r["sys_busy_us"].values())
               for r in runs if r["device"] == "null_blk"}
    info = doc["info"]
    lines = [f"kernel {info['uname']}  boot preempt: {info['boot_preempt']}  "
             f"rounds: {info['plan']['repeats']}  runtime {info['plan']['runtime']} s",
             "median [min-max] over the rounds; us = microseconds of CPU per IO",
             f"{'preempt':8} {'device':12} {'IOPS':>22} {'/null_blk':>20} {'srv user us':>18} "
             f"{'srv sys us':>18} {'guest busy us':>18} {'srv/nullblk':>18}"]
    for (mode, dev), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] != "null_blk", kv[0][1])):
        ratios = [r["iops"] / base[(mode, r["round"])] for r in rs if (mode, r["round"]) in base]
        busy = [sum(r["sys_busy_us"].values()) for r in rs]
        srv = dev != "null_blk"
        rel = [(r["srv_user_us"] + r["srv_sys_us"]) / nb_busy[(mode, r["round"])]
               for r in rs if nb_busy.get((mode, r["round"]))]
        lines.append(
            f"{str(mode):8} {dev:12} {_spread([r['iops'] for r in rs], '{:.0f}'):>22} "
            f"{_spread(ratios, '{:.2f}') if srv else '':>20} "
            f"{_spread([r['srv_user_us'] for r in rs], '{:.1f}') if srv else '':>18} "
            f"{_spread([r['srv_sys_us'] for r in rs], '{:.1f}') if srv else '':>18} "
            f"{_spread(busy, '{:.1f}'):>18} "
            f"{_spread(rel, '{:.2f}') if srv and rel else '':>18}")
    lines += ["", "perf stat, system-wide, per IO (one window each; task-clock in us of CPU):"]
    for key, p in sorted(doc.get("perf", {}).items()):
        ios = p.get("stat", {}).get("ios")
        counts = p.get("stat_counts") or {}
        if ios and counts:
            iops = p["stat"]["iops"]
            lines.append(f"  {key:22} IOPS {iops:.0f}  " + "  ".join(
                f"{e.split(':')[-1]}={v * (1000 if e == 'task-clock' else 1) / ios:.2f}"
                for e, v in counts.items()))
    return "\n".join(lines) + "\n"


def parse_stat_csv(text: str, wanted) -> dict:
    """perf stat -x ';' output -> {event: count} (per-IO division is the table's)."""
    out = {}
    for line in text.splitlines():
        f = line.split(";")
        if len(f) < 3 or line.startswith("#"):
            continue
        try:
            val = float(f[0])
        except ValueError:
            continue
        ev = f[2]
        if ev in wanted or any(ev.endswith(w.split(":")[-1]) for w in wanted):
            out[ev] = val
    return out
