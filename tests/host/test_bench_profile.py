"""bench.profile pieces that need no VM: the plan, the profile image's cache key, perf's text
parsed into per-IO numbers."""
import json

import pytest

from bench.profile import __main__ as cli, breakdown, summary
from vm import flavours, image


def test_profile_image_is_a_cache_entry_of_its_own_with_perf_from_the_kernels_suite():
    bp = flavours.get("backports")
    assert image.recipe_hash(bp, profile=True) != image.recipe_hash(bp)
    assert image._entry_dir(bp, True).name.startswith("backports-profile-")
    assert image._entry_dir(bp).name.startswith("backports-")
    assert "-profile-" not in image._entry_dir(bp).name
    suite = bp.kernel_package.partition("/")[2]
    assert f"linux-perf/{suite}" in image._packages(bp, True)
    assert not any(p.startswith("linux-perf") for p in image._packages(bp, False))
    assert "linux-perf" in image._packages(flavours.get("cloud"), True)   # no suite: the release's


def test_plan_has_one_device_per_variant_with_its_ring_flags():
    a = cli._parser().parse_args(["--variants", "default,coop", "--preempt", "lazy,full",
                                  "--repeats", "2"])
    plan = cli.plan(a)
    assert [v["name"] for v in plan["variants"]] == ["default", "coop"]
    assert plan["variants"][0]["env"] == {}
    assert int(plan["variants"][1]["env"]["UBDSRV_RING_FLAGS"], 0) == cli.VARIANTS["coop"]
    assert "{id}" in plan["ublk_add"] and "{dev}" in " ".join(plan["fio"])
    assert plan["preempt"] == ["lazy", "full"] and plan["repeats"] == 2


def test_unknown_variant_is_refused_with_the_known_names(capsys):
    with pytest.raises(SystemExit) as e:
        cli._parser().parse_args(["--variants", "turbo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "turbo" in err and "coop" in err and "kublk" in err


STAT_CSV = """# started on Thu Nov 26 08:57:25 2026

4205.92;msec;task-clock;4205923884;100.00;;
120;;context-switches;4205833631;100.00;;
<not counted>;;cpu-migrations;0;0.00;;
170;;raw_syscalls:sys_enter;4205812106;100.00;;
"""


def test_perf_stat_csv_parsed_per_event():
    got = summary.parse_stat_csv(STAT_CSV, ["task-clock", "context-switches", "cpu-migrations",
                                            "raw_syscalls:sys_enter"])
    assert got == {"task-clock": 4205.92, "context-switches": 120.0, "raw_syscalls:sys_enter": 170.0}


def _run(round_, device, iops, user=0.0, sys_=0.0, busy=100.0):
    return {"run": f"{device}.lazy.r{round_}", "device": device, "preempt": "lazy", "round": round_,
            "iops": iops, "srv_user_us": user, "srv_sys_us": sys_,
            "sys_busy_us": {"user": busy / 2, "system": busy / 2}}


def test_table_ratios_are_per_round_against_null_blk():
    doc = {"info": {"uname": "7.3.4", "boot_preempt": "lazy", "plan": {"repeats": 2, "runtime": 2}},
           "runs": [_run(0, "null_blk", 1000), _run(0, "default", 500, 10, 30),
                    _run(1, "null_blk", 2000), _run(1, "default", 600, 10, 50)], "perf": {}}
    text = summary.table(doc)
    line = next(l for l in text.splitlines() if " default " in l)
    assert "0.40 [0.30-0.50]" in line       # 500/1000 and 600/2000: median 0.40
    assert "40.0 [30.0-50.0]" in line       # system us per IO


CHILDREN = """# Samples: 1K of event 'cpu-clock'
# Event count (approx.): 1000000000
#
    60.00%     0.50%  [k] __do_sys_io_uring_enter
    30.00%     1.00%  [k] ublk_copy_user_pages.isra.0
    10.00%     2.00%  [k] __schedule
"""
FLAT = """# Event count (approx.): 1000000000
    50.00%  ubdq0.0  [kernel.kallsyms]   [k] rep_movs_alternative
    20.00%  ubdq0.0  python3.13          [.] _PyEval_EvalFrameDefault
     5.00%  ubdq0.1  libc.so.6           [.] syscall
"""


def test_breakdown_turns_perf_shares_into_us_per_io(tmp_path):
    (tmp_path / "perf").mkdir()
    (tmp_path / "perf" / "default.lazy.record.children.txt").write_text(CHILDREN)
    (tmp_path / "perf" / "default.lazy.record.flat.txt").write_text(FLAT)
    (tmp_path / "results.json").write_text(json.dumps({
        "info": {"uname": "7.3.4"}, "perf": {"default.lazy": {"record": {"ios": 10000}}}}))
    row = breakdown.breakdown(tmp_path)["rows"]["default.lazy"]
    assert row["total"] == pytest.approx(100.0)           # 1 s of CPU over 10000 IOs
    assert row["user"] == pytest.approx(25.0)             # python + libc
    assert row["      copy to request"] == pytest.approx(30.0)
    assert row["context switch"] == pytest.approx(10.0)
    assert "copy to request" in breakdown.table([tmp_path])
