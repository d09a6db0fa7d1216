"""No QEMU outlives the command that started it: Ctrl-C and SIGTERM included."""
import os
import signal
import subprocess
import sys
import time

import pytest

from vm.paths import REPO


def _children_qemu(pid):
    r = subprocess.run(["pgrep", "-P", str(pid), "-f", "qemu-system"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_guest_command_stops_qemu(sig, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "vm", "exec", "--results", str(tmp_path), "--",
                             "echo in-guest; sleep 300"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()  # the guest is up and running the command
        if first != "in-guest":
            proc.kill()
            raise AssertionError(f"vm exec did not run the command: {proc.communicate()[1][-3000:]}")
        qemus = _children_qemu(proc.pid)
        assert len(qemus) == 1
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert proc.returncode == 130
        assert "interrupted" in proc.stderr.read()
        for pid in qemus:
            assert not os.path.exists(f"/proc/{pid}"), f"QEMU {pid} outlived its command"
    finally:
        proc.kill()


def test_boot_panic_under_tcg_is_retried_and_kept(monkeypatch, tmp_path):
    from vm import guest as guest_mod, machine
    from vm.guest import Guest, GuestOptions

    original = machine.Machine._cmdline
    calls = []

    def first_boot_panics(self, qemu):
        argv = original(self, qemu)
        calls.append(self.accel)
        if len(calls) == 1:  # no initramfs init and no root driver: "VFS: Unable to mount root fs"
            i = argv.index("-append") + 1
            argv[i] += " rdinit=/nonexistent"
        return argv

    monkeypatch.setattr(machine.Machine, "_cmdline", first_boot_panics)
    # cold: a restore (vm/warm.py) would not boot the kernel at all
    with Guest(GuestOptions(run_dir=tmp_path, push_server=False, accel="tcg", cold=True)) as g:
        assert g.exec("echo up", timeout=30).stdout == "up\n"
    # two boots, or three when TCG's own early-boot panic (vm/machine.py TCG_APPEND) hit the second
    assert 2 <= len(calls) <= guest_mod.BOOT_ATTEMPTS_TCG
    assert "Kernel panic" in (tmp_path / "console.boot-panic-1.log").read_text(errors="replace")
