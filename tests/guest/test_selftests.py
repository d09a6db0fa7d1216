"""`just selftests` for real: kublk built from Debian's linux-source, the kernel's own ublk selftests run
in the guest under the kernel's runner, verdicts, evidence and health in the scenarios' report.

Long (a first run fetches and unpacks a linux-source package, bootstraps the build chroot; the whole
suite takes about an hour per kernel under TCG): nightly only."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from vm import flavours, image
from vm.paths import REPO

pytestmark = [pytest.mark.guest, pytest.mark.nightly]

SUITE_HOURS = 3


def _selftests(*args, results, timeout):
    env = {k: v for k, v in os.environ.items() if k != "UBD_KERNEL_TREE"}
    r = subprocess.run([sys.executable, "-m", "vm.selftests", "--results", str(results), *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    doc = json.loads((results / "result.json").read_text()) if (results / "result.json").is_file() else {}
    return r, doc


def test_chosen_selftests_run_in_the_guest_with_evidence_and_health(tmp_path):
    """null_01 (plain IO on a null device) passes on every kernel with ublk; the others may skip
    themselves on an older kernel, but never fail."""
    res = tmp_path / "run"
    r, doc = _selftests("-k", "null_01", "-k", "loop_01", "-k", "generic_03", results=res, timeout=3600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    cases = {c["id"]: c for c in doc["cases"]}
    assert set(cases) == {"ublk:test_null_01.sh", "ublk:test_loop_01.sh", "ublk:test_generic_03.sh"}
    assert cases["ublk:test_null_01.sh"]["kind"] == "passed"
    for c in cases.values():
        assert c["kind"] in ("passed", "skipped"), c
        log = (res / c["dir"] / "test.log").read_text()
        assert f"ok 1 selftests: ublk: {c['id'].split(':')[1]}" in log   # the kernel runner's verdict
        if c["kind"] == "skipped":
            assert "# SKIP" in log and c["message"].startswith("skipped by the test itself")
        assert (res / c["dir"] / "console.log").is_file()
    # the test ran in this guest's kernel, and its dmesg is its own (taken by the health check)
    dmesg = (res / "test_null_01" / "dmesg.txt").read_text()
    assert "ublk selftest: null_01 starting" in dmesg and "null_01 done" in dmesg
    assert "loop_01" not in dmesg
    release = image.ensure(flavours.DEFAULT).kernel_release
    assert doc["kernel"]["release"] == release and doc["flavour"] == flavours.DEFAULT
    assert doc["selftests"]["source"].startswith("linux-source-")
    assert f"kernel {release}; selftests of {doc['selftests']['source']}" in r.stdout
    for name in ("test_null_01", "test_loop_01", "test_generic_03"):
        assert f"ublk:{name}.sh: " in r.stderr                # progress: name, verdict, seconds
    suite = ET.parse(res / "junit.xml").getroot()
    assert suite.get("tests") == "3" and suite.get("failures") == "0"
    assert int(suite.get("skipped")) == sum(c["kind"] == "skipped" for c in cases.values())


@pytest.mark.parametrize("flavour", sorted(flavours.load_all()))
def test_the_whole_suite(flavour, tmp_path):
    """Every ublk selftest on the flavour's kernel: none may fail (a skip is the test's own call)."""
    res = tmp_path / "run"
    r, doc = _selftests("--flavour", flavour, results=res, timeout=SUITE_HOURS * 3600)
    assert doc, (r.stdout + r.stderr)[-4000:]
    failed = [f"{c['id']}: {c['kind']}: {c['message']}" for c in doc["cases"]
              if c["kind"] not in ("passed", "skipped")]
    assert not failed and r.returncode == 0, "\n".join(failed) + "\n" + r.stdout[-3000:]
    assert len(doc["cases"]) == len(doc["selftests"]["selected"]) > 40
