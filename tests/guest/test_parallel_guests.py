"""-j 2 on real guests: Ctrl-C while two guests run stops both; no QEMU of the run survives.

Other engineers run guests on this machine: QEMUs are found by this run's folder in their command
line, never by name."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vm.paths import REPO

pytestmark = pytest.mark.guest


def _qemus_of(run_dir) -> list:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{run_dir}/"], capture_output=True, text=True)
    return out.stdout.split()


def test_ctrl_c_during_j2_stops_both_guests(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vm.scenario", "run", "kill_daemon[target=null]",
                             "stall_then_delete[resume=cont]", "-j", "2", "--results", str(run_dir)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, UBD_JOBS="1"))   # the command line beats the env
    try:
        deadline = time.monotonic() + 300
        while len(_qemus_of(run_dir)) < 2:   # both workers' guests started
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "two guests never ran at once"
            time.sleep(0.5)
        folders = sorted(p.name for p in (run_dir / "guests").iterdir())
        assert folders == ["w1-guest-1", "w2-guest-1"]
        time.sleep(3)   # into booting / the first steps
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted" in out
    time.sleep(1)
    assert _qemus_of(run_dir) == [], f"QEMU left running:\n{out[-3000:]}"
    doc = json.loads((run_dir / "result.json").read_text())
    assert doc["interrupted"] is True and doc["jobs"] == 2
