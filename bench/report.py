"""From raw measurements to per-case medians, ubd/kernel ratios, the text table and `--compare`.

A measurement (one fio run on one side) is a dict:
    {"case": <case id>, "side": "ubd"|"kernel", "repeat": i, "device": "/dev/...",
     "metrics": {iops, bw_bytes, lat_mean_ns, p99_ns, ...} | None, "error": str | None,
     "srv_cpu_s": float | None, "elapsed_s": float | None}
"""
import statistics

from .cases import BenchCase

SIDES = ("ubd", "kernel")
METRICS = ("iops", "bw_bytes", "lat_mean_ns", "p99_ns")
KERNEL_NAME = {"null": "null_blk", "loop": "loop"}


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def summarize_side(measurements: list) -> dict:
    ok = [m for m in measurements if m.get("metrics") and not m.get("error")]
    out = {"runs": len(measurements), "ok_runs": len(ok),
           "errors": [m["error"] for m in measurements if m.get("error")]}
    for k in METRICS:
        out[k] = _median([m["metrics"][k] for m in ok])
        out[k + "_all"] = [m["metrics"][k] for m in ok]
    out["srv_cpu_s"] = _median([m.get("srv_cpu_s") for m in ok])
    utils = [m["srv_cpu_s"] / m["elapsed_s"] for m in ok
             if m.get("srv_cpu_s") is not None and m.get("elapsed_s")]
    out["srv_cpu_util"] = _median(utils)  # CPUs busy on average (1.0 = one CPU fully)
    return out


def _paired(ubd, kernel) -> dict:
    """IOPS ratio per repeat (the two sides of a repeat run back to back, so slow drift of the host
    cancels out): its spread shows how much the median ratio can be trusted."""
    ok = lambda ms: {m["repeat"]: m["metrics"]["iops"] for m in ms  # noqa: E731
                     if m.get("metrics") and not m.get("error")}
    u, k = ok(ubd), ok(kernel)
    rs = [u[r] / k[r] for r in sorted(set(u) & set(k)) if k[r]]
    return {"iops": rs, "min": min(rs) if rs else None, "max": max(rs) if rs else None,
            "median": statistics.median(rs) if rs else None}


def summarize(cases, measurements) -> list:
    """One entry per case, in matrix order: both sides' medians and the ubd/kernel ratios."""
    by = {}
    for m in measurements:
        by.setdefault((m["case"], m["side"]), []).append(m)
    out = []
    for c in cases:
        entry = {"case": c.to_dict(), "kernel_driver": KERNEL_NAME[c.target]}
        for side in SIDES:
            entry[side] = summarize_side(by.get((c.id, side), []))
        u, k = entry["ubd"], entry["kernel"]
        entry["ratio"] = {m: _ratio(u[m], k[m]) for m in METRICS}
        entry["ratio_paired"] = _paired(by.get((c.id, "ubd"), []), by.get((c.id, "kernel"), []))
        entry["ok"] = all(entry["ratio"][m] is not None for m in ("iops", "bw_bytes")) \
            and u["ok_runs"] > 0 and k["ok_runs"] > 0
        out.append(entry)
    return out


# --- formatting -----------------------------------------------------------------------------------
def _num(v, unit=""):
    if v is None:
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}{unit}"
    return f"{v:.3g}{unit}"


def _us(ns):
    return "-" if ns is None else (f"{ns / 1e3:.0f}" if ns >= 1e5 else f"{ns / 1e3:.1f}")


def _mb(b):
    return "-" if b is None else f"{b / 1e6:.1f}"


def _r(v):
    return "-" if v is None else f"{v:.2f}"


def _range(p):
    if not p or p.get("min") is None or len(p["iops"]) < 2:
        return ""
    return f"({p['min']:.2f}-{p['max']:.2f})"


def _cpu(side):
    s, u = side.get("srv_cpu_s"), side.get("srv_cpu_util")
    if s is None:
        return "-"
    return f"{s:.2f}s/{u * 100:.0f}%" if u is not None else f"{s:.2f}s"


def table(summary: list) -> str:
    """The text table: per case both sides' IOPS, MB/s, mean and p99 latency (us), the server's CPU
    time during the ubd run (seconds / share of one CPU), and the IOPS ratio ubd / kernel."""
    head = ["case", "kernel", "ubd IOPS", "kern IOPS", "ratio", "(range)", "ubd MB/s", "kern MB/s",
            "ubd lat", "kern lat", "ubd p99", "kern p99", "srv CPU"]
    rows = []
    for e in summary:
        c, u, k = BenchCase.from_dict(e["case"]), e["ubd"], e["kernel"]
        rows.append([c.label, e["kernel_driver"], _num(u["iops"]), _num(k["iops"]),
                     _r(e["ratio"]["iops"]), _range(e.get("ratio_paired")),
                     _mb(u["bw_bytes"]), _mb(k["bw_bytes"]),
                     _us(u["lat_mean_ns"]), _us(k["lat_mean_ns"]), _us(u["p99_ns"]),
                     _us(k["p99_ns"]), _cpu(u)])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w)
                               for i, (x, w) in enumerate(zip(r, widths))))
    lines.append("latencies in microseconds (mean: submission to completion; p99: completion); "
                 "ratio = ubd IOPS / kernel IOPS (medians), range = lowest and highest ratio of one repeat's back-to-back "
                 "pair; srv CPU = ubdsrv processes' CPU time during the ubd run"
                 " / share of one CPU")
    failed = [e for e in summary if not e["ok"]]
    for e in failed:
        errs = e["ubd"]["errors"] + e["kernel"]["errors"]
        lines.append(f"FAILED {e['case']['id']}: {errs[0] if errs else 'no result'}")
    return "\n".join(lines)


# --- compare --------------------------------------------------------------------------------------
def _pct(new, old):
    if new is None or old is None or old == 0:
        return None
    return (new / old - 1.0) * 100.0


def compare(old: dict, new: dict) -> dict:
    """Per case (matched by id): old and new ubd IOPS, kernel IOPS and ratio, with the change."""
    old_by = {e["case"]["id"]: e for e in old.get("cases", [])}
    new_by = {e["case"]["id"]: e for e in new.get("cases", [])}
    rows = []
    for cid, n in new_by.items():
        o = old_by.get(cid)
        if o is None:
            continue
        row = {"case": cid}
        for side in SIDES:
            ov, nv = o[side]["iops"], n[side]["iops"]
            row[side] = {"old_iops": ov, "new_iops": nv, "change_pct": _pct(nv, ov)}
        orat, nrat = o["ratio"]["iops"], n["ratio"]["iops"]
        row["ratio"] = {"old": orat, "new": nrat, "change_pct": _pct(nrat, orat)}
        row["ubd_p99"] = {"old": o["ubd"]["p99_ns"], "new": n["ubd"]["p99_ns"],
                          "change_pct": _pct(n["ubd"]["p99_ns"], o["ubd"]["p99_ns"])}
        rows.append(row)
    return {"old": old.get("run", {}).get("name"), "new": new.get("run", {}).get("name"),
            "rows": rows,
            "only_old": sorted(set(old_by) - set(new_by)), "only_new": sorted(set(new_by) - set(old_by))}


def compare_table(cmp: dict) -> str:
    def pc(v):
        return "-" if v is None else f"{v:+.1f}%"
    head = ["case", "ubd IOPS old", "new", "change", "kern IOPS old", "new", "change",
            "ratio old", "new", "ubd p99 change"]
    rows = [[r["case"], _num(r["ubd"]["old_iops"]), _num(r["ubd"]["new_iops"]), pc(r["ubd"]["change_pct"]),
             _num(r["kernel"]["old_iops"]), _num(r["kernel"]["new_iops"]), pc(r["kernel"]["change_pct"]),
             _r(r["ratio"]["old"]), _r(r["ratio"]["new"]), pc(r["ubd_p99"]["change_pct"])]
            for r in cmp["rows"]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)  # noqa: E731
                              for i, (x, w) in enumerate(zip(r, widths)))
    lines = [f"compare: {cmp['old']} -> {cmp['new']}", fmt(head), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    if cmp["only_old"]:
        lines.append("only in the old run: " + ", ".join(cmp["only_old"]))
    if cmp["only_new"]:
        lines.append("only in the new run: " + ", ".join(cmp["only_new"]))
    if not rows:
        lines.append("no case in common")
    return "\n".join(lines)
