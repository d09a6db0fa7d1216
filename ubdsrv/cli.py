"""`ublk`: the command line of ublksrv's C tool (targets/ublk.cpp, targets/ublksrv_tgt.cpp), driving the
Python server: add, del, list, recover, features, help.

The C tool's argv reading is kept (cliargs: getopt_long, strtol), its outputs are kept byte for byte
(listing), and so are its clamps. Where it stays silent about bad input (an unknown option, a word
nobody reads, a number without digits) we say so and exit 2 instead; where it would start something
this server cannot serve (-z, -b, ...) we refuse.

Exit status: 0 success, 1 the kernel or the daemon refused (message names the command and errno),
2 bad arguments (message names the option). The C tool returns -errno from main instead."""
import errno
import os
import signal
import sys
import threading
import time
from . import __version__, daemon, listing, proc, targets, uapi
from .cliargs import Option, Reading
from .ctrl import Ctrl, UblkError, device_ids
from .log import Log

PROG = "ublk"
# the server's defaults and limits, ublksrv's (DEF_NR_HW_QUEUES, DEF_QD, DEF_BUF_SIZE, MAX_NR_HW_QUEUES,
# MAX_QD, MAX_BUF_SIZE in include/ublksrv.h)
DEFAULT_QUEUES = 1
DEFAULT_DEPTH = 128
DEFAULT_MAX_IO = 512 << 10
MAX_QUEUES = 32
MAX_DEPTH = uapi.UBLK_MAX_QUEUE_DEPTH
MAX_IO = 32 << 20
MIN_IO = 4096
LIVE_TIMEOUT = 30.0
#: how long STOP_DEV may block before `del` kills the server: the kernel's del_gendisk waits for every
#: request in flight, and a server that never completes one (a stuck tag) would hold it forever
STOP_GRACE = 10.0
#: ... and how long after the kill (the kernel fails the held requests at the block layer's timeout)
STOP_AFTER_KILL = 60.0
#: how long the server may take to leave /dev/ublkcN after STOP_DEV before it is killed
SERVER_EXIT_TIMEOUT = 30.0
RECOVERY_TIMEOUT = 60.0

COMMANDS_HELP = "add, del, list, recover, features, help"


class CliError(Exception):
    """Fails the command with exit status `status` and the message as the one line printed."""

    def __init__(self, msg, status=1):
        super().__init__(msg)
        self.status = status


def _note(msg):
    print(f"{PROG}: note: {msg}", file=sys.stderr)


# ---- add: the options every target shares (ublksrv_parse_add_opts) -------------------------------------
TYPE = Option("type", "t", "str", None, "the target: " + ", ".join(targets.TARGETS), "TYPE")
NUMBER = Option("number", "n", "int", -1, "device id N (/dev/ublkbN); -1: the first free one", "DEV_ID")
ADD_OPTIONS = (
    TYPE,
    NUMBER,
    Option("queues", "q", "int", DEFAULT_QUEUES, f"hardware queues (at most {MAX_QUEUES}; the kernel "
           "also caps them at the CPU count)", "NR_HW_QUEUES"),
    Option("depth", "d", "int", DEFAULT_DEPTH, f"requests in flight per queue (at most {MAX_DEPTH})",
           "QUEUE_DEPTH"),
    Option("uring_comp", "u", "int", 0, "URING_CMD_COMP_IN_TASK (kernels complete in task context "
           "anyway)", "0|1"),
    Option("need_get_data", "g", "int", 0, "UBLK_F_NEED_GET_DATA: write data is fetched on request",
           "0|1"),
    Option("user_recovery", "r", "int", 0, "UBLK_F_USER_RECOVERY: `ublk recover` can replace a dead "
           "server", "0|1"),
    Option("user_recovery_reissue", "i", "int", 0, "with recovery: requests in flight go to the new "
           "server", "0|1"),
    Option("user_recovery_fail_io", "e", "int", 0, "with recovery: fail IO while no server runs "
           "(kernel 6.13+)", "0|1"),
    Option("usercopy", "", "flag", False, "UBLK_F_USER_COPY: data moves by read/write on /dev/ublkcN"),
    Option("max_io_buf_bytes", "", "int", DEFAULT_MAX_IO, f"largest request, bytes ({MIN_IO} to "
           f"{MAX_IO})", "N"),
    Option("debug_mask", "", "hex", 0, "ublksrv's debug log mask: accepted, no effect here", "MASK"),
)
#: options ublksrv's `ublk add` knows that this server refuses, and why
REFUSED = (
    (Option("zerocopy", "z"), "zero copy (UBLK_F_SUPPORT_ZERO_COPY / AUTO_BUF_REG) is not supported "
                              "by this server; leave -z out"),
    (Option("batch-io", "b"), "UBLK_F_BATCH_IO is not supported by this server"),
    (Option("threads_per_queue", "T", "int"), "this server serves each queue from one process (-T 1)"),
    (Option("seq_tags", "S"), "this server serves each queue from one process"),
    (Option("unprivileged"), "unprivileged devices are not supported (the server runs as root)"),
    (Option("eventfd", "", "int"), "--eventfd is ublksrv's internal handshake"),
    (Option("shmem_zc"), "shared-memory zero copy is not supported by this server"),
    (Option("htlb", "", "str"), "shared-memory zero copy is not supported by this server"),
    (Option("rdonly_shmem_buf"), "shared-memory zero copy is not supported by this server"),
)
#: the device flags each option sets (ublksrv_parse_add_opts)
FLAG_OPTIONS = (
    ("uring_comp", uapi.UBLK_F_URING_CMD_COMP_IN_TASK),
    ("need_get_data", uapi.UBLK_F_NEED_GET_DATA),
    ("user_recovery", uapi.UBLK_F_USER_RECOVERY),
    ("user_recovery_reissue", uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE),
    ("user_recovery_fail_io", uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_FAIL_IO),
    ("usercopy", uapi.UBLK_F_USER_COPY),
)
#: flags the device must really have, as the option that asked for each
_MUST_KEEP = {uapi.UBLK_F_NEED_GET_DATA: "-g 1", uapi.UBLK_F_USER_RECOVERY: "-r 1",
              uapi.UBLK_F_USER_RECOVERY_REISSUE: "-i 1", uapi.UBLK_F_USER_RECOVERY_FAIL_IO: "-e 1",
              uapi.UBLK_F_USER_COPY: "--usercopy"}


class AddRequest:
    """`ublk add` read and checked, before the driver is asked anything. dev_id is
    uapi.UBLK_DEV_ID_AUTO for "any"; notes: what to tell the user on stderr."""

    def __init__(self, target, spec, dev_id, queues, depth, max_io, flags, debug_mask=0, notes=()):
        self.target, self.spec, self.dev_id = target, spec, dev_id
        self.queues, self.depth, self.max_io, self.flags = queues, depth, max_io, flags
        self.debug_mask, self.notes = debug_mask, list(notes)

    def __repr__(self):
        return f"AddRequest({vars(self)})"


def _fail(cmd, errors):
    raise CliError(f"{cmd}: " + "; ".join(errors), 2)


def parse_add(argv):
    """Read `ublk add`'s argv (without "add") as ublksrv does: the common options in one reading, the
    target's own in another. Raises CliError(status 2) naming the option."""
    first = Reading(argv, [ADD_OPTIONS], strict=False)
    name = first.values.get("type")
    if not name:
        _fail("add", [f"-t TYPE is required (targets: {', '.join(targets.TARGETS)})"])
    try:
        tcls = targets.get(name)
    except targets.TargetError as e:
        _fail("add", [str(e)])
    r = Reading(argv, [ADD_OPTIONS + tuple(o for o, _ in REFUSED), tcls.options])
    if r.errors:
        _fail("add", r.errors)
    notes = list(r.notes)
    for written in r.missing.values():
        # getopt ran out of argv for the value; ublksrv goes on without the option
        notes.append(f"{written} without a value is ignored, as ublksrv ignores it")
    for o, why in REFUSED:
        if o.name in r.given and not (o.name == "threads_per_queue" and r.values[o.name] == 1):
            _fail("add", [f"{r.given[o.name]}: {why}"])
    opt = r.given.get
    number = r.get(NUMBER)
    if not -1 <= number < uapi.UBLK_MINORS:
        _fail("add", [f"{opt('number')} {number}: expected a device id, 0 to {uapi.UBLK_MINORS - 1} "
                      f"(-1: any)"])
    queues, depth = r.values.get("queues", DEFAULT_QUEUES), r.values.get("depth", DEFAULT_DEPTH)
    for key, value in (("queues", queues), ("depth", depth)):
        if value < 1:
            _fail("add", [f"{opt(key)} {value}: expected at least 1"])
    if queues > MAX_QUEUES:
        notes.append(f"{opt('queues')} {queues} clamped to {MAX_QUEUES}, ublksrv's maximum")
        queues = MAX_QUEUES
    if depth > MAX_DEPTH:
        notes.append(f"{opt('depth')} {depth} clamped to {MAX_DEPTH}, ublksrv's maximum")
        depth = MAX_DEPTH
    max_io = r.values.get("max_io_buf_bytes", DEFAULT_MAX_IO)
    if not MIN_IO <= max_io <= MAX_IO:
        _fail("add", [f"--max_io_buf_bytes {max_io}: expected {MIN_IO} to {MAX_IO} bytes"])
    if r.values.get("user_recovery_reissue") and r.values.get("user_recovery_fail_io"):
        _fail("add", [f"{opt('user_recovery_reissue')} and {opt('user_recovery_fail_io')} contradict "
                      f"each other (reissue vs fail the IO of a dead server)"])
    flags = uapi.UBLK_F_CMD_IOCTL_ENCODE
    for key, bits in FLAG_OPTIONS:
        if r.values.get(key):         # any non-zero value, as ublksrv tests them
            flags |= bits
    mine = {o.name for o in tcls.options}
    try:
        spec = tcls.spec_from_options({o.name: r.get(o) for o in tcls.options},
                                      {k: v for k, v in r.given.items() if k in mine})
    except targets.TargetError as e:
        _fail("add", [str(e)])
    return AddRequest(tcls, spec, uapi.UBLK_DEV_ID_AUTO if number == -1 else number, queues, depth,
                      max_io, flags, r.values.get("debug_mask", 0), notes)


def _const_name(flag):
    """`UBLK_F_USER_RECOVERY` for its bit."""
    return next(k for k, v in vars(uapi).items() if k.startswith("UBLK_F_") and v == flag)


def cmd_add(argv):
    req = parse_add(argv)
    for n in req.notes:
        _note(f"add: {n}")
    with Ctrl() as ctrl:
        features = ctrl.get_features()
        if features is not None:
            for f, written in _MUST_KEEP.items():
                if req.flags & f & ~features:
                    raise CliError(f"add: {written}: this kernel's ublk_drv lacks "
                                   f"{_const_name(f)} (features 0x{features:x})", 2)
        info_req = uapi.DevInfo(nr_hw_queues=req.queues, queue_depth=req.depth, max_io_buf_bytes=req.max_io,
                                dev_id=req.dev_id, flags=req.flags)
        try:
            info = ctrl.add_dev(info_req)
        except UblkError as e:
            raise CliError(f"add: {e}") from None
        dev_id = info.dev_id
        log = Log(dev_id, "cli")
        log(f"add: ADD_DEV -> dev {dev_id} queues {info.nr_hw_queues} depth {info.queue_depth} "
            f"max io {info.max_io_buf_bytes} flags 0x{info.flags:x} [{' '.join(uapi.flag_names(info.flags))}] "
            f"target {req.spec}" + (f" debug_mask 0x{req.debug_mask:x}" if req.debug_mask else ""))
        daemon_pid = 0
        try:
            lost = [w for f, w in _MUST_KEEP.items() if req.flags & f & ~info.flags]
            if lost:
                raise CliError(f"add: {' '.join(lost)}: the kernel refused the flag "
                               f"(asked 0x{req.flags:x}, got 0x{info.flags:x})", 1)
            if info.nr_hw_queues != req.queues:
                _note(f"add: the kernel limited -q {req.queues} to {info.nr_hw_queues} queues (one per CPU)")
                log(f"add: kernel limited queues {req.queues} -> {info.nr_hw_queues}")
            target = req.target(req.spec)
            try:
                ctrl.set_params(dev_id, target.params(info))
            except UblkError as e:
                raise CliError(f"add: {e}") from None
            try:
                daemon_pid = daemon.spawn(dev_id, info, req.spec, "add", before_detach=ctrl.close)
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
            try:
                _remove(dev_id, log, daemon_pid, failed_add=True)
            except Exception as cleanup:   # the first failure is the one to report
                log(f"add: removing device {dev_id} failed too: {cleanup}")
                _note(f"add: device {dev_id} could not be removed: {cleanup}")
            raise
        log(f"add: device {dev_id} LIVE, daemon pid {daemon_pid}")
        print(_list_one(ctrl, dev_id))
    return 0


# ---- del (cmd_dev_del, __cmd_dev_del) ------------------------------------------------------------------
DEL_OPTIONS = (
    Option("number", "n", "int", None, "the device", "DEV_ID"),
    Option("all", "a", "flag", False, "every device"),
    Option("async", "", "flag", False, "DEL_DEV_ASYNC: do not wait for the device's id to be free"),
)


def ublkc_holders(dev_id):
    """Pids of processes holding /dev/ublkc<dev_id> open."""
    return _holders((f"/dev/ublkc{dev_id}",))


def bdev_holders(dev_id):
    """Pids with /dev/ublkb<dev_id> (possibly already unlinked) open."""
    return _holders((f"/dev/ublkb{dev_id}", f"/dev/ublkb{dev_id} (deleted)"))


def _holders(names):
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in names:
                    out.append(int(pid))
                    break
            except OSError:
                continue
    return out


def _is_ours(pid):
    """Only signal processes that are verifiably ubdsrv servers (the one definition: proc.py)."""
    return proc.is_server(pid)


def _kill_if_ours(pid):
    """SIGKILL pid if it is a server; True if the signal was sent. A server that exits between the
    check and the kill (a daemon that just reported its failure does) is no error: it is gone."""
    if not _is_ours(pid):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _kill_servers(pids, log):
    for pid in pids:
        if _kill_if_ours(pid):
            log(f"del: SIGKILL server pid {pid}")


def _wait_gone(dev_id, timeout):
    deadline = time.monotonic() + timeout
    while True:
        holders = ublkc_holders(dev_id)
        if not holders or time.monotonic() >= deadline:
            return holders
        time.sleep(0.1)


def _stop(dev_id, log, server_pid, grace=STOP_GRACE):
    """STOP_DEV; if it has not returned after `grace` seconds, the server holds a request it never
    completes (del_gendisk waits for it): kill the server, after which the kernel fails that request."""
    failed = []

    def run():
        try:
            with Ctrl() as c:
                c.stop_dev(dev_id)
        except BaseException as e:          # handed to the caller below
            failed.append(e)

    t = threading.Thread(target=run, name=f"stop-{dev_id}", daemon=True)
    t.start()
    t.join(grace)
    if t.is_alive():
        pids = sorted({server_pid, *ublkc_holders(dev_id)} - {0, -1})
        msg = (f"STOP_DEV of device {dev_id} has not returned after {grace:.0f} s: the server holds "
               f"requests it does not complete; killing it (pids {pids})")
        log(f"del: {msg}")
        _note(f"del: {msg}")
        _kill_servers(pids, log)
        t.join(STOP_AFTER_KILL)
        if t.is_alive():
            raise CliError(f"del: device {dev_id}: STOP_DEV still blocked {STOP_AFTER_KILL:.0f} s after the "
                           f"server was killed; not deleting")
    if failed:
        e = failed[0]
        if not isinstance(e, UblkError):
            raise e
        log(f"del: {e}")
        if e.errno == errno.ENODEV:
            raise e
    else:
        log(f"del: STOP_DEV dev {dev_id} done")


def _remove(dev_id, log, server_pid=0, async_=False, failed_add=False):
    """STOP_DEV, wait for the server to leave /dev/ublkcN (kill it if it does not), DEL_DEV (which
    returns once the last opener of /dev/ublkbN closed it: the id is free then) or DEL_DEV_ASYNC."""
    if failed_add and server_pid:
        _kill_if_ours(server_pid)   # a server that failed to start has nothing to drain
    _stop(dev_id, log, server_pid)
    left = _wait_gone(dev_id, SERVER_EXIT_TIMEOUT)
    if left:
        log(f"del: server still holds /dev/ublkc{dev_id} after {SERVER_EXIT_TIMEOUT:.0f} s: pids {left}")
        _kill_servers(left, log)
        left = _wait_gone(dev_id, 10.0)
        if left:
            raise CliError(f"del: device {dev_id}: /dev/ublkc{dev_id} still held by pids {left}; "
                           f"not deleting")
    with Ctrl() as ctrl:
        how = "DEL_DEV"
        if async_:
            if ctrl.del_dev_async(dev_id):
                how = "DEL_DEV_ASYNC"
            else:
                _note(f"del: this kernel has no DEL_DEV_ASYNC (6.9+); deleting device {dev_id} "
                      f"synchronously")
        if how == "DEL_DEV":
            openers = bdev_holders(dev_id)
            if openers:
                log(f"del: DEL_DEV waits for the openers of /dev/ublkb{dev_id} to close it: pids {openers}")
            try:
                ctrl.del_dev(dev_id)
            except UblkError as e:
                if e.errno != errno.ENODEV:     # gone meanwhile: what we wanted (__cmd_dev_del)
                    raise
    daemon.remove_state(dev_id)
    log(f"del: device {dev_id} deleted ({how})")


def cmd_del(argv):
    r = Reading(argv, [DEL_OPTIONS])
    if r.errors:
        _fail("del", r.errors)
    number = r.values.get("number")
    if number is None and not r.values.get("all"):
        # ublksrv's `ublk del` deletes every device when given neither; that takes -a here
        _fail("del", ["-n DEV_ID or -a is required"])
    if number is not None and not 0 <= number < uapi.UBLK_MINORS:
        _fail("del", [f"{r.given['number']} {number}: expected a device id, 0 to {uapi.UBLK_MINORS - 1}"])
    status = 0
    with Ctrl() as ctrl:
        ids = [number] if number is not None else device_ids()
        for dev_id in ids:
            log = Log(dev_id, "cli")
            try:
                info = ctrl.get_dev_info(dev_id)
            except UblkError as e:
                if e.errno == errno.ENODEV:
                    # not an error for ublksrv either (__cmd_dev_del returns 0)
                    if number is not None:
                        _note(f"del: device {dev_id} does not exist")
                    continue
                print(f"{PROG} del: device {dev_id}: {e}", file=sys.stderr)
                status = 1
                continue
            log(f"del: dev {dev_id} state {uapi.state_name(info.state)} daemon pid {info.ublksrv_pid}")
            try:
                _remove(dev_id, log, info.ublksrv_pid, async_=bool(r.values.get("async")))
            except UblkError as e:
                if e.errno == errno.ENODEV:
                    continue            # deleted by someone else meanwhile
                print(f"{PROG} del: device {dev_id}: {e}", file=sys.stderr)
                status = 1
            except CliError as e:
                print(str(e), file=sys.stderr)
                status = 1
    return status


# ---- list (cmd_list_dev_info, list_one_dev) --------------------------------------------------------------
LIST_OPTIONS = (
    Option("number", "n", "int", None, "only this device", "DEV_ID"),
    Option("verbose", "v", "flag", False, "the device's JSON, as ublksrv keeps it"),
)


def _list_one(ctrl, dev_id, verbose=False):
    info = ctrl.get_dev_info(dev_id)
    params = ctrl.get_params(dev_id)
    state, _why = daemon.read_state(dev_id, info)
    if verbose and state is not None:
        return listing.format_json(info, params, state)
    return listing.format_device(info, params, state)


def cmd_list(argv):
    r = Reading(argv, [LIST_OPTIONS])
    if r.errors:
        _fail("list", r.errors)
    number, verbose = r.values.get("number"), bool(r.values.get("verbose"))
    if number is not None and not 0 <= number < uapi.UBLK_MINORS:
        _fail("list", [f"{r.given['number']} {number}: expected a device id, 0 to {uapi.UBLK_MINORS - 1}"])
    with Ctrl() as ctrl:
        if number is not None:
            try:
                print(_list_one(ctrl, number, verbose))
            except UblkError as e:
                raise CliError(f"list: device {number}: {e}") from None
            return 0
        for dev_id in device_ids():
            try:
                print(_list_one(ctrl, dev_id, verbose))
            except UblkError as e:
                if e.errno != errno.ENODEV:      # deleted while we looked: skip, as ublksrv does
                    raise
    return 0


# ---- recover (cmd_dev_recover: reads -n and -t, ignores the rest) ------------------------------------
RECOVER_OPTIONS = (Option("number", "n", "int", None, "the device", "DEV_ID"), TYPE)


def cmd_recover(argv):
    r = Reading(argv, [RECOVER_OPTIONS], strict=False)     # the rest of argv is ignored, as in C
    if r.errors:
        _fail("recover", r.errors)
    dev_id = r.values.get("number")
    if dev_id is None or not 0 <= dev_id < uapi.UBLK_MINORS:
        _fail("recover", ["-n DEV_ID is required" if dev_id is None else
                          f"{r.given['number']} {dev_id}: expected a device id"])
    with Ctrl() as ctrl:
        try:
            info = ctrl.get_dev_info(dev_id)
        except UblkError as e:
            raise CliError(f"recover: device {dev_id}: {e}") from None
        st, why = daemon.read_state(dev_id, info)
        if st is None or "target" not in st:
            raise CliError(f"recover: device {dev_id}: {why or 'the saved state has no target'}")
        if r.values.get("type") and r.values["type"] != st["target"]["name"]:
            _note(f"recover: -t {r.values['type']} ignored: device {dev_id} is a "
                  f"{st['target']['name']} device (its saved target is what the server restarts with)")
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
            if e.pid:
                _kill_if_ours(e.pid)
            raise CliError(f"recover: server for device {dev_id} failed to start: {e} "
                           f"(log: {log.path})") from None
        info = ctrl.wait_state(dev_id, (uapi.UBLK_S_DEV_LIVE,), LIVE_TIMEOUT)
        if info.state != uapi.UBLK_S_DEV_LIVE:
            raise CliError(f"recover: device {dev_id} is {uapi.state_name(info.state)} after recovery")
        log(f"recover: device {dev_id} LIVE, daemon pid {pid}")
        print(_list_one(ctrl, dev_id))
    return 0


# ---- features, help, version ------------------------------------------------------------------------
def cmd_features(argv):
    r = Reading(argv, [()])
    if r.errors:
        _fail("features", r.errors)
    with Ctrl() as ctrl:
        f = ctrl.get_features()
    if f is None:
        raise CliError("features: this kernel's ublk_drv has no GET_FEATURES command (before 6.5)")
    print(listing.format_features(f))
    return 0


def usage(target=None):
    """`ublk help [-t TYPE]`: the commands, the options every target takes, then each target's own
    (from the target)."""
    tcls = [target] if target else list(targets.TARGETS.values())
    t = target.name if target else "TYPE"
    lines = [f"usage: {PROG} add -t {t} [options]      create a device; its server runs in the background",
             f"       {PROG} del -n DEV_ID | -a [--async]",
             f"       {PROG} list [-n DEV_ID] [-v]",
             f"       {PROG} recover -n DEV_ID",
             f"       {PROG} features",
             f"       {PROG} help [-t TYPE]",
             f"       {PROG} -v | --version",
             "", "options of add, every target:"]
    for o in ADD_OPTIONS:
        lines.append(f"\t{o.usage():<26} {o.help}")
    lines += ["", "target options:" if not target else f"options of -t {t}:"]
    for c in tcls:
        lines += c.usage()
    return "\n".join(lines)


def cmd_help(argv):
    r = Reading(argv, [(TYPE,)])
    if r.errors:
        _fail("help", r.errors)
    name = r.values.get("type")
    try:
        print(usage(targets.get(name) if name else None))
    except targets.TargetError as e:
        _fail("help", [str(e)])
    return 0


COMMANDS = {"add": cmd_add, "del": cmd_del, "list": cmd_list, "recover": cmd_recover,
            "features": cmd_features, "help": cmd_help}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv:
            raise CliError(f"{PROG}: missing command ({COMMANDS_HELP})", 2)
        cmd, rest = argv[0], argv[1:]
        if cmd in ("-v", "--version"):
            print(f"ubdsrv {__version__}")
            return 0
        if cmd in ("-h", "--help"):
            cmd = "help"
        if cmd == "set_affinity":
            raise CliError(f"{PROG} set_affinity: not supported by this server", 2)
        if cmd not in COMMANDS:
            raise CliError(f"{PROG}: unknown command {cmd!r} ({COMMANDS_HELP})", 2)
        return COMMANDS[cmd](rest)
    except CliError as e:
        msg = str(e)
        print(msg if msg.startswith(PROG) else f"{PROG} {msg}", file=sys.stderr)
        return e.status
    except UblkError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
