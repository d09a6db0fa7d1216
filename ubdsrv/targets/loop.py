"""loop: a backing file (or block device); every operation goes through the queue's io_uring.

READ/WRITE -> IORING_OP_READ/WRITE at the same offset (O_DIRECT unless --buffered_io), FLUSH ->
FSYNC(DATASYNC), DISCARD -> FALLOCATE(PUNCH_HOLE|KEEP_SIZE), WRITE_ZEROES -> FALLOCATE(ZERO_RANGE).
READ/WRITE normally never reach queue_io: `passthrough_fd` lets the queue issue them itself."""
import errno
import os
import stat

from .. import uapi
from ..uring import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, IORING_FSYNC_DATASYNC,
                     IORING_OP_FALLOCATE, IORING_OP_FSYNC, IORING_OP_READ)
from .base import QUEUED, Target, TargetError

_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _backing_size(path):
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    raise TargetError(f"-f {path}: not a regular file or block device")


class LoopTarget(Target):
    name = "loop"
    type_id = 1

    @classmethod
    def spec_from_args(cls, args):
        if not args.file:
            raise TargetError("-f FILE is required for the loop target")
        path = os.path.abspath(args.file)
        try:
            size = _backing_size(path)
        except FileNotFoundError:
            raise TargetError(f"-f {args.file}: no such file") from None
        except PermissionError:
            raise TargetError(f"-f {args.file}: permission denied") from None
        size = size // 512 * 512
        if size == 0:
            raise TargetError(f"-f {args.file}: backing file is smaller than 512 bytes")
        return {"name": cls.name, "backing_file": path, "dev_size": size,
                "direct_io": not args.buffered_io}

    def params(self, info):
        p = super().params(info)
        p.types |= uapi.UBLK_PARAM_TYPE_DISCARD
        p.attrs = uapi.UBLK_ATTR_VOLATILE_CACHE   # so FLUSH reaches us and becomes fdatasync
        p.discard_granularity = 4096
        p.max_discard_sectors = 0xFFFFFFFF >> 9
        p.max_write_zeroes_sectors = 0xFFFFFFFF >> 9
        p.max_discard_segments = 1
        return p

    def describe(self):
        return {"name": self.name, "type": self.type_id, "dev_size": self.dev_size(),
                "backing_file": self.spec["backing_file"]}

    def open(self, log=None):
        path = self.spec["backing_file"]
        flags = os.O_RDWR | os.O_CLOEXEC
        self.direct = bool(self.spec.get("direct_io", True))
        self.fd = -1
        if self.direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                if log:
                    log(f"loop: {path} does not support O_DIRECT; using buffered IO")
                self.direct = False
        if self.fd < 0:
            self.fd = os.open(path, flags)
        self.passthrough_fd = self.fd

    def close(self):
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1
        self.passthrough_fd = None

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        op = op_flags & 0xFF
        prep = self.q.prep_target
        if op <= uapi.UBLK_IO_OP_WRITE:   # READ 0 -> IORING_OP_READ 22, WRITE 1 -> IORING_OP_WRITE 23
            prep(tag, op, IORING_OP_READ + op, self.fd, start_sector << 9, self.q.bufs[tag], nr_sectors << 9)
        elif op == uapi.UBLK_IO_OP_FLUSH:
            prep(tag, op, IORING_OP_FSYNC, self.fd, op_flags=IORING_FSYNC_DATASYNC)
        elif op == uapi.UBLK_IO_OP_DISCARD or op == uapi.UBLK_IO_OP_WRITE_ZEROES:
            mode = _PUNCH if op == uapi.UBLK_IO_OP_DISCARD else FALLOC_FL_ZERO_RANGE
            # fallocate: sqe->off = offset, sqe->addr = length, sqe->len = mode
            prep(tag, op, IORING_OP_FALLOCATE, self.fd, start_sector << 9, nr_sectors << 9, mode)
        else:
            return -errno.EOPNOTSUPP
        return QUEUED

    # io_done: the CQE's res is the request's result (bytes, 0, or -errno); the base class returns it
