"""The VM layer against a real guest: exec, streams, timeouts, SFTP, large output, panics."""
import hashlib
import os
import subprocess
import time

import pytest

from vm.errors import CommandTimeout, KernelPanic


def test_guest_runs_the_ublk_kernel(guest):
    r = guest.exec("modprobe ublk_drv && test -c /dev/ublk-control && uname -r && "
                   "cat /proc/sys/kernel/tainted", timeout=60)
    assert r.status == 0, r.stderr
    release, tainted = r.stdout.split()
    # the kernel the image was built with (6.12 for `cloud`, 7.x for `backports`, or a tree's)
    assert release == guest.machine.image.kernel_release
    assert tainted == "0"
    assert guest.accel in ("kvm", "tcg")


def test_exec_returns_status_and_both_streams(guest):
    seen = []
    r = guest.exec("echo to-out; echo to-err >&2; exit 3", timeout=30, on_stdout=seen.append)
    assert (r.status, r.stdout, r.stderr) == (3, "to-out\n", "to-err\n")
    assert b"".join(seen) == b"to-out\n"


def test_timeout_kills_the_command_and_says_so(guest):
    t0 = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        guest.exec("echo started; sleep 300", timeout=3)
    assert time.monotonic() - t0 < 20
    assert "within 3 s" in str(info.value) and "sleep 300" in str(info.value)
    # The kill is asynchronous: give the guest a moment to reap it.
    left = guest.exec("for i in 1 2 3 4 5 6 7 8 9 10; do pgrep -x sleep || exit 0; sleep 0.3; done",
                      timeout=30)
    assert left.status == 0, f"the timed-out command still runs: {left.stdout}"


def test_sftp_round_trip_keeps_every_byte(guest, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    files = {"a.bin": os.urandom(3 << 20), "sub/b.txt": b"hello\n", "sub/deeper/c": b""}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    guest.push(tree, "/tmp/roundtrip")
    r = guest.exec("cd /tmp/roundtrip && sha256sum a.bin sub/b.txt sub/deeper/c", timeout=60)
    remote = {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()}
    assert remote == {rel: hashlib.sha256(d).hexdigest() for rel, d in files.items()}
    guest.pull("/tmp/roundtrip/a.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == files["a.bin"]


def test_eight_mib_on_both_streams_without_deadlock(guest):
    r = guest.exec("head -c 6291456 /dev/zero | base64 -w0 & head -c 3145728 /dev/zero | base64 -w0 >&2; "
                   "wait", timeout=120)
    assert r.status == 0
    assert len(r.stdout) == 8 << 20 and set(r.stdout) == {"A"}
    assert len(r.stderr) == 4 << 20


def test_guest_panic_is_reported_with_the_console_and_leaves_no_qemu(fresh_guest):
    pid = fresh_guest.machine.proc.pid
    t0 = time.monotonic()
    with pytest.raises(KernelPanic) as info:
        fresh_guest.exec("echo c > /proc/sysrq-trigger; sleep 60", timeout=120)
    assert time.monotonic() - t0 < 60
    assert "Kernel panic" in info.value.console_tail
    assert "sysrq" in info.value.console_tail.lower()
    fresh_guest.stop()
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0
