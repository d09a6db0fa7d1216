"""The io_uring layer against the host kernel (no ublk needed): NOP, READ/WRITE batches, FSYNC,
FALLOCATE, 128-byte SQEs, full-batch CQ reaping."""
import ctypes
import errno
import mmap
import os

import pytest

from ubdsrv import uring
from ubdsrv.uring import Ring

BS = 4096


def _buf(n):
    m = mmap.mmap(-1, n)
    return m, ctypes.addressof(ctypes.c_char.from_buffer(m))


def _by_ud(cqes):
    return {ud: res for ud, res, _f in cqes}


def test_nop_round_trip():
    with Ring(8) as r:
        for i in range(5):
            r.prep_nop(100 + i)
        assert r.submit() == 5
        assert _by_ud(r.wait(5)) == {100 + i: 0 for i in range(5)}


def test_sqe128_ring_setup_and_nop():
    with Ring(4, sqe128=True) as r:
        assert r.sqe_size == 128 and r.flags & uring.IORING_SETUP_SQE128
        assert len(r.sqes) == r.sq_entries * 128
        r.prep_nop(7)
        assert r.wait(1) == [(7, 0, 0)]


def test_sqe_layout_matches_io_uring_h():
    # opcode@0 fd@4 off@8 addr@16 len@24 op_flags@28 user_data@32, cmd area @48
    raw = uring.SQE.pack(22, 1, 2, 3, 0x1111, 0x2222, 0x33, 0x44, 0x5555)
    assert raw[0] == 22 and raw[1] == 1 and int.from_bytes(raw[4:8], "little") == 3
    assert int.from_bytes(raw[8:16], "little") == 0x1111
    assert int.from_bytes(raw[16:24], "little") == 0x2222
    assert int.from_bytes(raw[24:28], "little") == 0x33
    assert int.from_bytes(raw[28:32], "little") == 0x44
    assert int.from_bytes(raw[32:40], "little") == 0x5555
    cmd = uring.SQE_CMD16.pack(46, 9, 0xC0107520, 77, 1, 2, -5, 0xABC)
    assert cmd[0] == 46 and int.from_bytes(cmd[8:12], "little") == 0xC0107520
    assert int.from_bytes(cmd[32:40], "little") == 77
    assert cmd[48:50] == b"\x01\x00" and cmd[50:52] == b"\x02\x00"
    assert int.from_bytes(cmd[52:56], "little", signed=True) == -5
    assert int.from_bytes(cmd[56:64], "little") == 0xABC
    big = uring.SQE_CMD80.pack(46, 3, 0xC0207504, 1, b"x" * 32)
    assert len(big) == 128 and big[48:80] == b"x" * 32 and big[80:] == bytes(48)


def test_batch_of_256_writes_then_reads(tmp_path):
    n = 256
    path = tmp_path / "data"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    wm, waddr = _buf(n * BS)
    rm, raddr = _buf(n * BS)
    try:
        for i in range(n):
            wm[i * BS:(i + 1) * BS] = bytes([i % 251]) * 8 + os.urandom(BS - 8)
        with Ring(256) as r:
            for i in range(n):
                r.prep_write(fd, waddr + i * BS, BS, i * BS, i)
            assert r.submit() == n
            res = _by_ud(r.wait(n))
            assert res == {i: BS for i in range(n)}
            # file content is what we wrote, block by block
            assert path.read_bytes() == bytes(wm)
            # and read it back in reverse order into another buffer
            for i in range(n):
                r.prep_read(fd, raddr + i * BS, BS, (n - 1 - i) * BS, 1000 + i)
            r.submit()
            assert _by_ud(r.wait(n)) == {1000 + i: BS for i in range(n)}
            for i in range(n):
                assert rm[i * BS:(i + 1) * BS] == wm[(n - 1 - i) * BS:(n - i) * BS]
    finally:
        os.close(fd)


def test_full_cq_batch_is_reaped_at_once():
    with Ring(64) as r:
        for i in range(64):
            r.prep_nop(i)
        r.submit(64)   # wait for all 64
        assert r.cq_ready() == 64
        cqes = r.reap()
        assert sorted(c[0] for c in cqes) == list(range(64))
        assert r.cq_ready() == 0


def test_more_sqes_than_entries_submits_when_full():
    with Ring(8) as r:
        for i in range(20):
            r.prep_nop(i)
        got = r.wait(20)
        assert sorted(c[0] for c in got) == list(range(20))


def test_fsync_and_datasync(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"x" * 8192)
        with Ring(4) as r:
            r.prep_fsync(fd, 1)
            r.prep_fsync(fd, 2, datasync=True)
            assert _by_ud(r.wait(2)) == {1: 0, 2: 0}
            r.prep_fsync(12345, 3)   # bad fd -> -EBADF in the CQE
            assert r.wait(1) == [(3, -errno.EBADF, 0)]
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["punch", "zero"])
def test_fallocate_punch_hole_and_zero_range(tmp_path, mode):
    path = tmp_path / "f"
    path.write_bytes(b"\xaa" * (16 * BS))
    fd = os.open(path, os.O_RDWR)
    try:
        flags = (uring.FALLOC_FL_PUNCH_HOLE | uring.FALLOC_FL_KEEP_SIZE if mode == "punch"
                 else uring.FALLOC_FL_ZERO_RANGE)
        with Ring(4) as r:
            r.prep_fallocate(fd, flags, 4 * BS, 8 * BS, 9)
            (ud, res, _f), = r.wait(1)
        if res == -errno.EOPNOTSUPP:
            pytest.skip(f"{mode}: not supported by the temp filesystem")
        assert (ud, res) == (9, 0)
        data = path.read_bytes()
        assert len(data) == 16 * BS
        assert data[:4 * BS] == b"\xaa" * (4 * BS)
        assert data[4 * BS:12 * BS] == bytes(8 * BS)
        assert data[12 * BS:] == b"\xaa" * (4 * BS)
    finally:
        os.close(fd)


def test_uring_cmd_payload_limits():
    with Ring(4) as r:
        with pytest.raises(ValueError):
            r.prep_uring_cmd(0, 0, b"x" * 17, 1)
    with Ring(4, sqe128=True) as r:
        with pytest.raises(ValueError):
            r.prep_uring_cmd(0, 0, b"x" * 81, 1)


def test_setup_error_is_an_oserror_with_errno():
    with pytest.raises(OSError) as ei:
        Ring(0)
    assert ei.value.errno == errno.EINVAL and "io_uring_setup" in str(ei.value)


def test_queue_ring_flags_fallback():
    from ubdsrv.queue import make_ring
    r = make_ring(256)
    try:
        assert r.sq_entries == 256
        r.prep_nop(1)
        assert r.wait(1)[0][:2] == (1, 0)
    finally:
        r.close()


def test_linked_read_with_skip_success_posts_one_cqe(tmp_path):
    """What the queue's passthrough relies on: READ(IO_LINK | CQE_SKIP_SUCCESS) -> next. A full read
    posts only the next request's CQE; a failed or short read posts only its own (the link is cut
    and its CQE suppressed)."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    m, addr = _buf(BS)
    linked = uring.IOSQE_IO_LINK | uring.IOSQE_CQE_SKIP_SUCCESS
    try:
        with Ring(8) as r:
            r.prep(uring.IORING_OP_READ, fd, 0, addr, 50, 0, 1, linked)     # full read
            r.prep_nop(2)
            r.prep(uring.IORING_OP_READ, fd, 0, addr, BS, 0, 3, linked)     # short read (100 of 4096)
            r.prep_nop(4)
            r.prep(uring.IORING_OP_READ, 999, 0, addr, BS, 0, 5, linked)    # bad fd
            r.prep_nop(6)
            r.submit()
            assert _by_ud(r.wait(3)) == {2: 0, 3: 100, 5: -errno.EBADF}
    finally:
        os.close(fd)
        m.close()


def test_three_linked_sqes_post_one_cqe_from_whichever_fails(tmp_path):
    """What the USER_COPY passthrough chain (copy -> read/write -> commit) relies on: with IO_LINK |
    CQE_SKIP_SUCCESS on the first two, a full chain posts only the last CQE; a failure anywhere posts
    only the failing SQE's CQE and cancels the rest silently."""
    path = tmp_path / "f"
    path.write_bytes(b"y" * BS)
    fd = os.open(path, os.O_RDWR)
    m, addr = _buf(BS)
    linked = uring.IOSQE_IO_LINK | uring.IOSQE_CQE_SKIP_SUCCESS
    try:
        with Ring(16) as r:
            # full chain: read 4 KiB, write them at offset 4 KiB, then the "commit" NOP
            r.prep(uring.IORING_OP_READ, fd, 0, addr, BS, 0, 1, linked)
            r.prep(uring.IORING_OP_WRITE, fd, BS, addr, BS, 0, 2, linked)
            r.prep_nop(3)
            # first link fails (bad fd): only its CQE
            r.prep(uring.IORING_OP_READ, 999, 0, addr, BS, 0, 4, linked)
            r.prep(uring.IORING_OP_WRITE, fd, 0, addr, BS, 0, 5, linked)
            r.prep_nop(6)
            # second link fails: the first posts nothing (success), the second its error, the NOP nothing
            r.prep(uring.IORING_OP_READ, fd, 0, addr, BS, 0, 7, linked)
            r.prep(uring.IORING_OP_WRITE, 999, 0, addr, BS, 0, 8, linked)
            r.prep_nop(9)
            r.submit()
            assert _by_ud(r.wait(3)) == {3: 0, 4: -errno.EBADF, 8: -errno.EBADF}
            r.prep_nop(10)     # nothing else is on its way
            assert r.wait(1) == [(10, 0, 0)]
        assert path.read_bytes() == b"y" * (2 * BS)
    finally:
        os.close(fd)
        m.close()
