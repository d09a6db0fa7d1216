"""fio's JSON output (`--output-format=json --group_reporting`) -> the few numbers the bench reports.

`jobs[0]` is the whole group. Per direction: `iops`, `bw_bytes`, `lat_ns.mean` (submission to
completion) and `clat_ns.percentile["99.000000"]`. A mixed workload (randrw) adds the directions up:
IOPS and bandwidth are summed, the mean latency is weighted by each direction's IO count, and p99 is
the larger of the two directions' p99 (percentiles of two distributions do not combine exactly; the
slower direction's p99 is the conservative bound)."""
import json

P99 = "99.000000"


class FioError(ValueError):
    """fio output that carries no usable result (fio failed, or the file is not fio's JSON)."""


def load(text: str) -> dict:
    """fio may print warnings before the JSON document (when it writes to stdout); skip them."""
    start = text.find("{")
    if start < 0:
        raise FioError("no JSON document in fio's output")
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError as e:
        raise FioError(f"fio's output is not valid JSON: {e}") from None


def _direction(d: dict) -> dict:
    lat = d.get("lat_ns") or {}
    clat = d.get("clat_ns") or {}
    pct = clat.get("percentile") or {}
    return {"iops": float(d.get("iops", 0.0)), "bw_bytes": float(d.get("bw_bytes", 0.0)),
            "lat_mean_ns": float(lat.get("mean", 0.0)), "p99_ns": float(pct.get(P99, 0.0)),
            "ios": int(d.get("total_ios", 0))}


def metrics(doc: dict) -> dict:
    """The bench's numbers from one fio JSON document: iops, bw_bytes, lat_mean_ns, p99_ns, plus the
    directions that saw IO, fio's own CPU use (percent of one CPU, summed over jobs) and its error."""
    jobs = doc.get("jobs") or []
    if not jobs:
        raise FioError("fio's JSON has no jobs")
    job = jobs[0]
    if job.get("error"):
        raise FioError(f"fio job failed with error {job['error']}")
    dirs = {k: _direction(job[k]) for k in ("read", "write") if k in job}
    used = {k: v for k, v in dirs.items() if v["iops"] > 0 or v["ios"] > 0}
    if not used:
        raise FioError("fio did no IO")
    total_ios = sum(v["ios"] for v in used.values())
    if total_ios > 0:
        lat_mean = sum(v["lat_mean_ns"] * v["ios"] for v in used.values()) / total_ios
    else:  # no counts: weight by rate instead
        iops = sum(v["iops"] for v in used.values())
        lat_mean = sum(v["lat_mean_ns"] * v["iops"] for v in used.values()) / iops if iops else 0.0
    return {
        "iops": sum(v["iops"] for v in used.values()),
        "bw_bytes": sum(v["bw_bytes"] for v in used.values()),
        "lat_mean_ns": lat_mean,
        "p99_ns": max(v["p99_ns"] for v in used.values()),
        "directions": sorted(used),
        "fio_usr_cpu": float(job.get("usr_cpu", 0.0)),
        "fio_sys_cpu": float(job.get("sys_cpu", 0.0)),
    }


def version(doc: dict) -> str:
    return doc.get("fio version", "")
