"""The device vocabulary (vm/device.py): the server takes what the host says, the scenario schema and
the `ublk add` line come from it, and the server-process check and splat patterns are the one set."""
import shlex

import pytest

from ubdsrv import cli as server_cli, targets as server_targets, uapi
from vm import device
from vm.scenario import schema

KIND = {"int": "int", "float": "float", "text": "str", "choice": "choice", "flag": "flag",
        "path": "path", "size": "size"}


def _server_option(target, key):
    found = [o for o in server_targets.get(target).options if o.name == key]
    assert found, f"the server's {target} target has no option {key!r}"
    return found[0]


@pytest.mark.parametrize("name", [t.name for t in device.TARGETS.values() if t.ublk])
def test_every_ublk_target_and_option_is_the_servers(name):
    for key, s in device.TARGETS[name].options.items():
        o = _server_option(name, key)
        assert f"--{o.name}" == s.option and KIND[s.kind] == o.kind, key
        assert s.choices == o.choices, key
        assert s.default is None or s.default == o.default, key   # None: the server decides


def test_size_and_file_are_the_servers_options():
    s, f = _server_option("null", "size"), _server_option("loop", "file")
    assert device.SIZE.option == f"-{s.short}" and device.FILE.option == f"-{f.short}"


def test_queue_depth_has_one_host_default_and_the_servers_bound():
    depth = device.UBLK["depth"]
    assert device.Device(target="null").depth == depth.default
    assert schema.DEVICE["depth"].default == depth.default
    assert depth.hi == server_cli.MAX_DEPTH == uapi.UBLK_MAX_QUEUE_DEPTH
    assert device.UBLK["queues"].hi == server_cli.MAX_QUEUES
    with pytest.raises(schema.Invalid):
        schema.DEVICE["depth"].check(server_cli.MAX_DEPTH + 1)


def test_every_ublk_setting_is_an_add_option_of_the_server():
    server = {f"-{o.short}": o for o in server_cli.ADD_OPTIONS if o.short}
    server.update({f"--{o.name}": o for o in server_cli.ADD_OPTIONS})
    for key, s in device.UBLK.items():
        assert s.option in server, key
        # -q 2, -g 1: numbers, as ublksrv reads them; a bare option (--usercopy) is the server's flag
        assert server[s.option].kind == ("flag" if s.bare else "int"), key


def test_add_command_of_each_target():
    assert device.add_command(device.Device(target="null", id=3, queues=2, recovery=True)) == \
        "ublk add -t null -n 3 -q 2 -d 128 -r 1 -s 268435456"
    loop = device.Device(target="loop", id=0, file="/var/tmp/a b.img", options={"buffered_io": True})
    assert shlex.split(device.add_command(loop)) == [
        "ublk", "add", "-t", "loop", "-n", "0", "-q", "1", "-d", "128", "-f", "/var/tmp/a b.img",
        "--buffered_io"]
    fault = device.Device(target="fault", id=1, size=1 << 30,
                          options={"delay_us": 250, "errno": "ENOSPC", "error_rate": 0.5})
    assert device.add_command(fault) == ("ublk add -t fault -n 1 -q 1 -d 128 -s 1073741824 "
                                         "--delay_us 250 --error_rate 0.5 --errno ENOSPC")
    on_loop = device.Device(target="fault", id=1, file="/f.img", options={"base": "loop"})
    assert device.add_command(on_loop).endswith("-f /f.img --base loop")
    assert device.add_command(device.Device(target="kernel_loop", file="/f.img")) == \
        "losetup --direct-io=on -f --show /f.img"


def test_scheduler_is_set_through_sysfs_and_checked_not_passed_to_ublk_add():
    d = device.Device(target="null", id=2, scheduler="mq-deadline")
    assert "deadline" not in device.add_command(d)
    assert device.scheduler_command(d, "/dev/ublkb2") == (
        "echo mq-deadline > /sys/block/ublkb2/queue/scheduler && "
        "grep -qF '[mq-deadline]' /sys/block/ublkb2/queue/scheduler")
    assert device.scheduler_command(device.Device(target="kernel_loop", file="/f", scheduler="none"),
                                    "/dev/loop3").startswith("echo none > /sys/block/loop3/")
    assert device.scheduler_command(device.Device(target="null"), "/dev/ublkb0") == ""
    assert all("scheduler" in t.settings() for t in device.TARGETS.values())


def test_rules_name_the_setting():
    assert list(device.rules({"target": "null", "recovery_reissue": True})) == [
        ("recovery_reissue", "expected recovery = 1 as well (it modifies recovery)")]
    v = {"target": "fault", "base": None, "buffered_io": True, "file": "/x"}
    assert [k for k, _ in device.rules(v)] == ["buffered_io", "file"]
    assert list(device.rules(dict(v, base="loop"))) == []


def test_a_key_two_targets_share_means_the_same():
    every = device.settings()
    for t in device.TARGETS.values():
        for key, s in t.settings().items():
            assert every[key].same_meaning(s)


def test_server_processes_by_argv():
    yes = [["python3", "-m", "ubdsrv", "add", "-t", "null"], ["/usr/bin/python3.13", "/opt/ubd/ubdsrv"],
           ["python3", "/opt/ubd/ubdsrv/__main__.py", "list"], [b"python3", b"-m", b"ubdsrv"]]
    no = [["sh", "-c", "python3 -m ubdsrv"], ["timeout", "5", "python3", "-m", "ubdsrv"],
          ["python3", "-m", "ubdsrv.proc"], ["python3"], [], ["bash", "/opt/ubd/ubdsrv"]]
    assert all(device.is_server_argv(a) for a in yes)
    assert not any(device.is_server_argv(a) for a in no)


def test_splat_patterns():
    lines = ["[ 1.0] WARNING: CPU: 0 PID: 1 at drivers/block/ublk_drv.c:100", "[ 2.0] all fine",
             "[ 3.0] INFO: task fio:99 blocked for more than 120 seconds.",
             "[ 4.0] BUG: KASAN: use-after-free in ublk_ch_release"]
    assert [k for k, _ in device.find_splats(lines)] == ["WARNING", "hung task", "BUG"]


def test_a_splat_is_quoted_by_the_line_that_says_what_happened():
    lines = ["[ 1.0] ------------[ cut here ]------------",
             "[ 1.0] WARNING: CPU: 1 PID: 7 at drivers/block/ublk_drv.c:1234 ublk_ch_uring_cmd+0x1/0x2",
             "[ 2.0] refcount_t: underflow; use-after-free."]
    hits = device.find_splats(lines)
    assert [k for k, _ in hits] == ["WARNING", "WARNING", "refcount"]
    assert device.headline(hits) == lines[1].strip()
    assert device.headline(hits[:1]) == lines[0].strip()   # only the marker: it is all there is
