"""loop: a backing file (or block device); every operation goes through the queue's io_uring.

READ/WRITE -> IORING_OP_READ/WRITE at the same offset (O_DIRECT unless --buffered_io), FLUSH ->
FSYNC(DATASYNC), DISCARD -> FALLOCATE(PUNCH_HOLE) on a file, BLKDISCARD on a block device,
WRITE_ZEROES -> FALLOCATE(ZERO_RANGE). READ/WRITE normally never reach queue_io: `passthrough_fd`
lets the queue issue them itself. A request the backing store answers with -EAGAIN is issued again.

The device's logical block size is what direct IO on the backing store needs (statx STATX_DIOALIGN on
a file, BLKSSZGET/BLKPBSZGET on a block device): O_DIRECT works on 4K-native storage, 512-byte storage
keeps 512. Discard is advertised only when the backing store can do it. All of it is probed once, by
`ublk add`, and kept in the spec, so `recover` and `list -v` see the same geometry."""
import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct

from .. import uapi
from ..uring import (FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, IORING_FSYNC_DATASYNC,
                     IORING_OP_FALLOCATE, IORING_OP_FSYNC, IORING_OP_READ)
from .base import QUEUED, Option, Target, TargetError

_PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_ZERO = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE

# linux/fs.h block device ioctls
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277

# statx(2)
STATX_DIOALIGN = 0x2000
_STATX_SIZE = 256
_STX_MASK, _STX_DIO_OFFSET_ALIGN = 0, 156
AT_FDCWD = -100

PAGE = 4096
BUFFERED_LBS, BUFFERED_PBS = 512, 4096   # what ublksrv gives a buffered loop (any image fits)

_libc = ctypes.CDLL(None, use_errno=True)


def _statx_dio_align(path):
    """stx_dio_offset_align of `path` (0: no direct IO), or None when the kernel (before 6.1) or the
    filesystem does not report it."""
    fn = getattr(_libc, "statx", None)
    if fn is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    if fn(AT_FDCWD, os.fsencode(path), 0, STATX_DIOALIGN, buf) != 0:
        return None
    mask, = struct.unpack_from("<I", buf, _STX_MASK)
    if not mask & STATX_DIOALIGN:
        return None
    return struct.unpack_from("<I", buf, _STX_DIO_OFFSET_ALIGN)[0]


def _probe_dio_align(path):
    """Without statx's answer: the smallest of 512 and 4096 that an O_DIRECT read accepts (0: none)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return 0
    buf = mmap.mmap(-1, PAGE)          # page-aligned
    try:
        for size in (512, PAGE):
            try:
                os.preadv(fd, [memoryview(buf)[:size]], 0)
                return size
            except OSError as e:
                if e.errno != errno.EINVAL:
                    return size
        return 0
    finally:
        buf.close()
        os.close(fd)


def _can_punch(fd, size):
    """Whether the file's filesystem punches holes: a punch past the end of the file (which changes
    nothing) answers EOPNOTSUPP where it cannot."""
    fn = _libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    off = (size + PAGE - 1) // PAGE * PAGE + PAGE
    return fn(fd, _PUNCH, off, PAGE) == 0


def _bdev_queue_dir(st):
    """/sys/.../queue of a block device (a partition's is its disk's)."""
    d = os.path.realpath(f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    if os.path.exists(os.path.join(d, "partition")):
        d = os.path.dirname(d)
    return os.path.join(d, "queue")


def _read_int(path, default=0):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _ioctl_u32(fd, req):
    return struct.unpack("I", fcntl.ioctl(fd, req, b"\0" * 4))[0]


def backing_geometry(path, direct):
    """What the device built on `path` can offer: size (bytes), logical and physical block size,
    whether direct IO works, discard (and its granularity), whether it is a block device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            lbs, pbs = _ioctl_u32(fd, BLKSSZGET), _ioctl_u32(fd, BLKPBSZGET)
        finally:
            os.close(fd)
        queue = _bdev_queue_dir(st)
        discard = _read_int(os.path.join(queue, "discard_max_bytes")) > 0
        return {"size": size, "lbs": lbs, "pbs": max(pbs, lbs), "direct": direct, "block_device": True,
                "discard": discard,
                "discard_granularity": max(_read_int(os.path.join(queue, "discard_granularity")), lbs)}
    if not stat.S_ISREG(st.st_mode):
        raise TargetError(f"-f {path}: not a regular file or block device")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        discard = _can_punch(fd, st.st_size)
    finally:
        os.close(fd)
    lbs = 0
    if direct:
        lbs = _statx_dio_align(path)
        if lbs is None:
            lbs = _probe_dio_align(path)
    return {"size": st.st_size, "lbs": lbs, "pbs": max(lbs, PAGE), "direct": direct and lbs > 0,
            "block_device": False, "discard": discard, "discard_granularity": max(lbs, PAGE)}


def _shift(n):
    return n.bit_length() - 1


class LoopTarget(Target):
    name = "loop"
    help = "reads and writes a backing file or block device"
    options = (
        Option("file", "f", "path", None, "backing file or block device (required)", "FILE"),
        Option("buffered_io", "", "flag", False, "page-cache IO instead of O_DIRECT"),
        Option("offset", "o", "int", 0, "skip the first NUM 512-byte sectors of the backing store",
               "NUM"),
    )

    @classmethod
    def spec_from_options(cls, values, given):
        if not values["file"]:
            raise TargetError("-f FILE is required for the loop target")
        f = values["file"]
        path = os.path.abspath(f)
        try:
            geo = backing_geometry(path, direct=not values["buffered_io"])
        except FileNotFoundError:
            raise TargetError(f"-f {f}: no such file") from None
        except PermissionError:
            raise TargetError(f"-f {f}: permission denied (the loop target opens it read-write)") from None
        except OSError as e:
            raise TargetError(f"-f {f}: {e.strerror}") from None
        lbs, pbs, direct = geo["lbs"], geo["pbs"], geo["direct"]
        if direct and not (512 <= lbs <= PAGE and lbs & (lbs - 1) == 0):
            direct = False      # no direct IO, or one ublk cannot map (blocks beyond a page)
        if not direct:
            lbs, pbs = BUFFERED_LBS, BUFFERED_PBS
        offset = values["offset"]
        opt = given.get("offset", "--offset")
        if offset < 0:
            raise TargetError(f"{opt} {offset}: expected a sector count >= 0")
        off_bytes = offset << 9
        if off_bytes and off_bytes >= geo["size"]:
            raise TargetError(f"{opt} {offset}: at or past the end of -f {f} ({geo['size']} bytes)")
        if direct and off_bytes % lbs:
            raise TargetError(f"{opt} {offset}: direct IO on -f {f} needs an offset in whole "
                              f"{lbs}-byte blocks (a multiple of {lbs >> 9} sectors)")
        size = (geo["size"] - off_bytes) // lbs * lbs
        if size == 0:
            raise TargetError(f"-f {f}: backing file is smaller than {max(lbs, 512)} bytes")
        return {"name": cls.name, "backing_file": path, "dev_size": size, "direct_io": int(direct),
                "offset": offset, "logical_block_size": lbs, "physical_block_size": pbs,
                "block_device": geo["block_device"], "discard": geo["discard"],
                "discard_granularity": geo["discard_granularity"]}

    def params(self, info):
        p = super().params(info)
        s = self.spec
        p.logical_bs_shift = _shift(s["logical_block_size"])
        p.physical_bs_shift = _shift(s["physical_block_size"])
        p.io_min_shift = p.logical_bs_shift
        p.attrs = uapi.UBLK_ATTR_VOLATILE_CACHE   # so FLUSH reaches us and becomes fdatasync
        if s["discard"]:
            p.types |= uapi.UBLK_PARAM_TYPE_DISCARD
            p.discard_granularity = s["discard_granularity"]
            p.max_discard_sectors = 0xFFFFFFFF >> 9
            p.max_write_zeroes_sectors = 0xFFFFFFFF >> 9
            p.max_discard_segments = 1
        return p

    def describe(self):
        s = self.spec
        return {"name": self.name, "type": 0, "dev_size": self.dev_size(), "backing_file": s["backing_file"],
                "direct_io": s["direct_io"], "offset": s["offset"]}

    def open(self, log=None):
        path = self.spec["backing_file"]
        flags = os.O_RDWR | os.O_CLOEXEC
        self.direct = bool(self.spec["direct_io"])
        self.off = self.spec["offset"] << 9
        self.block_device = self.spec["block_device"]
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
        # the queue's shortcut reads and writes at the request's own offset
        self.passthrough_fd = self.fd if not self.off else None

    def close(self):
        if getattr(self, "fd", -1) >= 0:
            try:
                os.fsync(self.fd)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1
        self.passthrough_fd = None

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        op = op_flags & 0xFF
        prep = self.q.prep_target
        pos = (start_sector << 9) + self.off
        if op <= uapi.UBLK_IO_OP_WRITE:   # READ 0 -> IORING_OP_READ 22, WRITE 1 -> IORING_OP_WRITE 23
            prep(tag, op, IORING_OP_READ + op, self.fd, pos, self.q.bufs[tag], nr_sectors << 9)
        elif op == uapi.UBLK_IO_OP_FLUSH:
            prep(tag, op, IORING_OP_FSYNC, self.fd, op_flags=IORING_FSYNC_DATASYNC)
        elif op == uapi.UBLK_IO_OP_DISCARD and self.block_device:
            # no io_uring discard before 6.12's BLOCK_URING_CMD_DISCARD: synchronous, as ublksrv does
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", pos, nr_sectors << 9))
            except OSError as e:
                return -e.errno
            return nr_sectors << 9
        elif op == uapi.UBLK_IO_OP_DISCARD or op == uapi.UBLK_IO_OP_WRITE_ZEROES:
            mode = _PUNCH if op == uapi.UBLK_IO_OP_DISCARD else _ZERO
            # fallocate: sqe->off = offset, sqe->addr = length, sqe->len = mode
            prep(tag, op, IORING_OP_FALLOCATE, self.fd, pos, nr_sectors << 9, mode)
        else:
            return -errno.EOPNOTSUPP
        return QUEUED

    def io_done(self, tag, res, user_data):
        if res == -errno.EAGAIN:
            return self.queue_io(tag, *self.request(tag))
        return res
