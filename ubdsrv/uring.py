"""A minimal io_uring: setup/enter through syscall(2), rings and SQEs mmapped, fields written with
precompiled `struct.Struct` objects (no per-IO allocation).

Layout facts (include/uapi/linux/io_uring.h): a 64-byte SQE is
    0 opcode u8 | 1 flags u8 | 2 ioprio u16 | 4 fd s32 | 8 off/addr2 u64 (cmd_op u32 + pad u32 for
    URING_CMD) | 16 addr u64 | 24 len u32 | 28 op flags u32 (rw/fsync/uring_cmd flags) | 32 user_data u64 |
    40 buf_index u16 | 42 personality u16 | 44 splice_fd_in s32 | 48 addr3 u64 / cmd[] | 56 pad u64
With IORING_SETUP_SQE128 each entry is 128 bytes and URING_CMD's command area is bytes 48..127 (80 B);
in a 64-byte SQE it is bytes 48..63 (16 B). A CQE is user_data u64, res s32, flags u32 (16 B).

Memory ordering: the kernel publishes CQ tail / consumes SQ head with acquire/release semantics. On
x86-64 (TSO) those are plain loads and stores plus compiler barriers; every `pack_into`/`unpack_from` on
the mmap is a complete C-level copy finished before the next Python bytecode runs, so our stores reach
memory in program order (SQE body before the SQ tail; CQE read before the CQ head moves) without explicit
fences. On weakly ordered CPUs (arm64) this would need real barriers.
"""
import ctypes
import errno
import mmap
import os
import struct

# x86-64 (and every arch using the generic syscall table)
NR_io_uring_setup = 425
NR_io_uring_enter = 426
NR_io_uring_register = 427

# setup flags
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_SUBMIT_ALL = 1 << 7
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

IORING_ENTER_GETEVENTS = 1 << 0

# opcodes
IORING_OP_NOP = 0
IORING_OP_FSYNC = 3
IORING_OP_TIMEOUT = 11
IORING_OP_FALLOCATE = 17
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_OP_URING_CMD = 46

IORING_FSYNC_DATASYNC = 1 << 0

# sqe->flags
IOSQE_FIXED_FILE = 1 << 0
IOSQE_IO_DRAIN = 1 << 1
IOSQE_IO_LINK = 1 << 2
IOSQE_CQE_SKIP_SUCCESS = 1 << 6   # 5.17+; a failed request posts its CQE and suppresses its links' CQEs

# fallocate modes (linux/falloc.h)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# io_uring_params: 10 x u32 then sq_off (10 x u32 with a trailing u64) and cq_off (same shape)
_PARAMS = struct.Struct("<IIIIII I 3I  IIIIIII I Q  IIIIIII I Q")
assert _PARAMS.size == 120

# SQE field writers. 'x' pad bytes are written as zero, so one pack_into clears a reused slot fully.
#: generic 64-byte SQE: opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data (rest zeroed)
SQE = struct.Struct("<BBHiQQIIQ24x")
#: URING_CMD with a 16-byte ublk io command in a 64-byte SQE:
#: opcode, fd, cmd_op, user_data, then cmd: q_id u16, tag u16, result s32, addr u64
SQE_CMD16 = struct.Struct("<B3xiI20xQ8xHHiQ")
#: URING_CMD header for SQE128 rings: opcode, fd, cmd_op, user_data, then an 80-byte command area
SQE_CMD80 = struct.Struct("<B3xiI20xQ8x80s")
assert SQE.size == 64 and SQE_CMD16.size == 64 and SQE_CMD80.size == 128

CQE = struct.Struct("<QiI")
U32 = struct.Struct("<I")
I32 = struct.Struct("<i")

_libc = ctypes.CDLL(None, use_errno=True)
_setup = _libc["syscall"]
_setup.restype = ctypes.c_long
_setup.argtypes = (ctypes.c_long, ctypes.c_uint, ctypes.c_void_p)
_enter = _libc["syscall"]
_enter.restype = ctypes.c_long
_enter.argtypes = (ctypes.c_long, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                   ctypes.c_void_p, ctypes.c_size_t)
#: the same syscall without argtypes, for hot loops: ctypes converts each argument from its Python
#: type (int -> C int, sign-extended to 64 bits by libffi on x86-64; None -> NULL), which costs half
#: of what the argtypes checks do. Every argument must be a small int or None.
enter_raw = _libc["syscall"]
enter_raw.restype = ctypes.c_long
get_errno = ctypes.get_errno


def _mmap(fd, length, offset, prot=mmap.PROT_READ | mmap.PROT_WRITE, populate=True):
    flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
    try:  # 3.13+: do not dup() the fd behind our back
        return mmap.mmap(fd, length, flags, prot, offset=offset, trackfd=False)
    except TypeError:
        return mmap.mmap(fd, length, flags, prot, offset=offset)


def os_error(err, what):
    return OSError(err, f"{what}: {os.strerror(err)} ({errno.errorcode.get(err, err)})")


class Ring:
    """One io_uring instance. `sq_tail` is the free-running index of the next SQE to fill; SQEs filled
    since the last `enter` are handed to the kernel by `flush()` / `submit()`.

    Hot loops may read the public attributes (`sqes`, `sqe_shift`, `sq_mask`, `cq`, `cq_head_off`,
    `cq_tail_off`, `cqes_off`, `cq_mask`, `fd`) and bind them to locals. The SQ index array starts
    identity-mapped (slot i -> SQE i); a user that writes it (`sq_array_off`) owns SQE placement and
    must not mix in `prep*`/`next_sqe`."""

    __slots__ = ("fd", "flags", "features", "sq_entries", "cq_entries", "sqe_size", "sqe_shift",
                 "sq_mask", "cq_mask", "sq", "cq", "sqes", "sq_head_off", "sq_tail_off", "sq_array_off",
                 "cq_head_off", "cq_tail_off", "cqes_off", "sq_tail", "submitted", "_maps")

    def __init__(self, entries, *, sqe128=False, flags=0, cq_entries=0):
        if sqe128:
            flags |= IORING_SETUP_SQE128
        if cq_entries:
            flags |= IORING_SETUP_CQSIZE
        params = ctypes.create_string_buffer(_PARAMS.size)
        # only flags and (optionally) cq_entries are inputs
        struct.pack_into("<II", params, 4, cq_entries, flags)
        fd = _setup(NR_io_uring_setup, entries, ctypes.addressof(params))
        if fd < 0:
            raise os_error(get_errno(), "io_uring_setup")
        self.fd = fd
        self._maps = []
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise

    def _map(self, params):
        p = _PARAMS.unpack_from(params)
        (sq_entries, cq_entries, flags, _cpu, _idle, features, _wq, _r0, _r1, _r2,
         sq_head, sq_tail, sq_mask_off, _sq_ring_entries, _sq_flags, _dropped, sq_array, _sr1, _sua,
         cq_head, cq_tail, cq_mask_off, _cq_ring_entries, _overflow, cqes, _cq_flags, _cr1, _cua) = p
        self.flags, self.features = flags, features
        self.sq_entries, self.cq_entries = sq_entries, cq_entries
        self.sqe_size = 128 if flags & IORING_SETUP_SQE128 else 64
        self.sqe_shift = 7 if self.sqe_size == 128 else 6
        cqe_size = 32 if flags & IORING_SETUP_CQE32 else 16
        sq_sz = sq_array + sq_entries * 4
        cq_sz = cqes + cq_entries * cqe_size
        if features & IORING_FEAT_SINGLE_MMAP:
            self.sq = self.cq = _mmap(self.fd, max(sq_sz, cq_sz), IORING_OFF_SQ_RING)
            self._maps.append(self.sq)
        else:
            self.sq = _mmap(self.fd, sq_sz, IORING_OFF_SQ_RING)
            self._maps.append(self.sq)
            self.cq = _mmap(self.fd, cq_sz, IORING_OFF_CQ_RING)
            self._maps.append(self.cq)
        self.sqes = _mmap(self.fd, sq_entries * self.sqe_size, IORING_OFF_SQES)
        self._maps.append(self.sqes)
        self.sq_head_off, self.sq_tail_off, self.sq_array_off = sq_head, sq_tail, sq_array
        self.cq_head_off, self.cq_tail_off, self.cqes_off = cq_head, cq_tail, cqes
        self.sq_mask = U32.unpack_from(self.sq, sq_mask_off)[0]
        self.cq_mask = U32.unpack_from(self.cq, cq_mask_off)[0]
        # identity-map the SQ index array once: slot i always holds SQE i, so submitting never
        # touches the array again
        struct.pack_into(f"<{sq_entries}I", self.sq, sq_array, *range(sq_entries))
        self.sq_tail = U32.unpack_from(self.sq, sq_tail)[0]
        self.submitted = self.sq_tail

    # ---- SQ side -------------------------------------------------------------------------------
    def space(self):
        """Free SQ slots (kernel head vs our tail)."""
        head = U32.unpack_from(self.sq, self.sq_head_off)[0]
        return self.sq_entries - ((self.sq_tail - head) & 0xFFFFFFFF)

    def next_sqe(self):
        """Offset (in `sqes`) of the next free SQE; submits first if the SQ is full."""
        if self.space() <= 0:
            self.submit()
            if self.space() <= 0:
                raise os_error(errno.EBUSY, "io_uring SQ full")
        off = (self.sq_tail & self.sq_mask) << self.sqe_shift
        self.sq_tail += 1
        return off

    def prep(self, opcode, fd, off=0, addr=0, length=0, op_flags=0, user_data=0, sqe_flags=0):
        off_ = self.next_sqe()
        SQE.pack_into(self.sqes, off_, opcode, sqe_flags, 0, fd, off, addr, length, op_flags, user_data)
        if self.sqe_size == 128:
            self.sqes[off_ + 64:off_ + 128] = bytes(64)

    def prep_nop(self, user_data):
        self.prep(IORING_OP_NOP, -1, user_data=user_data)

    def prep_read(self, fd, addr, length, offset, user_data):
        self.prep(IORING_OP_READ, fd, offset, addr, length, 0, user_data)

    def prep_write(self, fd, addr, length, offset, user_data):
        self.prep(IORING_OP_WRITE, fd, offset, addr, length, 0, user_data)

    def prep_fsync(self, fd, user_data, datasync=False):
        self.prep(IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC if datasync else 0, user_data)

    def prep_fallocate(self, fd, mode, offset, length, user_data):
        # io_fallocate_prep: sqe->off = offset, sqe->addr = length, sqe->len = mode
        self.prep(IORING_OP_FALLOCATE, fd, offset, length, mode, 0, user_data)

    def prep_uring_cmd(self, fd, cmd_op, cmd, user_data):
        """URING_CMD with an arbitrary command payload (<= 16 bytes, or <= 80 with SQE128)."""
        off = self.next_sqe()
        if self.sqe_size == 128:
            if len(cmd) > 80:
                raise ValueError("uring_cmd payload larger than 80 bytes")
            SQE_CMD80.pack_into(self.sqes, off, IORING_OP_URING_CMD, fd, cmd_op, user_data, cmd)
        else:
            if len(cmd) > 16:
                raise ValueError("uring_cmd payload larger than 16 bytes (use SQE128)")
            SQE.pack_into(self.sqes, off, IORING_OP_URING_CMD, 0, 0, fd, cmd_op, 0, 0, 0, user_data)
            self.sqes[off + 48:off + 48 + len(cmd)] = cmd

    def flush(self):
        """Publish the filled SQEs (write the SQ tail); return how many are pending submission."""
        U32.pack_into(self.sq, self.sq_tail_off, self.sq_tail & 0xFFFFFFFF)
        return (self.sq_tail - self.submitted) & 0xFFFFFFFF

    def enter(self, to_submit, min_complete=0, flags=0):
        """io_uring_enter; returns SQEs consumed. EINTR comes back as 0 (caller loops)."""
        if min_complete:
            flags |= IORING_ENTER_GETEVENTS
        r = _enter(NR_io_uring_enter, self.fd, to_submit, min_complete, flags, None, 0)
        if r < 0:
            e = get_errno()
            if e == errno.EINTR:
                return 0
            raise os_error(e, "io_uring_enter")
        self.submitted += r
        return r

    def submit(self, wait_nr=0):
        """Submit everything prepared; optionally wait for `wait_nr` completions."""
        n = self.flush()
        done = 0
        while True:
            r = self.enter(n - done, wait_nr, 0)
            done += r
            if done >= n:
                return done
            wait_nr = 0

    # ---- CQ side -------------------------------------------------------------------------------
    def cq_ready(self):
        return (U32.unpack_from(self.cq, self.cq_tail_off)[0]
                - U32.unpack_from(self.cq, self.cq_head_off)[0]) & 0xFFFFFFFF

    def reap(self, out=None):
        """Consume every available CQE; return a list of (user_data, res, flags). Not for hot paths."""
        cq = self.cq
        head = U32.unpack_from(cq, self.cq_head_off)[0]
        tail = U32.unpack_from(cq, self.cq_tail_off)[0]
        n = (tail - head) & 0xFFFFFFFF
        res = [] if out is None else out
        base, mask = self.cqes_off, self.cq_mask
        for i in range(head, head + n):
            res.append(CQE.unpack_from(cq, base + ((i & mask) << 4)))
        U32.pack_into(cq, self.cq_head_off, (head + n) & 0xFFFFFFFF)
        return res

    def wait(self, nr):
        """Reap until `nr` CQEs were collected (submitting anything prepared first)."""
        got = self.reap()
        pending = self.flush()
        while len(got) < nr or pending:
            r = self.enter(pending, nr - len(got) if len(got) < nr else 0, 0)
            pending -= r
            self.reap(got)
        return got

    def close(self):
        for m in self._maps:
            try:
                m.close()
            except (BufferError, ValueError):
                pass
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
