"""The bench's host-side code with canned fio JSON: parsing, CPU deltas, medians and ratios, the table,
--compare, the SVG chart, the case matrix and the guest script's files (no VM)."""
import json
from dataclasses import replace
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

from bench import __main__ as cli, cases, cpu, fio, report, runner, svg
from bench.cases import BenchCase
from vm import device
from vm.guest import GUEST_UBD_DIR
from vm.paths import REPO


def _dir(iops, bw, lat_mean, p99, ios=None):
    return {"iops": iops, "bw_bytes": bw, "total_ios": ios if ios is not None else int(iops * 3),
            "lat_ns": {"mean": lat_mean}, "clat_ns": {"mean": lat_mean * 0.9,
                                                      "percentile": {"50.000000": lat_mean,
                                                                     "99.000000": p99}}}


def fio_doc(read=None, write=None, error=0, usr=10.0, sys_=20.0):
    job = {"jobname": "bench", "error": error, "usr_cpu": usr, "sys_cpu": sys_,
           "read": read or _dir(0, 0, 0, 0, 0), "write": write or _dir(0, 0, 0, 0, 0),
           "trim": _dir(0, 0, 0, 0, 0)}
    return {"fio version": "fio-3.39", "jobs": [job]}


# --- fio --------------------------------------------------------------------------------------------
def test_read_only_job():
    m = fio.metrics(fio_doc(read=_dir(20000.5, 81920000, 3.2e6, 9.9e6)))
    assert m["iops"] == 20000.5 and m["bw_bytes"] == 81920000
    assert m["lat_mean_ns"] == 3.2e6 and m["p99_ns"] == 9.9e6
    assert m["directions"] == ["read"]
    assert (m["fio_usr_cpu"], m["fio_sys_cpu"]) == (10.0, 20.0)


def test_randrw_adds_directions_and_weights_latency_by_io_count():
    m = fio.metrics(fio_doc(read=_dir(3000, 12e6, 1000, 5000, ios=300),
                            write=_dir(1000, 4e6, 3000, 8000, ios=100)))
    assert m["iops"] == 4000 and m["bw_bytes"] == 16e6
    assert m["lat_mean_ns"] == pytest.approx((1000 * 300 + 3000 * 100) / 400)
    assert m["p99_ns"] == 8000
    assert m["directions"] == ["read", "write"]


def test_failed_or_empty_job_is_an_error():
    with pytest.raises(fio.FioError, match="error 5"):
        fio.metrics(fio_doc(read=_dir(1, 1, 1, 1), error=5))
    with pytest.raises(fio.FioError, match="no IO"):
        fio.metrics(fio_doc())
    with pytest.raises(fio.FioError, match="no jobs"):
        fio.metrics({"jobs": []})


def test_load_skips_warnings_before_the_document():
    doc = fio.load("fio: some warning\n" + json.dumps(fio_doc(read=_dir(1, 2, 3, 4))))
    assert fio.version(doc) == "fio-3.39"
    with pytest.raises(fio.FioError):
        fio.load("fio: file not found\n")
    with pytest.raises(fio.FioError):
        fio.load("{not json")


# --- cpu --------------------------------------------------------------------------------------------
def _stat(pid, comm, utime, stime, start=1000):
    rest = ["S", "1", str(pid), str(pid), "0", "-1", "4194624", "0", "0", "0", "0", str(utime), str(stime),
            "0", "0", "20", "0", "1", "0", str(start), "1000", "100"]
    return f"{pid} ({comm}) " + " ".join(rest)


def test_parse_stat_handles_odd_comm():
    assert cpu.parse_stat(_stat(42, "a b) c", 7, 3)) == (42, "a b) c", 1000, 10)
    assert cpu.parse_stat("garbage") is None
    assert cpu.parse_stat("") is None


def test_delta_sums_processes_and_ignores_vanished_ones():
    before = "\n".join([_stat(10, "ubdsrv0", 5, 5), _stat(11, "ubdq0.0", 100, 50), _stat(12, "ubdq0.1", 0, 0)])
    after = "\n".join([_stat(10, "ubdsrv0", 5, 6), _stat(11, "ubdq0.0", 200, 150),
                       _stat(13, "ubdq0.2", 30, 20)])
    d = cpu.delta(before, after, clk_tck=100)
    # 0.01 + 2.0 + (12 vanished: 0) + (13 new: 0.5 counted from zero)
    assert d["cpu_s"] == pytest.approx(2.51)
    assert d["per_process"]["ubdq0.0[11]"] == pytest.approx(2.0)
    assert d["per_process"]["ubdq0.1[12]"] == 0


def test_delta_does_not_confuse_a_reused_pid():
    before = _stat(10, "ubdq0.0", 500, 0, start=1)
    after = _stat(10, "ubdq0.0", 20, 0, start=2)   # same pid, another process
    assert cpu.delta(before, after)["cpu_s"] == pytest.approx(0.2)


# --- summary, ratios, table -------------------------------------------------------------------------
CASE_A = BenchCase("null", "randread-4k", "io_uring", 2, 64)
CASE_B = BenchCase("loop", "randrw-4k", "libaio", 1, 32)


def _m(case, side, rep, iops, lat=1e6, p99=2e6, cpu_s=1.0, error=None):
    metrics = None if error else {"iops": iops, "bw_bytes": iops * 4096, "lat_mean_ns": lat, "p99_ns": p99}
    return {"case": case.id, "side": side, "repeat": rep, "device": "/dev/x", "metrics": metrics,
            "error": error, "srv_cpu_s": cpu_s, "elapsed_s": 4.0}


def _measurements():
    ms = []
    for rep, (u, k) in enumerate([(100, 400), (300, 200), (200, 300)]):
        ms.append(_m(CASE_A, "ubd", rep, u, cpu_s=2.0 + rep))
        ms.append(_m(CASE_A, "kernel", rep, k, cpu_s=0.0))
    ms.append(_m(CASE_B, "ubd", 0, 50))
    ms.append(_m(CASE_B, "kernel", 0, 0, error="fio exited 1: no such device"))
    return ms


def test_summary_takes_medians_and_ratios_are_ubd_over_kernel():
    s = report.summarize([CASE_A, CASE_B], _measurements())
    a, b = s
    assert a["case"]["id"] == CASE_A.id and a["kernel_driver"] == "null_blk"
    assert a["ubd"]["iops"] == 200 and a["kernel"]["iops"] == 300
    assert a["ubd"]["iops_all"] == [100, 300, 200]
    assert a["ratio"]["iops"] == pytest.approx(200 / 300)
    assert a["ratio"]["bw_bytes"] == pytest.approx(200 / 300)
    assert a["ratio"]["lat_mean_ns"] == pytest.approx(1.0)
    assert a["ubd"]["srv_cpu_s"] == 3.0 and a["ubd"]["srv_cpu_util"] == pytest.approx(0.75)
    assert a["ok"] is True
    assert b["ok"] is False and b["ratio"]["iops"] is None
    assert b["kernel"]["errors"] == ["fio exited 1: no such device"]


def test_paired_ratios_per_repeat():
    a = report.summarize([CASE_A], _measurements())[0]
    assert a["ratio_paired"]["iops"] == pytest.approx([100 / 400, 300 / 200, 200 / 300])
    assert (a["ratio_paired"]["min"], a["ratio_paired"]["max"]) == (0.25, 1.5)
    assert "(0.25-1.50)" in report.table([a])


def test_table_lists_every_case_and_the_failures():
    t = report.table(report.summarize([CASE_A, CASE_B], _measurements()))
    assert CASE_A.label in t and CASE_B.label in t
    assert "0.67" in t  # the ratio
    assert f"FAILED {CASE_B.id}: fio exited 1" in t


def _doc(name, summary):
    return {"run": {"name": name}, "cases": summary}


def test_compare_matches_cases_by_id():
    old = report.summarize([CASE_A, CASE_B], _measurements())
    newer = [dict(m) for m in _measurements() if m["case"] == CASE_A.id]
    for m in newer:
        if m["side"] == "ubd":
            m["metrics"] = dict(m["metrics"], iops=m["metrics"]["iops"] * 2)
    c3 = BenchCase("null", "read-64k", "io_uring", 2, 32)
    newer += [_m(c3, "ubd", 0, 10), _m(c3, "kernel", 0, 20)]
    new = report.summarize([CASE_A, c3], newer)
    cmp = report.compare(_doc("before", old), _doc("after", new))
    assert [r["case"] for r in cmp["rows"]] == [CASE_A.id]
    row = cmp["rows"][0]
    assert row["ubd"]["old_iops"] == 200 and row["ubd"]["new_iops"] == 400
    assert row["ubd"]["change_pct"] == pytest.approx(100.0)
    assert row["kernel"]["change_pct"] == pytest.approx(0.0)
    assert row["ratio"]["new"] == pytest.approx(400 / 300)
    assert cmp["only_old"] == [CASE_B.id] and cmp["only_new"] == [c3.id]
    text = report.compare_table(cmp)
    assert "before -> after" in text and "+100.0%" in text and CASE_B.id in text


# --- svg --------------------------------------------------------------------------------------------
def test_chart_is_valid_svg_with_a_bar_per_measured_case():
    s = report.summarize([CASE_A, CASE_B], _measurements())
    text = svg.chart(s, "title <&>", "sub")
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    ns = {"s": "http://www.w3.org/2000/svg"}
    bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find("s:title", ns) is not None]
    assert len(bars) == 1 and CASE_A.id in bars[0].find("s:title", ns).text
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "failed" in texts and "title <&>" in texts and "0.67" in texts


def test_chart_scales_to_large_ratios():
    s = report.summarize([CASE_A], [_m(CASE_A, "ubd", 0, 5000), _m(CASE_A, "kernel", 0, 1000)])
    root = ET.fromstring(svg.chart(s, "t"))
    width = float(root.get("width"))
    for r in root.iter("{http://www.w3.org/2000/svg}rect"):
        assert float(r.get("x")) + float(r.get("width")) <= width


# --- cases ------------------------------------------------------------------------------------------
def test_fio_args():
    args = cases.fio_args(CASE_B, "/dev/ublkb1", "/tmp/o.json", 2.0, 0.5)
    for want in ("--filename=/dev/ublkb1", "--direct=1", "--rw=randrw", "--bs=4k", "--ioengine=libaio",
                 "--iodepth=32", "--numjobs=1", "--group_reporting", "--time_based", "--runtime=2",
                 "--ramp_time=500ms", "--output-format=json", "--output=/tmp/o.json", "--rwmixread=50"):
        assert want in args


def test_presets_cover_every_dimension():
    full = cases.preset("full")
    ids = [c.id for c in full.cases]
    assert len(ids) == len(set(ids))
    assert {c.workload for c in full.cases} == set(cases.WORKLOADS)
    assert {1, 32, 128} <= {c.iodepth for c in full.cases}
    assert {c.queues for c in full.cases} == {1, 2}
    assert {c.engine for c in full.cases} == set(cases.ENGINES)
    assert {c.target for c in full.cases} == set(cases.TARGETS)
    for t in cases.TARGETS:  # every case runs on both pairs
        assert {c.id.split("-", 1)[1] for c in full.cases if c.target == t} == \
            {c.id.split("-", 1)[1] for c in full.cases if c.target == "null"}
    quick = cases.preset("quick")
    assert {c.target for c in quick.cases} == {"null", "loop"}
    assert all((c.workload, c.queues, c.iodepth) == ("randread-4k", 2, 64) for c in quick.cases)
    # USER_COPY against the mapped-buffer copy: the same case both ways, on both pairs
    for preset in (quick, full):
        uc = [c for c in preset.cases if c.usercopy]
        assert {c.target for c in uc} == set(cases.TARGETS)
        assert all(replace(c, usercopy=False) in preset.cases for c in uc)
    assert quick.estimate_seconds() < 240 and full.estimate_seconds() < 15 * 60
    assert cases.preset("quick", runtime=1, repeats=5).repeats == 5


# --- runner -----------------------------------------------------------------------------------------
def test_plan_interleaves_sides_and_repeats():
    p = cases.preset("quick", repeats=2)
    devs = {(t, s): f"/dev/{t}-{s}" for t in cases.TARGETS for s in ("ubd", "ubd-usercopy", "kernel")}
    runs, meta = runner.plan_phase(p, p.cases, devs, "/out")
    for c in p.cases:   # a usercopy case measures the --usercopy device against the same kernel one
        got = {meta[r]["side"]: meta[r]["device"] for r in meta if meta[r]["case"] == c.id}
        assert got == {"ubd": f"/dev/{c.target}-{runner.ubd_side(c.usercopy)}",
                       "kernel": f"/dev/{c.target}-kernel"}
    assert len(runs) == p.runs()
    order = [(meta[r]["case"], meta[r]["side"]) for r, _ in runs]
    assert order[0] == (p.cases[0].id, "ubd") and order[1] == (p.cases[0].id, "kernel")
    assert order[2] == (p.cases[1].id, "kernel")
    assert order[len(p.cases) * 2] == (p.cases[0].id, "kernel")   # repeat 2 starts the other way round
    assert all(f"--filename={meta[r]['device']}" in argv for r, argv in runs)


def test_cpu_sampler_lists_the_server_processes_as_the_server_defines_them():
    s = runner.run_script([("a.ubd.r0", ["fio", "--name=x"])], "/tmp/ubd-bench/out")
    assert "run a.ubd.r0 fio --name=x" in s
    [line] = [l for l in s.splitlines() if l.startswith("PIDS=")]
    assert line == f"PIDS=$(PYTHONPATH={GUEST_UBD_DIR} python3 -m ubdsrv.proc)"
    # the same command on the host: a server process is listed, a look-alike and itself are not
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "-m", "ubdsrv"])
    lookalike = subprocess.Popen(["sh", "-c", "sleep 30; echo python3 -m ubdsrv"])
    try:
        time.sleep(0.2)
        out = subprocess.run([sys.executable, "-m", "ubdsrv.proc"], cwd=REPO, capture_output=True,
                             text=True, timeout=30).stdout.split()
        assert str(server.pid) in out and str(lookalike.pid) not in out
    finally:
        for p in (server, lookalike):
            p.kill()
            p.wait()


def test_bench_devices_are_the_vocabularys():
    script = runner.setup_script(2, ["null", "loop"])
    assert device.add_command(runner.ubd_device("null", 2)) in script
    assert "ublk add -t null -n 0 -q 2 -d 128 " in script and f"-s {250 << 30}" in script
    assert f"ublk add -t loop -n 1 -q 2 -d 128 -f {runner.BACKING_FILE}" in script
    assert f"L=$(losetup --direct-io=on -f --show {runner.BACKING_FILE})" in script
    assert "--usercopy" not in script
    uc = runner.setup_script(2, ["null", "loop"], usercopy=True)
    assert "ublk add -t null -n 2 -q 2 -d 128 --usercopy " in uc and "@dev null ubd-usercopy /dev/ublkb2" in uc
    assert f"ublk add -t loop -n 3 -q 2 -d 128 --usercopy -f {runner.BACKING_FILE}" in uc
    assert runner.parse_devices("@dev loop ubd-usercopy /dev/ublkb3")[0] == \
        {("loop", "ubd-usercopy"): "/dev/ublkb3"}
    # one queue depth for both sides, the vocabulary's default, deep enough for every case
    depth = runner.null_blk_params(2)["hw_queue_depth"]
    assert depth == runner.ubd_device("loop", 1).depth == device.UBLK["depth"].default
    assert max(c.iodepth for c in cases.full_cases() + cases.quick_cases()) <= depth
    assert set(cases.TARGETS) <= set(device.TARGETS)


def test_collect_reads_a_phase(tmp_path):
    meta = {"c.ubd.r0": {"case": "c", "side": "ubd", "repeat": 0, "device": "/dev/ublkb0"},
            "c.kernel.r0": {"case": "c", "side": "kernel", "repeat": 0, "device": "/dev/nullb0"},
            "c.ubd.r1": {"case": "c", "side": "ubd", "repeat": 1, "device": "/dev/ublkb0"}}
    (tmp_path / "c.ubd.r0.rc").write_text("0\n")
    (tmp_path / "c.ubd.r0.json").write_text(json.dumps(fio_doc(read=_dir(100, 409600, 10, 20))))
    (tmp_path / "c.ubd.r0.time").write_text("100.5 104.5\n")
    (tmp_path / "c.ubd.r0.cpu0").write_text(_stat(7, "ubdq0.0", 10, 10) + "\n")
    (tmp_path / "c.ubd.r0.cpu1").write_text(_stat(7, "ubdq0.0", 110, 60) + "\n")
    (tmp_path / "c.kernel.r0.rc").write_text("1\n")
    (tmp_path / "c.kernel.r0.log").write_text("fio: /dev/nullb0: No such file\n")
    out = {m["run"]: m for m in runner.collect(tmp_path, meta, 100)}
    ok = out["c.ubd.r0"]
    assert ok["error"] is None and ok["metrics"]["iops"] == 100
    assert ok["elapsed_s"] == pytest.approx(4.0) and ok["srv_cpu_s"] == pytest.approx(1.5)
    assert "fio exited 1" in out["c.kernel.r0"]["error"] and "No such file" in out["c.kernel.r0"]["error"]
    assert "did not run" in out["c.ubd.r1"]["error"]


def test_parse_devices():
    devs, dio = runner.parse_devices("@dev null kernel /dev/nullb0\n@dev loop ubd /dev/ublkb1\n"
                                     "@loopdio 1\nnoise\n")
    assert devs == {("null", "kernel"): "/dev/nullb0", ("loop", "ubd"): "/dev/ublkb1"} and dio == "1"


# --- CLI without a guest ----------------------------------------------------------------------------
def test_report_and_offline_compare(tmp_path, capsys):
    s = report.summarize([CASE_A, CASE_B], _measurements())
    (tmp_path / "a.json").write_text(json.dumps(_doc("a", s)))
    (tmp_path / "b.json").write_text(json.dumps(_doc("b", s)))
    assert cli.main(["--report", str(tmp_path / "b.json"), "--compare", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert CASE_A.label in out and "a -> b" in out and "+0.0%" in out


def test_bad_compare_file_fails_before_booting(tmp_path, capsys):
    (tmp_path / "x.json").write_text("[]")
    assert cli.main(["--quick", "--compare", str(tmp_path / "x.json")]) == 2
    assert "not a bench.json" in capsys.readouterr().err


def test_list(capsys):
    assert cli.main(["--quick", "--list"]) == 0
    assert "null-randread-4k-io_uring-q2-d64" in capsys.readouterr().out


# --- the guest-side profiler hook -------------------------------------------------------------------
def test_guest_profile_hook_dumps_every_process(tmp_path):
    import pstats
    import shutil
    import subprocess
    import sys
    from pathlib import Path
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(cli.__file__).with_name("guest_profile.py"), site / "sitecustomize.py")
    prog = ("import os\n"
            "def work():\n    return sum(i * i for i in range(20000))\n"
            "pid = os.fork()\n"
            "if pid == 0:\n    work(); os._exit(0)\n"
            "os.waitpid(pid, 0); work()\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "UBDSRV_PROFILE": str(tmp_path / "p")}
    subprocess.run([sys.executable, "-c", prog], env=env, check=True, timeout=60)
    dumps = sorted(tmp_path.glob("p.*"))
    assert len(dumps) == 2, dumps   # the parent (atexit) and the forked child (os._exit)
    for d in dumps:
        st = pstats.Stats(str(d))
        assert any(fn[2] == "work" for fn in st.stats), d
