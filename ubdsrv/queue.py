"""One ublk queue: its io_uring, its IO buffers, its descriptor area, and the serving loop.

Runs in a process of its own (see daemon.py). Every tag cycles through
    FETCH_REQ -> (request) -> target -> COMMIT_AND_FETCH_REQ(result) -> (next request) -> ...
and the loop is: one io_uring_enter (submit everything queued, wait for >= 1 CQE), reap every CQE,
dispatch each, queue the resulting SQEs, repeat. Nothing is allocated per IO beyond the tuples
`unpack_from` returns.
"""
import ctypes
import errno
import mmap
import os

from . import uapi, uring
from .targets.base import OP_SHIFT, TAG_MASK, TGT_IO

# user_data op field for our ublk commands (debugging aid; routing only needs TGT_IO)
_UD_FETCH = uapi.UBLK_IO_FETCH_REQ << OP_SHIFT
_UD_COMMIT = uapi.UBLK_IO_COMMIT_AND_FETCH_REQ << OP_SHIFT
_UD_GET_DATA = uapi.UBLK_IO_NEED_GET_DATA << OP_SHIFT

_RING_FLAG_CHOICES = (
    uring.IORING_SETUP_COOP_TASKRUN | uring.IORING_SETUP_SINGLE_ISSUER | uring.IORING_SETUP_DEFER_TASKRUN
    | uring.IORING_SETUP_SUBMIT_ALL,
    uring.IORING_SETUP_COOP_TASKRUN | uring.IORING_SETUP_SUBMIT_ALL,
    0,
)


def _pow2(n):
    p = 1
    while p < n:
        p <<= 1
    return p


def make_ring(entries, flags=None):
    """A ring with the cheapest task-work mode the kernel accepts (UBDSRV_RING_FLAGS overrides)."""
    env = os.environ.get("UBDSRV_RING_FLAGS")
    if flags is None and env:
        flags = int(env, 0)
    choices = _RING_FLAG_CHOICES if flags is None else (flags,)
    err = None
    for f in choices:
        try:
            return uring.Ring(entries, flags=f)
        except OSError as e:
            err = e
            if e.errno != errno.EINVAL:
                raise
    raise err


class Queue:
    def __init__(self, dev_id, q_id, info, cdev_fd, desc, target, log, ring_flags=None):
        self.dev_id, self.q_id = dev_id, q_id
        self.depth = info.queue_depth
        self.buf_size = info.max_io_buf_bytes
        self.flags = info.flags
        self.cdev_fd = cdev_fd
        self.desc = desc                 # read-only mmap of this queue's ublksrv_io_desc array
        self.target = target
        self.log = log
        self.ring_flags = ring_flags
        if info.flags & uapi.UBLK_F_CMD_IOCTL_ENCODE:
            self.op_fetch = uapi.UBLK_U_IO_FETCH_REQ
            self.op_commit = uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ
            self.op_get_data = uapi.UBLK_U_IO_NEED_GET_DATA
        else:
            self.op_fetch = uapi.UBLK_IO_FETCH_REQ
            self.op_commit = uapi.UBLK_IO_COMMIT_AND_FETCH_REQ
            self.op_get_data = uapi.UBLK_IO_NEED_GET_DATA
        self.ring = None
        self.bufs = []
        self.cqes_seen = 0
        self.enters = 0

    def setup(self):
        # room for one ublk command and one target SQE per tag
        self.ring = make_ring(_pow2(2 * self.depth), self.ring_flags)
        # one anonymous region, one page-aligned slice per tag (fine for O_DIRECT)
        self._bufmap = mmap.mmap(-1, self.depth * self.buf_size,
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._bufref = ctypes.c_char.from_buffer(self._bufmap)
        base = ctypes.addressof(self._bufref)
        self.bufs = [base + tag * self.buf_size for tag in range(self.depth)]
        self.target.attach(self)

    def fetch_all(self):
        """Submit FETCH_REQ for every tag; raise if the driver rejected any of them."""
        ring = self.ring
        for tag in range(self.depth):
            ring.prep_ublk_io(self.cdev_fd, self.op_fetch, tag | _UD_FETCH, self.q_id, tag, 0,
                              self.bufs[tag])
        ring.submit()
        # run deferred work and look (without consuming) for immediate failures
        ring.enter(0, 0, uring.IORING_ENTER_GETEVENTS)
        cq = ring.cq
        head = uring.U32.unpack_from(cq, ring.cq_head_off)[0]
        tail = uring.U32.unpack_from(cq, ring.cq_tail_off)[0]
        for i in range(head, head + ((tail - head) & 0xFFFFFFFF)):
            ud, res, _f = uring.CQE.unpack_from(cq, ring.cqes_off + ((i & ring.cq_mask) << 4))
            if res < 0 and not ud & TGT_IO:
                raise uring.os_error(-res, f"queue {self.q_id}: FETCH_REQ tag {ud & TAG_MASK}")

    def run(self):
        """Serve until every tag was aborted (device stopped/deleted or daemon going away)."""
        ring = self.ring
        enter = uring._enter
        get_errno = uring.get_errno
        NR_ENTER = uring.NR_io_uring_enter
        GETEVENTS = uring.IORING_ENTER_GETEVENTS
        ring_fd = ring.fd
        sq, cq, sqes = ring.sq, ring.cq, ring.sqes
        sq_tail_off = ring.sq_tail_off
        cq_head_off, cq_tail_off, cqes_off = ring.cq_head_off, ring.cq_tail_off, ring.cqes_off
        cq_mask, sq_mask = ring.cq_mask, ring.sq_mask
        u32_pack = uring.U32.pack_into
        u32_unpack = uring.U32.unpack_from
        cqe_unpack = uring.CQE.unpack_from
        cmd_pack = uring.SQE_CMD16.pack_into
        OP_URING_CMD = uring.IORING_OP_URING_CMD
        iod_unpack = uapi.IO_DESC.unpack_from
        desc = self.desc
        bufs = self.bufs
        cdev = self.cdev_fd
        q_id = self.q_id
        op_commit, op_get_data = self.op_commit, self.op_get_data
        queue_io = self.target.queue_io
        io_done = self.target.io_done
        RES_NEED_GET_DATA = uapi.UBLK_IO_RES_NEED_GET_DATA
        RES_ABORT = uapi.UBLK_IO_RES_ABORT
        RETRY = (errno.EINTR, errno.EAGAIN, errno.EBUSY)
        UD_COMMIT, UD_GET_DATA = _UD_COMMIT, _UD_GET_DATA

        live = self.depth
        submitted = ring.submitted
        seen = 0
        enters = 0
        log = self.log
        while live:
            enters += 1
            tail = ring.sq_tail
            u32_pack(sq, sq_tail_off, tail & 0xFFFFFFFF)
            r = enter(NR_ENTER, ring_fd, (tail - submitted) & 0xFFFFFFFF, 1, GETEVENTS, None, 0)
            if r < 0:
                e = get_errno()
                if e not in RETRY:
                    raise uring.os_error(e, f"queue {q_id}: io_uring_enter")
            else:
                submitted += r
            head = u32_unpack(cq, cq_head_off)[0]
            n = (u32_unpack(cq, cq_tail_off)[0] - head) & 0xFFFFFFFF
            seen += n
            for i in range(head, head + n):
                ud, res, _f = cqe_unpack(cq, cqes_off + ((i & cq_mask) << 4))
                tag = ud & 0xFFFF
                if ud & TGT_IO:
                    res = io_done(tag, res, ud)
                    if res is None:
                        continue
                elif res == 0:
                    # a new request on this tag (UBLK_IO_RES_OK)
                    op_flags, nr_sectors, start_sector, _addr = iod_unpack(desc, tag * 24)
                    res = queue_io(tag, op_flags, nr_sectors, start_sector)
                    if res is None:
                        continue
                elif res == RES_NEED_GET_DATA:
                    # a WRITE with NEED_GET_DATA: hand the buffer over, the data arrives with res 0
                    t = ring.sq_tail
                    cmd_pack(sqes, (t & sq_mask) << 6, OP_URING_CMD, cdev, op_get_data, tag | UD_GET_DATA,
                             q_id, tag, 0, bufs[tag])
                    ring.sq_tail = t + 1
                    continue
                else:
                    live -= 1
                    if res != RES_ABORT:
                        log(f"queue {q_id}: tag {tag}: command failed: {uring.os_error(-res, 'ublk io cmd')}")
                    continue
                t = ring.sq_tail
                cmd_pack(sqes, (t & sq_mask) << 6, OP_URING_CMD, cdev, op_commit, tag | UD_COMMIT,
                         q_id, tag, res, bufs[tag])
                ring.sq_tail = t + 1
            u32_pack(cq, cq_head_off, (head + n) & 0xFFFFFFFF)
        ring.submitted = submitted
        self.cqes_seen = seen
        self.enters = enters
