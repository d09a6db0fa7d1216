"""The control device /dev/ublk-control: URING_CMD on a 128-byte-SQE ring, one command at a time."""
import ctypes
import errno
import os
import time

from . import uapi
from .uring import Ring

CTRL_DEV = "/dev/ublk-control"
ENOTSUPP = 524  # kernel-internal "operation not supported" that ublk returns for unknown commands


def errname(err):
    return errno.errorcode.get(err, "ENOTSUPP" if err == ENOTSUPP else str(err))


def strerror(err):
    return "Operation not supported" if err == ENOTSUPP else os.strerror(err)


class UblkError(Exception):
    """A control command the kernel refused: `.cmd` (e.g. "ADD_DEV") and `.errno`."""

    def __init__(self, cmd, err, detail=""):
        self.cmd, self.errno = cmd, err
        msg = f"{cmd} failed: {strerror(err)} ({errname(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class Ctrl:
    def __init__(self, path=CTRL_DEV):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UblkError("open " + path, errno.ENOENT,
                            "is the ublk_drv module loaded? (modprobe ublk_drv)") from None
        except OSError as e:
            raise UblkError("open " + path, e.errno) from None
        self.ring = Ring(4, sqe128=True)
        self._encoded_ok = None   # None: unknown; True: ioctl-encoded opcodes work; False: legacy only
        self._ud = 0

    def close(self):
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- raw command ---------------------------------------------------------------------------
    def _issue(self, op, dev_id, queue_id, addr, length, data0):
        cmd = uapi.CTRL_CMD.pack(dev_id, queue_id, length, addr, data0, 0, 0, 0)
        self._ud += 1
        self.ring.prep_uring_cmd(self.fd, op, cmd, self._ud)
        for ud, res, _flags in self.ring.wait(1):
            if ud == self._ud:
                return res
        raise RuntimeError("control ring: lost completion")

    def command(self, name, dev_id, *, data0=0, buf=None, length=None, queue_id=uapi.UBLK_QUEUE_ID_NONE):
        """Run one control command; return its (non-negative) result or raise UblkError."""
        encoded, legacy = uapi.CTRL_OPS[name]
        addr = ctypes.addressof(buf) if buf is not None else 0
        if length is None:
            length = len(buf) if buf is not None else 0
        if self._encoded_ok is False and legacy is not None:
            res = self._issue(legacy, dev_id, queue_id, addr, length, data0)
        else:
            res = self._issue(encoded, dev_id, queue_id, addr, length, data0)
            # kernels older than 6.4 know only the legacy numbers: fall back once and remember
            if (res in (-errno.EOPNOTSUPP, -ENOTSUPP, -errno.EINVAL) and legacy is not None
                    and self._encoded_ok is None):
                res2 = self._issue(legacy, dev_id, queue_id, addr, length, data0)
                if res2 >= 0:
                    self._encoded_ok = False
                    return res2
            elif res >= 0:
                self._encoded_ok = True
        if res < 0:
            raise UblkError(name, -res)
        return res

    # ---- commands ------------------------------------------------------------------------------
    def get_features(self):
        """UBLK_U_CMD_GET_FEATURES (6.5+); None when the kernel lacks it."""
        buf = ctypes.create_string_buffer(8)
        try:
            self.command("GET_FEATURES", 0, buf=buf)
        except UblkError as e:
            if e.errno in (errno.EOPNOTSUPP, ENOTSUPP, errno.EINVAL, errno.ENODEV):
                return None
            raise
        return int.from_bytes(buf.raw, "little")

    def add_dev(self, info):
        """ADD_DEV; returns the DevInfo the kernel wrote back (negotiated flags, dev id, clamps)."""
        buf = ctypes.create_string_buffer(info.pack(), uapi.DEV_INFO.size)
        self.command("ADD_DEV", info.dev_id, buf=buf, queue_id=uapi.UBLK_QUEUE_ID_NONE)
        return uapi.DevInfo.unpack(buf)

    def del_dev(self, dev_id):
        """DEL_DEV: returns once the last reference (e.g. an opener of /dev/ublkbN) is gone."""
        self.command("DEL_DEV", dev_id)

    def del_dev_async(self, dev_id):
        """DEL_DEV_ASYNC (6.9+): remove the device now; the id is freed at the last close.
        Returns False when the kernel lacks the command."""
        try:
            self.command("DEL_DEV_ASYNC", dev_id)
        except UblkError as e:
            if e.errno in (errno.EOPNOTSUPP, ENOTSUPP, errno.EINVAL):
                return False
            raise
        return True

    def start_dev(self, dev_id, pid):
        self.command("START_DEV", dev_id, data0=pid)

    def stop_dev(self, dev_id):
        self.command("STOP_DEV", dev_id)

    def set_params(self, dev_id, params):
        raw = params.pack()
        buf = ctypes.create_string_buffer(raw, len(raw))
        self.command("SET_PARAMS", dev_id, buf=buf)

    def get_params(self, dev_id):
        buf = ctypes.create_string_buffer(uapi.PARAMS_BUF_SIZE)
        uapi.PARAMS_HDR.pack_into(buf, 0, uapi.PARAMS_BUF_SIZE, 0)
        self.command("GET_PARAMS", dev_id, buf=buf)
        return uapi.Params.unpack(buf.raw)

    def get_dev_info(self, dev_id):
        # GET_DEV_INFO2 would need the char device path in the buffer (it exists for unprivileged
        # devices); we run privileged, so the plain command is enough
        buf = ctypes.create_string_buffer(uapi.DEV_INFO.size)
        self.command("GET_DEV_INFO", dev_id, buf=buf)
        return uapi.DevInfo.unpack(buf)

    def get_queue_affinity(self, dev_id, q_id):
        """CPUs of queue `q_id` (a list of ints)."""
        buf = ctypes.create_string_buffer(128)   # 1024 CPUs
        self.command("GET_QUEUE_AFFINITY", dev_id, buf=buf, data0=q_id)
        raw = int.from_bytes(buf.raw, "little")
        return [cpu for cpu in range(len(buf.raw) * 8) if raw >> cpu & 1]

    def start_user_recovery(self, dev_id):
        self.command("START_USER_RECOVERY", dev_id)

    def end_user_recovery(self, dev_id, pid):
        self.command("END_USER_RECOVERY", dev_id, data0=pid)

    # ---- helpers -------------------------------------------------------------------------------
    def wait_state(self, dev_id, states, timeout):
        """Poll GET_DEV_INFO until the state is in `states`; return the final DevInfo."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get_dev_info(dev_id)
            if info.state in states or time.monotonic() >= deadline:
                return info
            time.sleep(0.1)


def device_ids():
    """Ids of every existing ublk device (from sysfs, else /dev)."""
    ids = set()
    for d, prefix in (("/sys/class/ublk-char", "ublkc"), ("/dev", "ublkc")):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for n in names:
            if n.startswith(prefix) and n[len(prefix):].isdigit():
                ids.add(int(n[len(prefix):]))
    return sorted(ids)
