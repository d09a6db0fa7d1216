"""`ublk` argument handling that needs no driver: bad input gets one clear line naming the option and
exit status 2, before /dev/ublk-control is touched; and the `list` layout scripts parse by field."""
import subprocess
import sys
from pathlib import Path

import pytest

from ubdsrv import cli, uapi

REPO = Path(__file__).resolve().parents[2]


def ublk(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ubdsrv", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.mark.parametrize("args, needle", [
    (["add", "-t", "nbd"], "-t nbd: unknown target"),
    (["add", "-t", "null", "-q", "0"], "-q/--queues"),
    (["add", "-t", "null", "-q", "5000"], "-q/--queues"),
    (["add", "-t", "null", "-d", "0"], "-d/--depth"),
    (["add", "-t", "null", "-d", "4097"], "-d/--depth"),
    (["add", "-t", "null", "-d", "many"], "-d/--depth"),
    (["add", "-t", "null", "-r", "2"], "-r/--user_recovery"),
    (["add", "-t", "null", "-u", "1"], "-u 1: zero copy is not supported"),
    (["add", "-t", "null", "-i", "1", "-e", "1"], "-i 1 and -e 1"),
    (["add", "-t", "null", "-s", "lots"], "-s/--size"),
    (["add", "-t", "null", "-s", "100"], "-s 100"),
    (["add", "-t", "null", "-f", "/etc/hostname"], "-f: only the loop target"),
    (["add", "-t", "null", "--buffered_io"], "--buffered_io"),
    (["add", "-t", "loop"], "-f FILE is required"),
    (["add", "-t", "loop", "-f", "/nonexistent/disk.img"], "-f /nonexistent/disk.img: no such file"),
    (["add", "-t", "loop", "-f", "/dev/null"], "not a regular file or block device"),
    (["add", "-t", "loop", "-f", "/etc/hostname", "-s", "1G"], "-s: the loop target"),
    (["add"], "-t/--type"),
    (["del"], "one of the arguments -n/--number -a/--all is required"),
    (["del", "-n", "x"], "-n/--number"),
    (["recover"], "-n/--number"),
    (["list", "-n", "-3"], "-n/--number"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_clear_message(args, needle):
    r = ublk(*args)
    assert r.returncode == 2, r
    assert needle in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


def test_empty_backing_file_is_refused(tmp_path):
    f = tmp_path / "empty.img"
    f.write_bytes(b"")
    r = ublk("add", "-t", "loop", "-f", str(f))
    assert r.returncode == 2 and "smaller than 512 bytes" in r.stderr


def test_no_driver_is_a_clear_error_not_a_traceback():
    # the host has no ublk_drv: a valid command fails with one line about the module
    if Path("/dev/ublk-control").exists():
        pytest.skip("this host has ublk")
    r = ublk("add", "-t", "null", "-s", "1G")
    assert r.returncode == 1
    assert "/dev/ublk-control" in r.stderr and "modprobe ublk_drv" in r.stderr
    assert "Traceback" not in r.stderr


def test_sizes():
    assert cli.parse_size("1G") == 1 << 30
    assert cli.parse_size("512M") == 512 << 20
    assert cli.parse_size("4096") == 4096
    assert cli.parse_size("2GiB") == 2 << 30


def test_flags_from_options():
    a = cli.build_parser().parse_args(["add", "-t", "null", "-i", "1", "-g", "1"])
    _t, spec, flags = cli.validate_add(a)
    assert spec == {"name": "null", "dev_size": 250 << 30}
    assert flags & uapi.UBLK_F_USER_RECOVERY and flags & uapi.UBLK_F_USER_RECOVERY_REISSUE
    assert flags & uapi.UBLK_F_NEED_GET_DATA and flags & uapi.UBLK_F_CMD_IOCTL_ENCODE


class _FakeCtrl:
    def get_dev_info(self, dev_id):
        return uapi.DevInfo(nr_hw_queues=2, queue_depth=128, state=uapi.UBLK_S_DEV_LIVE, dev_id=dev_id,
                            ublksrv_pid=1234, flags=0x4A, max_io_buf_bytes=524288)

    def get_params(self, dev_id):
        p = uapi.Params()
        p.types = 5
        p.dev_sectors = 2097152
        p.char_major, p.char_minor, p.disk_major, p.disk_minor = 511, 0, 259, 1
        return p


def test_list_layout_field_positions(monkeypatch):
    from ubdsrv import daemon
    monkeypatch.setattr(cli, "_is_ours", lambda pid: pid == 1234)
    monkeypatch.setattr(daemon, "load_state", lambda dev_id: {
        "daemon_pid": 1234,
        "queues": [{"q_id": 0, "tid": 1235, "affinity": [0]}, {"q_id": 1, "tid": 1236, "affinity": [1]}],
        "target_json": {"name": "loop", "type": 1, "dev_size": 1073741824,
                        "backing_file": "/srv/disk.img"}})
    out = cli.format_device(_FakeCtrl(), 0)
    assert out == (
        "dev id 0: nr_hw_queues 2 queue_depth 128 block size 512 dev_capacity 2097152\n"
        "\tmax rq size 524288 daemon pid 1234 state LIVE\n"
        "\tflags 0x4a [ URING_CMD_COMP_IN_TASK RECOVERY CMD_IOCTL_ENCODE ]\n"
        "\tublkc: 511:0 ublkb: 259:1 owner: 0:0\n"
        "\tqueue 0: tid 1235 affinity(0 )\n"
        "\tqueue 1: tid 1236 affinity(1 )\n"
        '\ttarget {"backing_file":"/srv/disk.img","dev_size":1073741824,"name":"loop","type":1}')
    lines = out.split("\n")
    assert lines[1].split()[6] == "1234" and lines[1].split()[8] == "LIVE"
    assert lines[4].split()[3] == "1235"


def test_list_hides_stale_queue_tids(monkeypatch):
    # a saved state from an older daemon must not offer its (possibly reused) pids
    from ubdsrv import daemon
    monkeypatch.setattr(daemon, "load_state", lambda dev_id: {
        "daemon_pid": 999, "queues": [{"q_id": 0, "tid": 1000, "affinity": [0]}]})
    out = cli.format_device(_FakeCtrl(), 0)
    assert "queue 0" not in out
    # same pid as recorded, but the daemon is gone (killed): no tids either
    monkeypatch.setattr(daemon, "load_state", lambda dev_id: {
        "daemon_pid": 1234, "queues": [{"q_id": 0, "tid": 1235, "affinity": [0]}]})
    monkeypatch.setattr(cli, "_is_ours", lambda pid: False)
    assert "queue 0" not in cli.format_device(_FakeCtrl(), 0)


def test_is_ours_refuses_dangerous_pids():
    import os
    for pid in (0, 1, -1, os.getpid()):
        assert not cli._is_ours(pid)
