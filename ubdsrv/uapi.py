"""Constants and structures of include/uapi/linux/ublk_cmd.h (checked against Linux 6.12 and 7.x)."""
import errno
import struct

# ---- ioctl encoding (asm-generic/ioctl.h) -------------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(d, t, nr, size):
    return (d << _IOC_DIRSHIFT) | (ord(t) << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _IOR(t, nr, size):
    return _IOC(_IOC_READ, t, nr, size)


def _IOWR(t, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, t, nr, size)


def ioc_nr(op):
    return op & 0xFF


# ---- structures ---------------------------------------------------------------------------------
#: struct ublksrv_ctrl_cmd: dev_id u32, queue_id u16, len u16, addr u64, data[1] u64, dev_path_len u16,
#: pad u16, reserved u32
CTRL_CMD = struct.Struct("<IHHQQHHI")
#: struct ublksrv_ctrl_dev_info: nr_hw_queues, queue_depth, state, pad0 (u16); max_io_buf_bytes,
#: dev_id (u32); ublksrv_pid s32, pad1 u32; flags u64; ublksrv_flags u64; owner_uid, owner_gid u32;
#: reserved1, reserved2 u64
DEV_INFO = struct.Struct("<HHHHIIiIQQIIQQ")
#: struct ublksrv_io_desc: op_flags u32, nr_sectors u32, start_sector u64, addr u64
IO_DESC = struct.Struct("<IIQQ")
#: struct ublksrv_io_cmd: q_id u16, tag u16, result s32, addr u64
IO_CMD = struct.Struct("<HHiQ")
#: struct ublk_params header: len u32, types u32
PARAMS_HDR = struct.Struct("<II")
#: struct ublk_param_basic: attrs u32; logical_bs_shift, physical_bs_shift, io_opt_shift, io_min_shift u8;
#: max_sectors, chunk_sectors u32; dev_sectors, virt_boundary_mask u64
PARAM_BASIC = struct.Struct("<IBBBBIIQQ")
#: struct ublk_param_discard: discard_alignment, discard_granularity, max_discard_sectors,
#: max_write_zeroes_sectors u32; max_discard_segments, reserved0 u16
PARAM_DISCARD = struct.Struct("<IIIIHH")
#: struct ublk_param_devt: char_major, char_minor, disk_major, disk_minor u32 (read-only)
PARAM_DEVT = struct.Struct("<IIII")
#: struct ublk_param_zoned: max_open_zones, max_active_zones, max_zone_append_sectors u32, reserved[20]
PARAM_ZONED_SIZE = 32

PARAMS_BASIC_OFF = PARAMS_HDR.size                              # 8
PARAMS_DISCARD_OFF = PARAMS_BASIC_OFF + PARAM_BASIC.size         # 40
PARAMS_DEVT_OFF = PARAMS_DISCARD_OFF + PARAM_DISCARD.size        # 60
PARAMS_ZONED_OFF = PARAMS_DEVT_OFF + PARAM_DEVT.size             # 76
#: room for every parameter block any kernel may return (GET_PARAMS clamps to its own size)
PARAMS_BUF_SIZE = 256

UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1
UBLK_PARAM_TYPE_DEVT = 1 << 2
UBLK_PARAM_TYPE_ZONED = 1 << 3

UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3

# ---- control commands ---------------------------------------------------------------------------
UBLK_CMD_GET_QUEUE_AFFINITY = 0x01
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_GET_PARAMS = 0x09
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_GET_DEV_INFO2 = 0x12
UBLK_CMD_GET_FEATURES = 0x13
UBLK_CMD_DEL_DEV_ASYNC = 0x14
UBLK_CMD_UPDATE_SIZE = 0x15
UBLK_CMD_QUIESCE_DEV = 0x16

_C = CTRL_CMD.size
UBLK_U_CMD_GET_QUEUE_AFFINITY = _IOR("u", UBLK_CMD_GET_QUEUE_AFFINITY, _C)
UBLK_U_CMD_GET_DEV_INFO = _IOR("u", UBLK_CMD_GET_DEV_INFO, _C)
UBLK_U_CMD_ADD_DEV = _IOWR("u", UBLK_CMD_ADD_DEV, _C)
UBLK_U_CMD_DEL_DEV = _IOWR("u", UBLK_CMD_DEL_DEV, _C)
UBLK_U_CMD_START_DEV = _IOWR("u", UBLK_CMD_START_DEV, _C)
UBLK_U_CMD_STOP_DEV = _IOWR("u", UBLK_CMD_STOP_DEV, _C)
UBLK_U_CMD_SET_PARAMS = _IOWR("u", UBLK_CMD_SET_PARAMS, _C)
UBLK_U_CMD_GET_PARAMS = _IOR("u", UBLK_CMD_GET_PARAMS, _C)
UBLK_U_CMD_START_USER_RECOVERY = _IOWR("u", UBLK_CMD_START_USER_RECOVERY, _C)
UBLK_U_CMD_END_USER_RECOVERY = _IOWR("u", UBLK_CMD_END_USER_RECOVERY, _C)
UBLK_U_CMD_GET_DEV_INFO2 = _IOR("u", UBLK_CMD_GET_DEV_INFO2, _C)
UBLK_U_CMD_GET_FEATURES = _IOR("u", UBLK_CMD_GET_FEATURES, _C)
UBLK_U_CMD_DEL_DEV_ASYNC = _IOR("u", UBLK_CMD_DEL_DEV_ASYNC, _C)
UBLK_U_CMD_UPDATE_SIZE = _IOWR("u", UBLK_CMD_UPDATE_SIZE, _C)
UBLK_U_CMD_QUIESCE_DEV = _IOWR("u", UBLK_CMD_QUIESCE_DEV, _C)

#: control commands by name: (ioctl-encoded op, legacy op or None)
CTRL_OPS = {
    "GET_QUEUE_AFFINITY": (UBLK_U_CMD_GET_QUEUE_AFFINITY, UBLK_CMD_GET_QUEUE_AFFINITY),
    "GET_DEV_INFO": (UBLK_U_CMD_GET_DEV_INFO, UBLK_CMD_GET_DEV_INFO),
    "ADD_DEV": (UBLK_U_CMD_ADD_DEV, UBLK_CMD_ADD_DEV),
    "DEL_DEV": (UBLK_U_CMD_DEL_DEV, UBLK_CMD_DEL_DEV),
    "START_DEV": (UBLK_U_CMD_START_DEV, UBLK_CMD_START_DEV),
    "STOP_DEV": (UBLK_U_CMD_STOP_DEV, UBLK_CMD_STOP_DEV),
    "SET_PARAMS": (UBLK_U_CMD_SET_PARAMS, UBLK_CMD_SET_PARAMS),
    "GET_PARAMS": (UBLK_U_CMD_GET_PARAMS, UBLK_CMD_GET_PARAMS),
    "START_USER_RECOVERY": (UBLK_U_CMD_START_USER_RECOVERY, UBLK_CMD_START_USER_RECOVERY),
    "END_USER_RECOVERY": (UBLK_U_CMD_END_USER_RECOVERY, UBLK_CMD_END_USER_RECOVERY),
    "GET_DEV_INFO2": (UBLK_U_CMD_GET_DEV_INFO2, UBLK_CMD_GET_DEV_INFO2),
    "GET_FEATURES": (UBLK_U_CMD_GET_FEATURES, None),
    "DEL_DEV_ASYNC": (UBLK_U_CMD_DEL_DEV_ASYNC, None),
    "UPDATE_SIZE": (UBLK_U_CMD_UPDATE_SIZE, None),
    "QUIESCE_DEV": (UBLK_U_CMD_QUIESCE_DEV, None),
}

# ---- IO commands ------------------------------------------------------------------------------
UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
UBLK_IO_NEED_GET_DATA = 0x22
_I = IO_CMD.size
UBLK_U_IO_FETCH_REQ = _IOWR("u", UBLK_IO_FETCH_REQ, _I)
UBLK_U_IO_COMMIT_AND_FETCH_REQ = _IOWR("u", UBLK_IO_COMMIT_AND_FETCH_REQ, _I)
UBLK_U_IO_NEED_GET_DATA = _IOWR("u", UBLK_IO_NEED_GET_DATA, _I)

UBLK_IO_RES_OK = 0
UBLK_IO_RES_NEED_GET_DATA = 1
UBLK_IO_RES_ABORT = -errno.ENODEV

UBLKSRV_CMD_BUF_OFFSET = 0
UBLKSRV_IO_BUF_OFFSET = 0x80000000
# UBLK_F_USER_COPY: pread/pwrite of /dev/ublkcN at UBLKSRV_IO_BUF_OFFSET + (q_id << UBLK_QID_OFF)
# + (tag << UBLK_TAG_OFF) + byte offset reach the request's pages
UBLK_IO_BUF_BITS = 25
UBLK_TAG_OFF = UBLK_IO_BUF_BITS
UBLK_TAG_BITS = 16
UBLK_QID_OFF = UBLK_TAG_OFF + UBLK_TAG_BITS
UBLK_MAX_QUEUE_DEPTH = 4096
UBLK_MAX_NR_QUEUES = 4096
UBLK_MINORS = 1 << 20          # max device id + 1 (UBLK_MAX_UBLKS)
UBLK_DEV_ID_AUTO = 0xFFFFFFFF
UBLK_QUEUE_ID_NONE = 0xFFFF

# ---- IO ops (ublksrv_io_desc.op_flags bits 0-7) --------------------------------------------------
UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_SAME = 4
UBLK_IO_OP_WRITE_ZEROES = 5

UBLK_IO_F_FAILFAST_DEV = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
UBLK_IO_F_META = 1 << 11
UBLK_IO_F_FUA = 1 << 13
UBLK_IO_F_NOUNMAP = 1 << 15
UBLK_IO_F_SWAP = 1 << 16

# ---- device flags -----------------------------------------------------------------------------
UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
UBLK_F_NEED_GET_DATA = 1 << 2
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_UNPRIVILEGED_DEV = 1 << 5
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_F_USER_COPY = 1 << 7
UBLK_F_ZONED = 1 << 8
UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9
UBLK_F_UPDATE_SIZE = 1 << 10
UBLK_F_AUTO_BUF_REG = 1 << 11
UBLK_F_QUIESCE = 1 << 12
UBLK_F_PER_IO_DAEMON = 1 << 13
UBLK_F_BUF_REG_OFF_DAEMON = 1 << 14
# 7.x; bit 15 was claimed by two patch series at once, so it stays unnamed here
UBLK_F_INTEGRITY = 1 << 16
UBLK_F_SAFE_STOP_DEV = 1 << 17

#: every flag by bit, for logs (`ublk list` and `ublk features` use ublksrv's own names, below)
FLAG_NAMES = {
    UBLK_F_SUPPORT_ZERO_COPY: "ZERO_COPY",
    UBLK_F_URING_CMD_COMP_IN_TASK: "URING_CMD_COMP_IN_TASK",
    UBLK_F_NEED_GET_DATA: "NEED_GET_DATA",
    UBLK_F_USER_RECOVERY: "RECOVERY",
    UBLK_F_USER_RECOVERY_REISSUE: "RECOVERY_REISSUE",
    UBLK_F_UNPRIVILEGED_DEV: "UNPRIVILEGED_DEV",
    UBLK_F_CMD_IOCTL_ENCODE: "CMD_IOCTL_ENCODE",
    UBLK_F_USER_COPY: "USER_COPY",
    UBLK_F_ZONED: "ZONED",
    UBLK_F_USER_RECOVERY_FAIL_IO: "RECOVERY_FAIL_IO",
    UBLK_F_UPDATE_SIZE: "UPDATE_SIZE",
    UBLK_F_AUTO_BUF_REG: "AUTO_BUF_REG",
    UBLK_F_QUIESCE: "QUIESCE",
    UBLK_F_PER_IO_DAEMON: "PER_IO_DAEMON",
    UBLK_F_BUF_REG_OFF_DAEMON: "BUF_REG_OFF_DAEMON",
    UBLK_F_INTEGRITY: "INTEGRITY",
    UBLK_F_SAFE_STOP_DEV: "SAFE_STOP_DEV",
}


#: `ublk list`: the flags ublksrv's ublksrv_ctrl_dump (lib/ublksrv_cmd.c) names, in its order (not
#: the bit order); a bit it does not know stays out of the brackets (the hex value has it)
LIST_FLAG_NAMES = (
    (UBLK_F_SUPPORT_ZERO_COPY, "SUPPORT_ZERO_COPY"),
    (UBLK_F_URING_CMD_COMP_IN_TASK, "URING_CMD_COMP_IN_TASK"),
    (UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED_DEV"),
    (UBLK_F_USER_RECOVERY, "RECOVERY"),
    (UBLK_F_USER_RECOVERY_REISSUE, "RECOVERY_REISSUE"),
    (UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (UBLK_F_USER_COPY, "USER_COPY"),
    (UBLK_F_ZONED, "ZONED"),
    (UBLK_F_USER_RECOVERY_FAIL_IO, "RECOVERY_FAIL_IO"),
)

#: `ublk features`: ublksrv's feat_map (targets/ublk.cpp, cmd_dev_get_features), by bit; a bit past
#: its end prints as "unknown"
FEATURE_NAMES = ("ZERO_COPY", "COMP_IN_TASK", "GET_DATA", "USER_RECOVERY", "RECOVERY_REISSUE",
                 "UNPRIVILEGED_DEV", "CMD_IOCTL_ENCODE", "USER_COPY", "ZONED", "RECOVERY_FAIL_IO",
                 "UPDATE_SIZE", "AUTO_ZC")


def flag_names(flags):
    out = []
    for bit in range(64):
        f = 1 << bit
        if flags & f:
            out.append(FLAG_NAMES.get(f, f"BIT{bit}"))
    return out


# ---- device states ----------------------------------------------------------------------------
UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2
UBLK_S_DEV_FAIL_IO = 3
STATE_NAMES = {UBLK_S_DEV_DEAD: "DEAD", UBLK_S_DEV_LIVE: "LIVE", UBLK_S_DEV_QUIESCED: "QUIESCED",
               UBLK_S_DEV_FAIL_IO: "FAIL_IO"}


def state_name(state):
    return STATE_NAMES.get(state, f"UNKNOWN({state})")


def cmd_buf_size_max(page_size=4096):
    """Per-queue stride of the descriptor area in /dev/ublkcN (round_up(4096 * 24, PAGE_SIZE))."""
    return _round_up(UBLK_MAX_QUEUE_DEPTH * IO_DESC.size, page_size)


def cmd_buf_size(depth, page_size=4096):
    return _round_up(depth * IO_DESC.size, page_size)


def cmd_buf_offset(q_id, page_size=4096):
    return UBLKSRV_CMD_BUF_OFFSET + q_id * cmd_buf_size_max(page_size)


def user_copy_offset(q_id, tag):
    """Position in /dev/ublkcN of the first byte of request (q_id, tag) (UBLK_F_USER_COPY)."""
    return UBLKSRV_IO_BUF_OFFSET + (q_id << UBLK_QID_OFF) + (tag << UBLK_TAG_OFF)


def _round_up(v, a):
    return (v + a - 1) // a * a


class DevInfo:
    """struct ublksrv_ctrl_dev_info as a plain object."""

    FIELDS = ("nr_hw_queues", "queue_depth", "state", "max_io_buf_bytes", "dev_id", "ublksrv_pid",
              "flags", "ublksrv_flags", "owner_uid", "owner_gid")

    def __init__(self, **kw):
        # queues, depth and IO size have no default here: the CLI's are the server's only ones
        self.nr_hw_queues = 0
        self.queue_depth = 0
        self.state = 0
        self.max_io_buf_bytes = 0
        self.dev_id = UBLK_DEV_ID_AUTO
        self.ublksrv_pid = 0
        self.flags = 0
        self.ublksrv_flags = 0
        self.owner_uid = 0
        self.owner_gid = 0
        for k, v in kw.items():
            if k not in self.FIELDS:
                raise TypeError(k)
            setattr(self, k, v)

    def pack(self):
        return DEV_INFO.pack(self.nr_hw_queues, self.queue_depth, self.state, 0, self.max_io_buf_bytes,
                             self.dev_id, self.ublksrv_pid, 0, self.flags, self.ublksrv_flags,
                             self.owner_uid, self.owner_gid, 0, 0)

    @classmethod
    def unpack(cls, buf):
        (q, d, st, _p0, mx, dev_id, pid, _p1, flags, sflags, uid, gid, _r1, _r2) = DEV_INFO.unpack_from(buf)
        return cls(nr_hw_queues=q, queue_depth=d, state=st, max_io_buf_bytes=mx, dev_id=dev_id,
                   ublksrv_pid=pid, flags=flags, ublksrv_flags=sflags, owner_uid=uid, owner_gid=gid)

    def __repr__(self):
        return "DevInfo(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.FIELDS) + ")"


class Params:
    """struct ublk_params (basic, discard, devt) as a plain object."""

    def __init__(self):
        self.len = 0          # as GET_PARAMS returned it (pack() computes its own)
        self.types = 0
        # basic
        self.attrs = 0
        self.logical_bs_shift = 9
        self.physical_bs_shift = 12
        self.io_opt_shift = 12
        self.io_min_shift = 9
        self.max_sectors = 0
        self.chunk_sectors = 0
        self.dev_sectors = 0
        self.virt_boundary_mask = 0
        # discard
        self.discard_alignment = 0
        self.discard_granularity = 0
        self.max_discard_sectors = 0
        self.max_write_zeroes_sectors = 0
        self.max_discard_segments = 0
        # devt (read-only)
        self.char_major = self.char_minor = self.disk_major = self.disk_minor = 0

    def pack(self):
        """Bytes for SET_PARAMS: header + basic (+ discard); `len` covers what is filled."""
        length = PARAMS_DISCARD_OFF
        if self.types & UBLK_PARAM_TYPE_DISCARD:
            length = PARAMS_DEVT_OFF
        buf = bytearray(length)
        PARAMS_HDR.pack_into(buf, 0, length, self.types & (UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD))
        PARAM_BASIC.pack_into(buf, PARAMS_BASIC_OFF, self.attrs, self.logical_bs_shift,
                              self.physical_bs_shift, self.io_opt_shift, self.io_min_shift,
                              self.max_sectors, self.chunk_sectors, self.dev_sectors,
                              self.virt_boundary_mask)
        if self.types & UBLK_PARAM_TYPE_DISCARD:
            PARAM_DISCARD.pack_into(buf, PARAMS_DISCARD_OFF, self.discard_alignment,
                                    self.discard_granularity, self.max_discard_sectors,
                                    self.max_write_zeroes_sectors, self.max_discard_segments, 0)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf):
        p = cls()
        p.len, p.types = PARAMS_HDR.unpack_from(buf)
        if p.types & UBLK_PARAM_TYPE_BASIC:
            (p.attrs, p.logical_bs_shift, p.physical_bs_shift, p.io_opt_shift, p.io_min_shift,
             p.max_sectors, p.chunk_sectors, p.dev_sectors, p.virt_boundary_mask) = \
                PARAM_BASIC.unpack_from(buf, PARAMS_BASIC_OFF)
        if p.types & UBLK_PARAM_TYPE_DISCARD:
            (p.discard_alignment, p.discard_granularity, p.max_discard_sectors,
             p.max_write_zeroes_sectors, p.max_discard_segments, _r) = \
                PARAM_DISCARD.unpack_from(buf, PARAMS_DISCARD_OFF)
        if p.types & UBLK_PARAM_TYPE_DEVT and len(buf) >= PARAMS_ZONED_OFF:
            p.char_major, p.char_minor, p.disk_major, p.disk_minor = \
                PARAM_DEVT.unpack_from(buf, PARAMS_DEVT_OFF)
        return p
