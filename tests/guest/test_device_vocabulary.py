"""The device vocabulary against the real server: the `ublk add` lines vm/device.py builds for the
fault target (on a null and on a loop base) bring devices up with exactly the settings the scenario
wrote, and the faults happen: IO into the error range fails with the errno asked for, IO beside it
and verified writes through the delayed loop base pass."""
import json
import os
import subprocess
import sys

import pytest

from vm.paths import REPO

pytestmark = pytest.mark.guest
SCENARIO = REPO / "tests/data/scenarios/fault_target.toml"


def test_fault_target_devices_from_a_scenario(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vm.scenario", "run", str(SCENARIO), "--results", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=1200, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [case] = json.loads((out / "result.json").read_text())["cases"]
    notes = {s["do"] + ":" + str(s["step"]): s["note"] for s in case["steps"]}
    assert "error 28" in notes["fio:3"] and "No space left on device" in notes["fio:3"]   # ENOSPC
    assert notes["fio:5"].startswith("fio exit 0")   # crc32c verified through the delayed loop base
    # the server got the settings the scenario wrote, through the one `ublk add` line
    log = (out / "fault_target" / "server.log").read_text()
    targets = [json.loads(line.split("target ", 1)[1]) for line in log.splitlines()
               if "daemon: add dev" in line]
    bad, slow = sorted(targets, key=lambda t: t["base"]["name"] != "null")
    assert (bad["error_sectors"], bad["errno"], bad["dev_size"]) == ([[0, 2047]], 28, 64 << 20)
    assert (slow["base"]["name"], slow["delay_us"]) == ("loop", 2000)
    assert slow["base"]["backing_file"] == "/var/tmp/ubd-scenario/slow.img"
