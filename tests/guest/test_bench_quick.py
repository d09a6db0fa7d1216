"""`python -m bench --quick` end to end (boots its own guest): the run folder holds a well-formed
bench.json (every quick case, positive numbers, ratios = ubd / kernel), the table and a valid SVG chart.
No timing assertions: the numbers depend on the host."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from bench import cases
from vm.paths import REPO

pytestmark = pytest.mark.guest


def test_quick_bench_produces_well_formed_results(run_dir):
    out = run_dir / "bench-quick"
    # two repeats of shorter runs: every case and side still measured more than once (the median)
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--repeats", "2", "--runtime", "1.5",
                        "--results", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"bench failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    doc = json.loads((out / "bench.json").read_text())
    env = doc["environment"]
    assert env["kernel"] and env["accel"] in ("kvm", "tcg") and env["cpus"] >= 1
    assert env["git_commit"] and env["fio"].startswith("fio-")
    assert doc["run"]["preset"] == "quick" and doc["run"]["repeats"] == 2
    assert not (doc.get("health") or {}).get("dmesg_splats"), doc["health"]

    want = [c.id for c in cases.preset("quick").cases]
    got = {e["case"]["id"]: e for e in doc["cases"]}
    assert sorted(got) == sorted(want)
    for cid in want:
        e = got[cid]
        assert e["ok"], e
        for side in ("ubd", "kernel"):
            s = e[side]
            assert s["ok_runs"] == doc["run"]["repeats"] and not s["errors"], (cid, side, s["errors"])
            for k in ("iops", "bw_bytes", "lat_mean_ns", "p99_ns"):
                assert s[k] > 0, (cid, side, k, s[k])
        assert e["ubd"]["srv_cpu_s"] > 0, (cid, "the ubd server used no CPU?")
        for k in ("iops", "bw_bytes", "lat_mean_ns", "p99_ns"):
            assert e["ratio"][k] == pytest.approx(e["ubd"][k] / e["kernel"][k]), (cid, k)
    # every fio run is kept: one per case, side and repeat
    assert len(doc["measurements"]) == len(want) * 2 * doc["run"]["repeats"]

    table = (out / "table.txt").read_text()
    assert all(cases.BenchCase.from_dict(got[c]["case"]).label in table for c in want)
    assert "FAILED" not in table and table.strip().splitlines()[0] in p.stdout

    root = ET.fromstring((out / "ratios.svg").read_text())
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect")
            if r.find("{http://www.w3.org/2000/svg}title") is not None]
    assert len(bars) == len(want)
