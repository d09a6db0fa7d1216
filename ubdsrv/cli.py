"""`ublk`-compatible command line: add, del, list, recover, features.

Exit status: 0 success, 1 the kernel or the daemon refused (message names the command and errno),
2 bad arguments (message names the option)."""
import argparse
import errno
import json
import os
import signal
import sys
import time

from . import daemon, targets, uapi
from .ctrl import Ctrl, UblkError, device_ids
from .log import Log

PROG = "ublk"
DEFAULT_QUEUES = 1
DEFAULT_DEPTH = 128
DEFAULT_MAX_IO = 512 << 10
LIVE_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
RECOVERY_TIMEOUT = 60.0
RELEASE_TIMEOUT = 3.0


class CliError(Exception):
    """Fails the command with exit status `status` and the message as the one line printed."""

    def __init__(self, msg, status=1):
        super().__init__(msg)
        self.status = status


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(f"{self.prog}: {message}", 2)


def _int_range(lo, hi, what):
    def conv(s):
        try:
            v = int(s, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, not {s!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, not {v}")
        return v
    return conv


def _bool01(s):
    if s not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"must be 0 or 1, not {s!r}")
    return s == "1"


_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(s):
    t = s.strip().lower()
    if t.endswith("ib"):
        t = t[:-2]
    num = t.rstrip("kmgtb")
    suf = t[len(num):]
    try:
        v = int(num, 0) * _SUFFIX[suf]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"invalid size {s!r} (e.g. 1073741824, 512M, 10G)") from None
    return v


def _dev_id(s):
    v = _int_range(-1, uapi.UBLK_MINORS - 1, "device id")(s)
    return None if v == -1 else v


def build_parser():
    p = _Parser(prog=PROG, description="Python ubd (ublk) server, compatible with ublksrv's `ublk`.")
    sub = p.add_subparsers(dest="cmd", metavar="{add,del,list,recover,features}", parser_class=_Parser)
    sub.required = True

    a = sub.add_parser("add", help="create a device and start its server in the background")
    a.add_argument("-t", "--type", required=True, help="target: " + ", ".join(sorted(targets.TARGETS)))
    a.add_argument("-n", "--number", type=_dev_id, default=None, help="device id (default: any)")
    a.add_argument("-q", "--queues", type=_int_range(1, uapi.UBLK_MAX_NR_QUEUES, "queue count"),
                   default=DEFAULT_QUEUES, help="number of queues (the kernel caps it at the CPU count)")
    a.add_argument("-d", "--depth", type=_int_range(1, uapi.UBLK_MAX_QUEUE_DEPTH, "queue depth"),
                   default=DEFAULT_DEPTH, help="queue depth")
    a.add_argument("-u", "--zero_copy", type=_bool01, default=False, metavar="0|1")
    a.add_argument("-g", "--need_get_data", type=_bool01, default=False, metavar="0|1")
    a.add_argument("-r", "--user_recovery", type=_bool01, default=False, metavar="0|1")
    a.add_argument("-i", "--user_recovery_reissue", type=_bool01, default=False, metavar="0|1",
                   help="reissue in-flight IO after recovery (implies -r 1)")
    a.add_argument("-e", "--user_recovery_fail_io", type=_bool01, default=False, metavar="0|1",
                   help="fail IO while no server runs (implies -r 1; kernel 6.13+)")
    a.add_argument("-f", "--file", help="loop: backing file or block device")
    a.add_argument("-s", "--size", type=parse_size, default=None, help="null: device size (default 250G)")
    a.add_argument("--buffered_io", action="store_true", help="loop: page-cache IO instead of O_DIRECT")

    d = sub.add_parser("del", help="stop and delete a device (or all)")
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("-n", "--number", type=_int_range(0, uapi.UBLK_MINORS - 1, "device id"))
    g.add_argument("-a", "--all", action="store_true")

    ls = sub.add_parser("list", help="show devices")
    ls.add_argument("-n", "--number", type=_int_range(0, uapi.UBLK_MINORS - 1, "device id"))
    ls.add_argument("-v", "--verbose", action="store_true")

    r = sub.add_parser("recover", help="restart the server of a device in recovery mode")
    r.add_argument("-n", "--number", required=True, type=_int_range(0, uapi.UBLK_MINORS - 1, "device id"))

    sub.add_parser("features", help="print the flags the kernel driver supports")
    return p


# ---- add ----------------------------------------------------------------------------------------
def validate_add(a):
    """Argument checks that need no driver; returns (target class, spec, requested flags)."""
    tcls = targets.get(a.type) if a.type in targets.TARGETS else None
    if tcls is None:
        raise CliError(f"add: -t {a.type}: unknown target (known: {', '.join(sorted(targets.TARGETS))})", 2)
    if a.zero_copy:
        raise CliError("add: -u 1: zero copy is not supported (Linux 6.12 clears UBLK_F_SUPPORT_ZERO_COPY "
                       "and this server has no zero-copy path); use -u 0", 2)
    if a.user_recovery_reissue and a.user_recovery_fail_io:
        raise CliError("add: -i 1 and -e 1 contradict each other (reissue vs fail in-flight IO)", 2)
    if tcls.name != "loop":
        if a.file:
            raise CliError(f"add: -f: only the loop target takes a backing file (not {tcls.name})", 2)
        if a.buffered_io:
            raise CliError(f"add: --buffered_io: only the loop target does file IO (not {tcls.name})", 2)
    if tcls.name != "null" and a.size is not None:
        raise CliError(f"add: -s: the {tcls.name} target's size comes from its backing store", 2)
    try:
        spec = tcls.spec_from_args(a)
    except targets.TargetError as e:
        raise CliError(f"add: {e}", 2) from None
    flags = uapi.UBLK_F_CMD_IOCTL_ENCODE
    if a.need_get_data:
        flags |= uapi.UBLK_F_NEED_GET_DATA
    if a.user_recovery or a.user_recovery_reissue or a.user_recovery_fail_io:
        flags |= uapi.UBLK_F_USER_RECOVERY
    if a.user_recovery_reissue:
        flags |= uapi.UBLK_F_USER_RECOVERY_REISSUE
    if a.user_recovery_fail_io:
        flags |= uapi.UBLK_F_USER_RECOVERY_FAIL_IO
    return tcls, spec, flags


_MUST_KEEP = (uapi.UBLK_F_NEED_GET_DATA | uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE
              | uapi.UBLK_F_USER_RECOVERY_FAIL_IO)
_FLAG_OPT = {uapi.UBLK_F_NEED_GET_DATA: "-g 1", uapi.UBLK_F_USER_RECOVERY: "-r 1",
             uapi.UBLK_F_USER_RECOVERY_REISSUE: "-i 1", uapi.UBLK_F_USER_RECOVERY_FAIL_IO: "-e 1"}


def cmd_add(a):
    tcls, spec, flags = validate_add(a)
    with Ctrl() as ctrl:
        features = ctrl.get_features()
        if features is not None:
            for f in _FLAG_OPT:
                if flags & f & ~features:
                    raise CliError(f"add: {_FLAG_OPT[f]}: this kernel's ublk_drv lacks "
                                   f"UBLK_F_{_flag_const(f)} (features 0x{features:x})", 2)
        req = uapi.DevInfo(nr_hw_queues=a.queues, queue_depth=a.depth, max_io_buf_bytes=DEFAULT_MAX_IO,
                           dev_id=uapi.UBLK_DEV_ID_AUTO if a.number is None else a.number, flags=flags)
        try:
            info = ctrl.add_dev(req)
        except UblkError as e:
            raise CliError(f"add: {e}") from None
        dev_id = info.dev_id
        log = Log(dev_id, "cli")
        log(f"add: ADD_DEV -> dev {dev_id} queues {info.nr_hw_queues} depth {info.queue_depth} "
            f"flags 0x{info.flags:x} [{' '.join(uapi.flag_names(info.flags))}] target {json.dumps(spec)}")
        daemon_pid = 0
        try:
            lost = flags & _MUST_KEEP & ~info.flags
            if lost:
                opts = " ".join(_FLAG_OPT[f] for f in _FLAG_OPT if lost & f)
                raise CliError(f"add: {opts}: the kernel refused UBLK_F_"
                               + ", UBLK_F_".join(_flag_const(f) for f in _FLAG_OPT if lost & f), 1)
            if info.nr_hw_queues != a.queues:
                print(f"add: note: the kernel limited -q {a.queues} to {info.nr_hw_queues} queues "
                      f"(one per CPU)", file=sys.stderr)
                log(f"add: kernel limited queues {a.queues} -> {info.nr_hw_queues}")
            target = tcls(spec)
            try:
                ctrl.set_params(dev_id, target.params(info))
            except UblkError as e:
                raise CliError(f"add: {e}") from None
            try:
                daemon_pid = daemon.spawn(dev_id, info, spec, "add", before_detach=ctrl.close)
            except daemon.SpawnError as e:
                daemon_pid = e.pid
                raise CliError(f"add: server for device {dev_id} failed to start: {e} "
                               f"(log: {log.path})") from None
            st = ctrl.wait_state(dev_id, (uapi.UBLK_S_DEV_LIVE,), LIVE_TIMEOUT)
            if st.state != uapi.UBLK_S_DEV_LIVE:
                raise CliError(f"add: device {dev_id} is {uapi.state_name(st.state)}, not LIVE, after "
                               f"{LIVE_TIMEOUT:.0f} s (log: {log.path})")
        except BaseException as e:
            log(f"add: failed ({e}); removing device {dev_id}")
            _remove(ctrl, dev_id, log, daemon_pid, quiet=True)
            raise
        log(f"add: device {dev_id} LIVE, daemon pid {daemon_pid}")
        print(format_device(ctrl, dev_id))
    return 0


def _flag_const(f):
    return {uapi.UBLK_F_NEED_GET_DATA: "NEED_GET_DATA", uapi.UBLK_F_USER_RECOVERY: "USER_RECOVERY",
            uapi.UBLK_F_USER_RECOVERY_REISSUE: "USER_RECOVERY_REISSUE",
            uapi.UBLK_F_USER_RECOVERY_FAIL_IO: "USER_RECOVERY_FAIL_IO"}.get(f, hex(f))


# ---- del ----------------------------------------------------------------------------------------
def ublkc_holders(dev_id):
    """Pids of processes holding /dev/ublkc<dev_id> open."""
    target = f"/dev/ublkc{dev_id}"
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fd_dir = f"/proc/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    out.append(int(name))
                    break
            except OSError:
                continue
    return out


def _is_ours(pid):
    """Only signal processes that are verifiably ubdsrv servers: pid > 1, not us, and a python whose
    argv runs the package (`-m ubdsrv` or .../ubdsrv/__main__.py); a shell whose script merely mentions
    ubdsrv does not qualify."""
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    for i, arg in enumerate(argv[:-1]):
        if arg == b"-m" and argv[i + 1] == b"ubdsrv":
            return True
    return any(a.endswith(b"/ubdsrv/__main__.py") or a.endswith(b"/ubdsrv") for a in argv[1:2])


def _wait_gone(dev_id, timeout):
    deadline = time.monotonic() + timeout
    while True:
        holders = ublkc_holders(dev_id)
        if not holders or time.monotonic() >= deadline:
            return holders
        time.sleep(0.1)


def _remove(ctrl, dev_id, log, daemon_pid=0, quiet=False, stop_timeout=STOP_TIMEOUT):
    """STOP_DEV, wait for the server to leave /dev/ublkcN (kill it if it does not), DEL_DEV."""
    try:
        ctrl.stop_dev(dev_id)
        log(f"del: STOP_DEV dev {dev_id} done")
    except UblkError as e:
        log(f"del: {e}")
        if e.errno == errno.ENODEV:
            raise
    if daemon_pid and quiet and _is_ours(daemon_pid):
        # failed add: nothing worth waiting for
        os.kill(daemon_pid, signal.SIGKILL)
    left = _wait_gone(dev_id, stop_timeout)
    if left:
        log(f"del: server still holds /dev/ublkc{dev_id} after {stop_timeout:.0f} s: pids {left}; killing")
        for pid in left:
            if _is_ours(pid):
                os.kill(pid, signal.SIGKILL)
        left = _wait_gone(dev_id, 10.0)
        if left:
            raise CliError(f"del: device {dev_id}: /dev/ublkc{dev_id} still held by pids {left}; "
                           f"not deleting")
    # DEL_DEV proper waits for every opener of /dev/ublkbN to close (a reader of the dead disk may
    # never do so); the async form removes the device at once and frees the id at the last close.
    if ctrl.del_dev_async(dev_id):
        how = "DEL_DEV_ASYNC"
    else:
        ctrl.del_dev(dev_id)
        how = "DEL_DEV"
    daemon.remove_state(dev_id)
    log(f"del: device {dev_id} deleted ({how})")
    if not _wait_released(ctrl, dev_id, RELEASE_TIMEOUT):
        openers = bdev_holders(dev_id)
        msg = (f"del: device {dev_id} deleted; its id stays reserved until the last opener of "
               f"/dev/ublkb{dev_id} closes it (pids {openers or 'unknown'})")
        log(msg)
        print(msg, file=sys.stderr)


def _wait_released(ctrl, dev_id, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            ctrl.get_dev_info(dev_id)
        except UblkError as e:
            if e.errno == errno.ENODEV:
                return True
            raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def bdev_holders(dev_id):
    """Pids with /dev/ublkb<dev_id> (possibly already unlinked) open."""
    names = (f"/dev/ublkb{dev_id}", f"/dev/ublkb{dev_id} (deleted)")
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") in names:
                    out.append(int(name))
                    break
            except OSError:
                continue
    return out


def cmd_del(a):
    status = 0
    with Ctrl() as ctrl:
        ids = device_ids() if a.all else [a.number]
        for dev_id in ids:
            log = Log(dev_id, "cli")
            try:
                info = ctrl.get_dev_info(dev_id)
                log(f"del: dev {dev_id} state {uapi.state_name(info.state)} daemon pid {info.ublksrv_pid}")
                _remove(ctrl, dev_id, log, info.ublksrv_pid)
            except UblkError as e:
                if a.all and e.errno == errno.ENODEV:
                    continue   # raced with another delete
                print(f"del: device {dev_id}: {e}", file=sys.stderr)
                status = 1
            except CliError as e:
                print(str(e), file=sys.stderr)
                status = 1
    return status


# ---- list ---------------------------------------------------------------------------------------
def format_device(ctrl, dev_id):
    info = ctrl.get_dev_info(dev_id)
    try:
        p = ctrl.get_params(dev_id)
    except UblkError:
        p = uapi.Params()
    st = daemon.load_state(dev_id) or {}
    names = uapi.flag_names(info.flags)
    lines = [
        f"dev id {dev_id}: nr_hw_queues {info.nr_hw_queues} queue_depth {info.queue_depth} "
        f"block size {1 << p.logical_bs_shift} dev_capacity {p.dev_sectors}",
        f"\tmax rq size {info.max_io_buf_bytes} daemon pid {info.ublksrv_pid} state "
        f"{uapi.state_name(info.state)}",
        f"\tflags 0x{info.flags:x} [ {' '.join(names) + ' ' if names else ''}]",
        f"\tublkc: {p.char_major}:{p.char_minor} ublkb: {p.disk_major}:{p.disk_minor} "
        f"owner: {info.owner_uid}:{info.owner_gid}",
    ]
    # queue tids only while the daemon that recorded them is the device's server and alive (after a
    # kill the kernel still reports the dead pid; scripts must not be handed pids that may be reused)
    if st.get("daemon_pid") == info.ublksrv_pid and _is_ours(info.ublksrv_pid):
        for qd in st.get("queues", []):
            cpus = "".join(f"{c} " for c in qd.get("affinity", []))
            lines.append(f"\tqueue {qd['q_id']}: tid {qd['tid']} affinity({cpus})")
    if st.get("target_json"):
        lines.append("\ttarget " + json.dumps(st["target_json"], sort_keys=True, separators=(",", ":")))
    return "\n".join(lines)


def cmd_list(a):
    with Ctrl() as ctrl:
        if a.number is not None:
            try:
                print(format_device(ctrl, a.number))
            except UblkError as e:
                raise CliError(f"list: device {a.number}: {e}") from None
            return 0
        for dev_id in device_ids():
            try:
                print(format_device(ctrl, dev_id))
            except UblkError as e:
                if e.errno != errno.ENODEV:
                    raise
    return 0


# ---- recover ------------------------------------------------------------------------------------
def cmd_recover(a):
    dev_id = a.number
    st = daemon.load_state(dev_id)
    if not st or "target" not in st:
        raise CliError(f"recover: no saved server state for device {dev_id} ({daemon.state_path(dev_id)})")
    with Ctrl() as ctrl:
        try:
            info = ctrl.get_dev_info(dev_id)
        except UblkError as e:
            raise CliError(f"recover: device {dev_id}: {e}") from None
        if not info.flags & uapi.UBLK_F_USER_RECOVERY:
            raise CliError(f"recover: device {dev_id} was not created with -r 1 (flags 0x{info.flags:x})")
        if info.state == uapi.UBLK_S_DEV_LIVE:
            raise CliError(f"recover: device {dev_id} is LIVE (daemon pid {info.ublksrv_pid}); "
                           f"nothing to recover")
        log = Log(dev_id, "cli")
        log(f"recover: dev {dev_id} state {uapi.state_name(info.state)}")
        # 6.12 answers EBUSY until the old server closed /dev/ublkcN and the device is QUIESCED
        deadline = time.monotonic() + RECOVERY_TIMEOUT
        while True:
            try:
                ctrl.start_user_recovery(dev_id)
                break
            except UblkError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    log(f"recover: {e}")
                    raise CliError(f"recover: device {dev_id}: {e}") from None
                time.sleep(0.2)
        log("recover: START_USER_RECOVERY done")
        try:
            pid = daemon.spawn(dev_id, info, st["target"], "recover", before_detach=ctrl.close)
        except daemon.SpawnError as e:
            if e.pid and _is_ours(e.pid):
                os.kill(e.pid, signal.SIGKILL)
            raise CliError(f"recover: server for device {dev_id} failed to start: {e} "
                           f"(log: {log.path})") from None
        info = ctrl.wait_state(dev_id, (uapi.UBLK_S_DEV_LIVE,), LIVE_TIMEOUT)
        if info.state != uapi.UBLK_S_DEV_LIVE:
            raise CliError(f"recover: device {dev_id} is {uapi.state_name(info.state)} after recovery")
        log(f"recover: device {dev_id} LIVE, daemon pid {pid}")
        print(format_device(ctrl, dev_id))
    return 0


# ---- features -----------------------------------------------------------------------------------
def cmd_features(a):
    with Ctrl() as ctrl:
        f = ctrl.get_features()
    if f is None:
        raise CliError("features: this kernel's ublk_drv has no GET_FEATURES command (before 6.5)")
    print(f"ublk_drv features: 0x{f:x}")
    for name in uapi.flag_names(f):
        print(f"\t{name}")
    return 0


COMMANDS = {"add": cmd_add, "del": cmd_del, "list": cmd_list, "recover": cmd_recover,
            "features": cmd_features}


def main(argv=None):
    try:
        a = build_parser().parse_args(argv)
        return COMMANDS[a.cmd](a)
    except CliError as e:
        print(str(e), file=sys.stderr)
        return e.status
    except UblkError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
