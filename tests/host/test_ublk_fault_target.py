"""The fault target's decisions, per request, against a stand-in queue (no driver): what it completes,
what it fails, what it delays with a timeout SQE, what it holds. The guest test
(tests/guest/test_ubdsrv_fault_target.py) checks the same against the real driver."""
import ctypes
import errno

import pytest

from ubdsrv import cli, uapi, uring
from ubdsrv.targets import TARGETS, fault
from ubdsrv.targets.base import OP_SHIFT, QUEUED, TGT_IO

READ, WRITE, FLUSH = uapi.UBLK_IO_OP_READ, uapi.UBLK_IO_OP_WRITE, uapi.UBLK_IO_OP_FLUSH


class FakeQueue:
    """What a target sees of its queue: a descriptor area, prep_target, a log."""

    def __init__(self, depth=8, q_id=0):
        self.q_id = q_id
        self.desc = bytearray(depth * 24)
        self.bufs = [0x10000 * (t + 1) for t in range(depth)]
        self.prepped = []
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)

    def prep_target(self, tag, op, opcode, fd, off=0, addr=0, length=0, op_flags=0):
        self.prepped.append((tag, op, opcode, fd, off, addr, length, op_flags))

    def arrive(self, tag, op, nr_sectors, start_sector):
        uapi.IO_DESC.pack_into(self.desc, tag * 24, op, nr_sectors, start_sector, 0)
        return op, nr_sectors, start_sector


def device(*opts, q=None):
    req = cli.parse_add(["-t", "fault", *opts])
    t = TARGETS["fault"](req.spec)
    t.open()
    q = q or FakeQueue()
    t.attach(q)
    return t, q


def test_is_registered_and_built_on_null_by_default():
    t, _ = device()
    assert t.spec["base"] == {"name": "null", "dev_size": 250 << 30}
    assert t.dev_size() == 250 << 30 and not t.complete_inline and t.passthrough_fd is None
    assert t.describe() == {"name": "fault", "type": 0, "dev_size": 250 << 30,
                            "base": {"name": "null", "type": 0, "dev_size": 250 << 30}}


def test_no_fault_configured_serves_like_the_base():
    t, q = device("-s", "1M")
    assert t.queue_io(0, *q.arrive(0, READ, 8, 0)) == 8 << 9
    assert q.prepped == []


def test_delay_is_a_timeout_sqe_per_request_then_the_base_serves():
    t, q = device("--delay_us", "2500000")
    assert t.queue_io(3, *q.arrive(3, WRITE, 16, 100)) is QUEUED
    tag, op, opcode, fd, off, addr, length, _ = q.prepped[-1]
    assert (tag, op, opcode, fd, off, length) == (3, fault.OP_DELAY, uring.IORING_OP_TIMEOUT, -1, 0, 1)
    ts = fault._Timespec.from_address(addr)          # what the kernel will read at submission
    assert (ts.tv_sec, ts.tv_nsec) == (2, 500000000)
    ud = 3 | fault.OP_DELAY << OP_SHIFT | TGT_IO
    assert t.io_done(3, -errno.ETIME, ud) == 16 << 9        # the delay over: null completes it
    # every tag gets its own timer; none blocks another
    assert t.queue_io(4, *q.arrive(4, READ, 8, 0)) is QUEUED and q.prepped[-1][0] == 4


def test_error_sectors_fail_exactly_the_requests_touching_them():
    t, q = device("--error_sectors", "100-199,1000", "--errno", "ENOSPC")
    fails = -errno.ENOSPC
    for start, nr, want in [(0, 100, 100 << 9),     # sectors 0..99: just before the range
                            (96, 4, 4 << 9),        # 96..99
                            (96, 8, fails),         # 96..103 overlaps 100
                            (199, 1, fails), (200, 8, 8 << 9), (999, 1, 1 << 9), (1000, 1, fails),
                            (1001, 8, 8 << 9)]:
        assert t.queue_io(0, *q.arrive(0, READ, nr, start)) == want, (start, nr)
    assert t.queue_io(0, *q.arrive(0, FLUSH, 0, 0)) == 0        # a flush touches no sector


def test_error_ops_and_fail_after_ios():
    t, q = device("--error_sectors", "0-7", "--error_ops", "write", "--fail_after_ios", "2")
    assert t.queue_io(0, *q.arrive(0, WRITE, 8, 0)) == 8 << 9     # request 1: before N
    assert t.queue_io(0, *q.arrive(0, WRITE, 8, 0)) == 8 << 9     # request 2
    assert t.queue_io(0, *q.arrive(0, READ, 8, 0)) == 8 << 9      # reads never fail here
    assert t.queue_io(0, *q.arrive(0, WRITE, 8, 0)) == -errno.EIO


def test_error_rate_is_a_function_of_seed_and_sector():
    a, qa = device("--error_rate", "0.3", "--seed", "7")
    b, qb = device("--error_rate", "0.3", "--seed", "7")
    c, qc = device("--error_rate", "0.3", "--seed", "8")
    starts = range(0, 8000, 8)
    ra = [a.queue_io(0, *qa.arrive(0, READ, 8, s)) < 0 for s in starts]
    rb = [b.queue_io(0, *qb.arrive(0, READ, 8, s)) < 0 for s in reversed(starts)][::-1]
    rc = [c.queue_io(0, *qc.arrive(0, READ, 8, s)) < 0 for s in starts]
    assert ra == rb != rc
    assert 0.25 < sum(ra) / len(ra) < 0.35


def test_stuck_tag_holds_only_its_first_request():
    t, q = device("--stuck_tag", "2")
    assert t.queue_io(2, *q.arrive(2, READ, 8, 0)) is QUEUED and q.prepped == []
    assert any("holding the request" in line for line in q.lines)
    assert t.queue_io(1, *q.arrive(1, READ, 8, 0)) == 8 << 9
    assert t.queue_io(2, *q.arrive(2, READ, 8, 0)) == 8 << 9        # never again


def test_die_during_fetch_hooks_queue_0_only():
    t, _ = device("--die_during_fetch", "1")
    assert t.pre_fetch is not None
    t1, _ = device("--die_during_fetch", "1", q=FakeQueue(q_id=1))
    assert t1.pre_fetch is None
    t2, _ = device()
    assert t2.pre_fetch is None


def test_on_loop_base(tmp_path):
    img = tmp_path / "f.img"
    img.write_bytes(b"\0" * (1 << 20))
    t, q = device("--base", "loop", "-f", str(img), "--error_sectors", "8-15")
    assert t.spec["base"]["backing_file"] == str(img) and t.dev_size() == 1 << 20
    assert t.passthrough_fd is None            # every request comes to queue_io
    assert t.queue_io(0, *q.arrive(0, READ, 8, 0)) is QUEUED        # loop queues its read
    assert q.prepped[-1][2] == uring.IORING_OP_READ and q.prepped[-1][3] == t.base.fd
    assert t.io_done(0, 4096, 0 | READ << OP_SHIFT | TGT_IO) == 4096
    assert t.queue_io(0, *q.arrive(0, READ, 8, 8)) == -errno.EIO
    t.close()


@pytest.mark.parametrize("opts, needle", [
    (["--base", "nbd"], "--base: expected one of null, loop"),
    (["--base", "loop"], "-f FILE is required"),
    (["-f", "/etc/hostname"], "-f: an option of --base loop, not of --base null"),
    (["--base", "loop", "-s", "1G", "-f", "/etc/hostname"], "-s: an option of --base null"),
    (["--error_rate", "1.5"], "--error_rate 1.5: expected a probability"),
    (["--error_sectors", "9-3"], "not a range of sectors"),
    (["--error_sectors", "x"], "expected sector ranges"),
    (["--error_sectors", "1", "--errno", "EWHAT"], "--errno EWHAT: expected an errno name"),
    (["--error_sectors", "1", "--error_ops", "trim"], "--error_ops: expected one of read, write, any"),
    (["--errno", "EIO"], "neither --error_rate nor --error_sectors"),
    (["--delay_us", "-1"], "--delay_us -1: expected a value >= 0"),
    (["--stuck_tag", "-2"], "--stuck_tag -2"),
])
def test_bad_fault_options_exit_2(opts, needle):
    with pytest.raises(cli.CliError) as e:
        cli.parse_add(["-t", "fault", *opts])
    assert e.value.status == 2 and needle in str(e.value), str(e.value)


def test_timespec_layout_is_the_kernels():
    assert ctypes.sizeof(fault._Timespec) == 16        # struct __kernel_timespec


def test_stuck_tag_waits_until_faults_are_on():
    # 6.12 reads the partition table inside START_DEV: a tag stuck from the first request would hang
    # `add`; --fail_after_ios / --fail_after_secs hold the stuck tag back like the errors
    t, q = device("--stuck_tag", "1", "--fail_after_ios", "3")
    for _ in range(3):
        assert t.queue_io(1, *q.arrive(1, READ, 8, 0)) == 8 << 9
    assert t.queue_io(1, *q.arrive(1, READ, 8, 0)) is QUEUED
    assert t.describe()["fail_after_ios"] == 3 and t.describe()["stuck_tag"] == 1
