"""The guest options reach a real guest: `UBD_FLAVOUR=backports python -m vm.scenario run ...` boots
the backports kernel (7.x), as the boot console and result.json show. (Each front end's parsing of
the same options is checked without a VM in tests/host/test_guest_options.py.)"""
import json
import os
import re
import subprocess
import sys

import pytest

from vm.paths import REPO

from .ublk_guest import NULL_FIO_SCENARIO

pytestmark = pytest.mark.guest



def test_ubd_flavour_backports_boots_the_7x_kernel_for_a_scenario_run(tmp_path):
    scenario = tmp_path / "flavour_probe.toml"
    scenario.write_text(NULL_FIO_SCENARIO)
    out = tmp_path / "run"
    # only the flavour comes from the environment; a kernel tree would replace its kernel
    env = {k: v for k, v in os.environ.items() if k not in ("UBD_KERNEL_TREE", "UBD_KERNEL_DEBUG")}
    env["UBD_FLAVOUR"] = "backports"
    r = subprocess.run([sys.executable, "-m", "vm.scenario", "run", str(scenario), "--results", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "result.json").read_text())
    assert doc["flavour"] == "backports"
    assert [c["kind"] for c in doc["cases"]] == ["passed"]
    console = (out / "guests" / "guest-1" / "console.log").read_text(errors="replace")
    release = re.search(r"Linux version (\S+)", console)
    assert release and release.group(1).startswith("7."), release and release.group(0)
