"""One ublk queue: its io_uring, its IO buffers, its descriptor area, and the serving loop.

Runs in a process of its own (see daemon.py). Every tag cycles through
    FETCH_REQ -> (request) -> target -> COMMIT_AND_FETCH_REQ(result) -> (next request) -> ...
and the loop is: one io_uring_enter (submit everything queued, wait for >= 1 CQE), reap every CQE,
dispatch each, queue the resulting SQEs, repeat.

SQE banks. The SQE array is cut into fixed slots, one per (bank, tag), written once in setup():
    bank 0  the tag's ublk command (COMMIT_AND_FETCH; FETCH at start)
    bank 1  passthrough READ  (target's fd, the tag's buffer, linked to the commit)
    bank 2  passthrough WRITE (same)
    bank 3  anything else for the tag (target SQEs from queue_io, NEED_GET_DATA)
    bank 4  USER_COPY only: READ of the request's data from /dev/ublkcN into the tag's buffer
    bank 5  USER_COPY only: WRITE of the tag's buffer to the request through /dev/ublkcN
With UBLK_F_USER_COPY the driver does not copy data to or from our buffers: a passthrough WRITE is the
chain copy-in (bank 4) -> WRITE -> commit, a READ is READ -> copy-out (bank 5) -> commit, one CQE per IO
as before. Other requests copy synchronously (pread/pwrite of /dev/ublkcN) around the target's work.
Submitting is writing a slot's index into the SQ index array (the kernel reads SQEs through it), so per
IO only the fields that change are stored: the commit's result, the read's offset and length. A tag has
at most one SQE per bank in flight, and a slot is rewritten only when its tag's next request (or the
failure CQE of its linked read) arrives, i.e. after the kernel has read it, even for a linked commit
that the kernel issues after the read completes. The hot loop reads the rings and the descriptors
through memoryviews cast to integer arrays: an index is far cheaper than a struct call and a tuple.
"""
import ctypes
import errno
from array import array
import mmap
import os

from . import uapi, uring
from .targets.base import OP_SHIFT, TAG_MASK, TGT_IO

BANK_COMMIT, BANK_READ, BANK_WRITE, BANK_OTHER, BANK_COPY_IN, BANK_COPY_OUT = range(6)

#: user_data bit of the queue's own USER_COPY SQEs (banks 4-5): tag | op << OP_SHIFT | UCOPY
UCOPY = TGT_IO << 1

# the tag's read/write SQE is linked to its commit (the commit runs only if the read succeeded in
# full) and posts no CQE when it succeeds: a passthrough IO costs one CQE, the next request's
_LINKED = uring.IOSQE_IO_LINK | uring.IOSQE_CQE_SKIP_SUCCESS

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


def _u32_view(m):
    """The whole mmap `m` as an array of u32 (index = byte offset >> 2)."""
    return memoryview(m)[:len(m) & ~3].cast("I")


class Queue:
    def __init__(self, dev_id, q_id, info, cdev_fd, desc, target, log, ring_flags=None):
        self.dev_id, self.q_id = dev_id, q_id
        self.depth = info.queue_depth
        self.buf_size = info.max_io_buf_bytes
        self.flags = info.flags
        self.user_copy = bool(info.flags & uapi.UBLK_F_USER_COPY)
        self.nr_banks = 6 if self.user_copy else 4
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
        inline = os.environ.get("UBDSRV_INLINE", "1") != "0"
        self.complete_inline = inline and target.complete_inline
        self.passthrough_fd = target.passthrough_fd if inline else None
        self.ring = None
        self.bufs = []
        self.cqes_seen = 0
        self.enters = 0

    def setup(self):
        self.ring = make_ring(_pow2(self.nr_banks * self.depth), self.ring_flags)
        # one anonymous region, one page-aligned slice per tag (fine for O_DIRECT)
        self._bufmap = mmap.mmap(-1, self.depth * self.buf_size,
                                 flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._bufref = ctypes.c_char.from_buffer(self._bufmap)
        base = ctypes.addressof(self._bufref)
        self.bufs = [base + tag * self.buf_size for tag in range(self.depth)]
        self._bufview = memoryview(self._bufmap)
        self._sq_array = _u32_view(self.ring.sq)[self.ring.sq_array_off >> 2:]
        self._write_templates(self.op_fetch)
        self.target.attach(self)

    def _slot(self, bank, tag):
        return bank * self.depth + tag

    def _write_templates(self, cmd_op):
        """Fill bank 0 with the ublk command `cmd_op` for every tag, banks 1-2 with the passthrough
        READ/WRITE (if the target has one), banks 4-5 with the USER_COPY copies (if negotiated)."""
        sqes, bufs, d, q_id = self.ring.sqes, self.bufs, self.depth, self.q_id
        for tag in range(d):
            # USER_COPY: the driver refuses a buffer address in FETCH and COMMIT_AND_FETCH
            uring.SQE_CMD16.pack_into(sqes, tag << 6, uring.IORING_OP_URING_CMD, self.cdev_fd, cmd_op,
                                      tag, q_id, tag, 0, 0 if self.user_copy else bufs[tag])
        fd = self.passthrough_fd
        if fd is None:
            return
        # opcode, flags, ioprio, fd, off, addr, len, rw_flags, user_data
        for bank, op in ((BANK_READ, uapi.UBLK_IO_OP_READ), (BANK_WRITE, uapi.UBLK_IO_OP_WRITE)):
            for tag in range(d):
                uring.SQE.pack_into(sqes, self._slot(bank, tag) << 6, uring.IORING_OP_READ + op, _LINKED, 0,
                                    fd, 0, bufs[tag], 0, 0, tag | (op << OP_SHIFT) | TGT_IO)
        if not self.user_copy:
            return
        for bank, opcode, op in ((BANK_COPY_IN, uring.IORING_OP_READ, uapi.UBLK_IO_OP_WRITE),
                                 (BANK_COPY_OUT, uring.IORING_OP_WRITE, uapi.UBLK_IO_OP_READ)):
            for tag in range(d):
                uring.SQE.pack_into(sqes, self._slot(bank, tag) << 6, opcode, _LINKED, 0, self.cdev_fd,
                                    uapi.user_copy_offset(q_id, tag), bufs[tag], 0, 0,
                                    tag | (op << OP_SHIFT) | UCOPY)

    def _push(self, slot):
        ring = self.ring
        self._sq_array[ring.sq_tail & ring.sq_mask] = slot
        ring.sq_tail += 1

    def prep_target(self, tag, op, opcode, fd, off=0, addr=0, length=0, op_flags=0):
        """Queue the target's SQE for `tag` (`op` goes into user_data for debugging)."""
        slot = self._slot(BANK_OTHER, tag)
        uring.SQE.pack_into(self.ring.sqes, slot << 6, opcode, 0, 0, fd, off, addr, length, op_flags,
                            tag | (op << OP_SHIFT) | TGT_IO)
        self._push(slot)

    def _commit(self, tag, res):
        # ublksrv_io_cmd.result: byte 52 of the tag's bank-0 SQE (the command area starts at 48)
        uring.I32.pack_into(self.ring.sqes, (tag << 6) + 52, res)
        self._push(tag)

    def fetch_all(self):
        """Submit FETCH_REQ for every tag; raise if the driver rejected any of them."""
        ring = self.ring
        pre_fetch = self.target.pre_fetch     # fault injection (targets/fault.py)
        for tag in range(self.depth):
            if pre_fetch is not None:
                pre_fetch(self, tag)
            self._push(tag)
        ring.submit()
        # the kernel has read the FETCH SQEs (uring_cmd copies an SQE it does not issue at once):
        # from now on bank 0 holds COMMIT_AND_FETCH
        self._write_templates(self.op_commit)
        # run deferred work and look (without consuming) for immediate failures
        ring.enter(0, 0, uring.IORING_ENTER_GETEVENTS)
        cq = ring.cq
        head = uring.U32.unpack_from(cq, ring.cq_head_off)[0]
        tail = uring.U32.unpack_from(cq, ring.cq_tail_off)[0]
        for i in range(head, head + ((tail - head) & 0xFFFFFFFF)):
            ud, res, _f = uring.CQE.unpack_from(cq, ring.cqes_off + ((i & ring.cq_mask) << 4))
            if res < 0 and ud < self.depth:
                raise uring.os_error(-res, f"queue {self.q_id}: FETCH_REQ tag {ud}")

    def _user_copy(self, tag, nbytes, to_request):
        """USER_COPY, synchronously: the tag's buffer to the request (READ) or the request's data into
        the buffer (WRITE). Returns None, or -errno for the commit when the driver refused."""
        buf = self._bufview[tag * self.buf_size:tag * self.buf_size + nbytes]
        off = uapi.user_copy_offset(self.q_id, tag)
        try:
            done = os.pwrite(self.cdev_fd, buf, off) if to_request else os.preadv(self.cdev_fd, [buf], off)
        except OSError as e:
            self.log(f"queue {self.q_id}: tag {tag}: user copy of {nbytes} bytes failed: {e}")
            return -(e.errno or errno.EIO)
        return None if done == nbytes else -errno.EIO

    def _finish(self, tag, res):
        """Commit a request's result; under USER_COPY a READ's data goes to the request first."""
        if self.user_copy and res > 0 and self.desc[tag * 24] == uapi.UBLK_IO_OP_READ:
            res = self._user_copy(tag, res, True) or res
        self._commit(tag, res)

    def _request(self, tag):
        """A request arrived on `tag` and no shortcut applies: ask the target."""
        op_flags, nr_sectors, start_sector, _addr = uapi.IO_DESC.unpack_from(self.desc, tag * 24)
        if self.user_copy and op_flags & 0xFF == uapi.UBLK_IO_OP_WRITE:
            err = self._user_copy(tag, nr_sectors << 9, False)
            if err:
                self._commit(tag, err)
                return
        res = self.target.queue_io(tag, op_flags, nr_sectors, start_sector)
        if res is not None:
            self._finish(tag, res)

    def _slow_cqe(self, ud, res):
        """Every CQE the hot loop does not handle itself; returns 1 if the tag is gone for good."""
        if ud & UCOPY:
            # a USER_COPY SQE of a passthrough chain failed or came up short; the SQEs linked after it
            # (and the commit) were cancelled without CQEs. Copy-out short: the request got `res` bytes.
            out = (ud >> OP_SHIFT) & 0xFF == uapi.UBLK_IO_OP_READ
            self._commit(ud & TAG_MASK, res if out or res < 0 else -errno.EIO)
            return 0
        if ud & TGT_IO:
            # a target SQE completed (for passthrough reads/writes: only when it failed or came up
            # short, and then the SQEs linked after it were cancelled without a CQE)
            tag = ud & TAG_MASK
            res = self.target.io_done(tag, res, ud)
            if res is not None:
                self._finish(tag, res)
            return 0
        if res == 0:
            self._request(ud)
            return 0
        if res == uapi.UBLK_IO_RES_NEED_GET_DATA:
            # a WRITE with NEED_GET_DATA: hand the buffer over, the data arrives with res 0
            slot = self._slot(BANK_OTHER, ud)
            uring.SQE_CMD16.pack_into(self.ring.sqes, slot << 6, uring.IORING_OP_URING_CMD, self.cdev_fd,
                                      self.op_get_data, ud, self.q_id, ud, 0, self.bufs[ud])
            self._push(slot)
            return 0
        if res == -errno.ECANCELED and self.passthrough_fd is not None:
            # a commit linked to a failed read/write (kernels that post it): the read's CQE recommits
            return 0
        if res != uapi.UBLK_IO_RES_ABORT:
            self.log(f"queue {self.q_id}: tag {ud}: command failed: {uring.os_error(-res, 'ublk io cmd')}")
        return 1

    def run(self):
        """Serve until every tag was aborted (device stopped/deleted or daemon going away)."""
        ring = self.ring
        d = self.depth
        enter = uring.enter_raw
        NR_ENTER = uring.NR_io_uring_enter
        GETEVENTS = uring.IORING_ENTER_GETEVENTS
        RETRY = (errno.EINTR, errno.EAGAIN, errno.EBUSY)
        ring_fd = ring.fd
        sq_mask, cq_mask = ring.sq_mask, ring.cq_mask
        sq_entries, cq_entries = ring.sq_entries, ring.cq_entries
        # integer views (see the module doc). CQE slot i: user_data = cq_u64[2i], res = cq_s32[4i + 2].
        # SQE s: off = sqe_u64[8s + 1], len = sqe_u32[16s + 6], ublk result = sqe_s32[16s + 13].
        # Descriptor of tag t: op_flags = desc_u32[6t], nr_sectors = desc_u32[6t + 1],
        # start_sector = desc_u64[3t + 1].
        sq_u32 = _u32_view(ring.sq)
        cq_u32 = _u32_view(ring.cq)
        sq_tail_i, cq_head_i, cq_tail_i = ring.sq_tail_off >> 2, ring.cq_head_off >> 2, ring.cq_tail_off >> 2
        cqes = memoryview(ring.cq)[ring.cqes_off:ring.cqes_off + (ring.cq_entries << 4)]
        cq_u64, cq_s32 = cqes.cast("Q"), cqes.cast("i")
        sqes = memoryview(ring.sqes)
        sqe_u64, sqe_u32, sqe_s32 = sqes.cast("Q"), sqes.cast("I"), sqes.cast("i")
        desc = memoryview(self.desc)[:d * 24]
        desc_u32, desc_u64 = desc.cast("I"), desc.cast("Q")
        sqa = self._sq_array
        complete_inline = self.complete_inline
        passthrough = self.passthrough_fd is not None
        ucopy = self.user_copy
        slow_cqe = self._slow_cqe

        live = d
        tail = ring.sq_tail
        submitted = ring.submitted
        seen = 0
        enters = 0
        while live:
            enters += 1
            sq_u32[sq_tail_i] = tail & 0xFFFFFFFF
            r = enter(NR_ENTER, ring_fd, (tail - submitted) & 0xFFFFFFFF, 1, GETEVENTS, None, 0)
            if r < 0:
                e = uring.get_errno()
                if e not in RETRY:
                    raise uring.os_error(e, f"queue {self.q_id}: io_uring_enter")
            else:
                submitted += r
            # copy the CQ out in two C calls per field (user_data list, res list) and free it at once
            head = cq_u32[cq_head_i]
            n = (cq_u32[cq_tail_i] - head) & 0xFFFFFFFF
            if not n:
                continue
            seen += n
            h = head & cq_mask
            e = h + n
            if e <= cq_entries:
                uds = cq_u64[h << 1:e << 1:2].tolist()
                ress = cq_s32[(h << 2) + 2:e << 2:4].tolist()
            else:
                e -= cq_entries
                uds = cq_u64[h << 1::2].tolist() + cq_u64[:e << 1:2].tolist()
                ress = cq_s32[(h << 2) + 2::4].tolist() + cq_s32[2:e << 2:4].tolist()
            cq_u32[cq_head_i] = (head + n) & 0xFFFFFFFF
            if complete_inline and not any(ress) and max(uds) < d:
                # null, the common batch: every CQE is a new request; set each commit's result,
                # then queue all the commits with one slice store into the SQ index array
                for ud in uds:
                    sqe_s32[ud << 4 | 13] = desc_u32[ud * 6 + 1] << 9
                t = tail & sq_mask
                if t + n <= sq_entries:
                    sqa[t:t + n] = array("I", uds)
                else:
                    sqa[t:] = array("I", uds[:sq_entries - t])
                    sqa[:t + n - sq_entries] = array("I", uds[sq_entries - t:])
                tail += n
                continue
            for ud, res in zip(uds, ress):
                if ud < d and not res:
                    # a new request on tag `ud` (the completion of its FETCH/COMMIT_AND_FETCH)
                    if complete_inline:
                        sqe_s32[ud << 4 | 13] = desc_u32[ud * 6 + 1] << 9
                        sqa[tail & sq_mask] = ud
                        tail += 1
                        continue
                    if passthrough:
                        k = ud * 6
                        op = desc_u32[k] & 0xFF
                        if op < 2:      # READ or WRITE: banks 1 and 2
                            nr = desc_u32[k + 1] << 9
                            s = (op + 1) * d + ud
                            sqe_u64[s << 3 | 1] = desc_u64[(k >> 1) + 1] << 9
                            sqe_u32[s << 4 | 6] = nr
                            sqe_s32[ud << 4 | 13] = nr      # the commit, if the read is complete
                            if ucopy:
                                # copy-in (bank 4) before a WRITE, copy-out (bank 5) after a READ
                                c = (5 - op) * d + ud
                                sqe_u32[c << 4 | 6] = nr
                                sqa[tail & sq_mask] = c if op else s
                                sqa[(tail + 1) & sq_mask] = s if op else c
                                sqa[(tail + 2) & sq_mask] = ud
                                tail += 3
                                continue
                            sqa[tail & sq_mask] = s
                            sqa[(tail + 1) & sq_mask] = ud
                            tail += 2
                            continue
                # everything else (in a method: the state it touches lives on the ring)
                ring.sq_tail = tail
                live -= slow_cqe(ud, res)
                tail = ring.sq_tail
        ring.sq_tail = tail
        ring.submitted = submitted
        self.cqes_seen = seen
        self.enters = enters
