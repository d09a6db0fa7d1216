"""mem: a RAM disk in the server's own memory (the kernel's brd, served from user space).

The data lives in one shared anonymous mapping that the daemon makes before it forks its queue
processes, so every queue reads and writes the same bytes. Requests are served at once with memmove;
DISCARD and WRITE_ZEROES give whole pages back to the kernel (MADV_REMOVE) and zero the edges, so
mkfs's discard of a whole device costs no memory. A page is taken when first touched.

The data lives as long as the daemon: a device recovered after the daemon died starts zeroed, like a
RAM disk after a power cut. Scenarios that check data across a recovery use loop."""
import ctypes
import errno
import mmap
import os

from .. import uapi
from .base import Option, Target, TargetError

DEFAULT_SIZE = 256 << 20
PAGE = mmap.PAGESIZE


class MemTarget(Target):
    name = "mem"
    help = "keeps the data in the server's memory (a RAM disk; gone when the server exits)"
    options = (
        Option("size", "s", "size", DEFAULT_SIZE, "device size in bytes (K/M/G/T suffixes)", "SIZE"),
    )

    @classmethod
    def spec_from_options(cls, values, given):
        size = values["size"] // PAGE * PAGE
        opt = given.get("size", "-s")
        if size < PAGE:
            raise TargetError(f"{opt} {values['size']}: size must be at least {PAGE} bytes")
        ram = os.sysconf("SC_PHYS_PAGES") * PAGE
        if size > ram:
            raise TargetError(f"{opt} {values['size']}: more than this machine's memory ({ram} bytes)")
        return {"name": cls.name, "dev_size": size}

    def params(self, info):
        p = super().params(info)
        p.logical_bs_shift = p.physical_bs_shift = 12   # whole pages: discard can free them
        p.io_min_shift = 12
        p.types |= uapi.UBLK_PARAM_TYPE_DISCARD
        p.discard_granularity = PAGE
        p.max_discard_sectors = p.max_write_zeroes_sectors = min(self.dev_size() >> 9, 0xFFFFFFFF >> 9)
        p.max_discard_segments = 1
        return p

    def open(self, log=None):
        self.mem = mmap.mmap(-1, self.dev_size(), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        # the mapping's address, for memmove; the ctypes view pins it for the server's lifetime
        self._view = ctypes.c_char.from_buffer(self.mem)
        self.base = ctypes.addressof(self._view)

    def queue_io(self, tag, op_flags, nr_sectors, start_sector):
        op, pos, n = op_flags & 0xFF, start_sector << 9, nr_sectors << 9
        if op == uapi.UBLK_IO_OP_READ:
            ctypes.memmove(self.q.bufs[tag], self.base + pos, n)
        elif op == uapi.UBLK_IO_OP_WRITE:
            ctypes.memmove(self.base + pos, self.q.bufs[tag], n)
        elif op in (uapi.UBLK_IO_OP_DISCARD, uapi.UBLK_IO_OP_WRITE_ZEROES):
            self._zero(pos, n)
        elif op != uapi.UBLK_IO_OP_FLUSH:
            return -errno.EOPNOTSUPP
        return n

    def _zero(self, pos, n):
        """Zeroes [pos, pos + n): whole pages go back to the kernel, the partial ones are cleared."""
        first, last = -(-pos // PAGE) * PAGE, (pos + n) // PAGE * PAGE
        if first >= last:
            ctypes.memset(self.base + pos, 0, n)
            return
        ctypes.memset(self.base + pos, 0, first - pos)
        self.mem.madvise(mmap.MADV_REMOVE, first, last - first)
        ctypes.memset(self.base + last, 0, pos + n - last)
