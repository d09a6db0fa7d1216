"""The pytest plugin with a real guest: a failing scenario item reports which step, what was
expected, what was seen and where the evidence is, in pytest's own output and JUnit XML."""
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vm.paths import REPO

pytestmark = pytest.mark.guest


def test_failing_item_explains_itself(tmp_path):
    # The plugin collects the *.toml next to its conftest.py: give it a folder of its own.
    shutil.copy(REPO / "scenarios/conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO / "tests/data/scenarios/wrong_expectation.toml", tmp_path)
    results = tmp_path / "results" / "scenarios"   # the plugin's folder under --results
    # no:logging: paramiko's own log of an SSH retry under a loaded host is not the item's report
    p = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-p", "no:cacheprovider",
                        "-p", "no:logging",
                        "--rootdir", str(tmp_path), "-c", os.devnull,
                        f"--junitxml={tmp_path / 'x.xml'}", f"--results={results.parent}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    out = p.stdout
    assert p.returncode == 1, out[-3000:] + p.stderr[-2000:]
    assert "wrong_expectation: expectation failed: ubd did not reach QUIESCED within 10 s" in out
    assert "at:       step 3/4 (wait ubd QUIESCED within 10s)" in out
    assert "expected: state QUIESCED within 10 s" in out
    assert f"evidence: {results}/wrong_expectation/server.log" in out
    assert "Traceback" not in out   # repr_failure, not a Python stack
    failure = ET.parse(tmp_path / "x.xml").getroot().find(".//testcase/failure")
    assert "ubd did not reach QUIESCED" in failure.get("message")
    assert (results / "result.json").is_file() and (results / "wrong_expectation/dmesg.txt").is_file()
