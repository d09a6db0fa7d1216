"""The server under pressure and odd conditions, against the guest's ublk_drv: queue tasks that are IO
flushers and out of the OOM killer's reach, SIGTERM as a graceful stop under a verify workload,
/dev/ublkcN held by another opener, saved state of a device someone else re-created, and
UBLK_F_USER_COPY (`--usercopy`) with fio verify. Every test deletes its devices and fails on a new
BUG/WARNING/Oops line in dmesg."""
import re

import pytest

from vm.guest import GUEST_UBD_DIR

from .ublk_guest import checked, sh

# include/linux/sched.h (6.12): PR_SET_IO_FLUSHER sets PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
PF_MEMALLOC_NOIO = 0x00080000
PF_LOCAL_THROTTLE = 0x00100000
# fio's words for data that came back wrong (as opposed to IO that failed)
VERIFY_FAILURE = re.compile(r"verify: bad|bad magic|verify failed|crc32c: verify|bad header", re.I)


@pytest.fixture
def g(guest):
    """The shared guest with ublk_drv loaded; afterwards: no device, no server, dmesg clean."""
    yield from checked(guest)


def server_pids(g, dev_id):
    """(daemon pid, [queue tids]) as `ublk list` shows them (fields by position)."""
    out = sh(g, f"ublk list -n {dev_id}").stdout.splitlines()
    daemon = int(out[1].split()[6])
    queues = [int(line.split()[3]) for line in out if line.split()[:1] == ["queue"]]
    return daemon, queues


def test_queue_tasks_are_io_flushers_and_the_server_is_oom_proof(g):
    sh(g, "ublk add -t null -n 0 -q 2 -s 256M >/dev/null && test -b /dev/ublkb0")
    daemon, queues = server_pids(g, 0)
    assert len(queues) == 2, queues
    for pid in [daemon, *queues]:
        # /proc/PID/stat field 9 is task->flags (fs/proc/array.c); comm may hold spaces, so cut after ')'
        r = sh(g, f"sed 's/.*) //' /proc/{pid}/stat | cut -d' ' -f7; cat /proc/{pid}/oom_score_adj")
        flags, oom = r.stdout.split()
        flusher = int(flags) & (PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE)
        assert oom == "-1000", f"pid {pid}: oom_score_adj {oom}"
        if pid in queues:
            assert flusher == PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE, f"queue {pid}: flags 0x{int(flags):x}"
        else:
            assert flusher == 0, f"daemon {pid}: flags 0x{int(flags):x} (only the queues serve IO)"
    sh(g, "dd if=/dev/ublkb0 of=/dev/null bs=64k count=64 iflag=direct status=none && ublk del -n 0")


def test_sigterm_under_fio_verify_stops_the_device_and_loses_no_acknowledged_write(g):
    """SIGTERM to the daemon: STOP_DEV after the IO already issued was served. Every write fio saw
    complete must be in the backing file (fio's verify state, checked through a new device on the same
    file); IO after the stop fails instead of hanging; the device stays listed, stopped."""
    r = sh(g, r"""
cd /root && rm -f ./*-verify.state
truncate -s 256M /root/ubd-term.img
ublk add -t loop -n 0 -q 2 -f /root/ubd-term.img >/dev/null && test -b /dev/ublkb0
JOB="--name=t --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k --iodepth=32
     --size=256M --verify=crc32c --verify_fatal=1 --verify_state_save=1"
# writes only, and the stop lands among them: once the disk is gone its capacity is 0, a read
# returns 0 bytes (EOF) and fio would verify its untouched buffer ("bad magic header 0", 32 times)
fio $JOB --do_verify=0 > /root/fio-term.log 2>&1 &
FIO=$!
# stop after 16 MiB were written (sectors written: field 7 of the disk's stat), whatever the speed
until [ "$(awk '{print $7}' /sys/block/ublkb0/stat)" -ge 32768 ]; do
  kill -0 $FIO 2>/dev/null || { echo "fio ended before 16 MiB were written"; exit 90; }
  sleep 0.1
done
p=$(ublk list -n 0 | awk 'NR==2{print $7}')
grep -q ubdsrv /proc/$p/cmdline || { echo "pid $p is not a ubdsrv daemon"; exit 91; }
queues=$(ublk list -n 0 | awk '$1=="queue"{print $4}')
t0=$(date +%s%N)
kill -TERM $p
while kill -0 $p 2>/dev/null; do
  [ $(( ($(date +%s%N) - t0) / 1000000000 )) -ge 60 ] && { echo "daemon still there after 60 s"; exit 92; }
  sleep 0.1
done
echo "daemon gone after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
for q in $queues; do kill -0 $q 2>/dev/null && echo "queue $q left"; done
t0=$(date +%s)
while kill -0 $FIO 2>/dev/null; do
  [ $(( $(date +%s) - t0 )) -ge 60 ] && { echo "fio hangs"; exit 93; }
  sleep 0.5
done
wait $FIO; echo "fio status $?"
echo "--- list"; ublk list -n 0; echo "--- end"
echo "state files $(ls /root | grep -c 'verify.state')"
ublk del -n 0 && echo deleted
ublk add -t loop -n 0 -q 2 -f /root/ubd-term.img >/dev/null && test -b /dev/ublkb0
# iodepth 1: fio decides which of the last writes completed by counting its verify reads, which is
# exact only when one read is in flight (with 32, it also "verifies" the writes that failed)
fio $JOB --verify_only --verify_state_load=1 --iodepth=1 > /root/fio-reverify.log 2>&1
echo "reverify status $?"
ublk del -n 0
""", timeout=600)
    out = r.stdout
    fio_log = sh(g, "cat /root/fio-term.log").stdout
    reverify = sh(g, "cat /root/fio-reverify.log").stdout
    log = sh(g, "cat /var/log/ubdsrv/dev0.log").stdout
    ms = int(re.search(r"daemon gone after (\d+) ms", out).group(1))
    assert ms < 30_000, out                     # daemon.STOP_TIMEOUT; in practice about a second
    assert "queue" not in out.split("daemon gone")[1].split("fio status")[0], out
    # the daemon's own account: a graceful stop, exit status 0
    assert re.search(r"SIGTERM \(from pid \d+\): STOP_DEV", log), log[-3000:]
    assert "daemon: STOP_DEV done" in log and "daemon: exit (status 0)" in log, log[-3000:]
    # fio: its writes failed after the stop (the disk is gone), none came back wrong
    assert int(re.search(r"fio status (\d+)", out).group(1)) != 0, fio_log
    assert not VERIFY_FAILURE.search(fio_log), fio_log
    # stopped, not deleted: DEAD, no server (pid -1; the queue lines `list` may still print are the
    # saved ones, as ublksrv prints them: the processes are gone, checked above)
    listing = out.split("--- list\n")[1].split("--- end")[0]
    assert re.search(r"daemon pid -1 state DEAD", listing), listing
    assert "state files 1" in out and "deleted" in out, out
    # every write fio saw complete reads back intact through a new server
    assert "reverify status 0" in out and "err= 0" in reverify, reverify
    verified = int(re.search(r"issued rwts: total=(\d+),", reverify).group(1))
    assert verified > 100, reverify


def test_open_waits_while_another_process_holds_ublkc(g):
    """The driver lets one process open /dev/ublkcN (udev probing a new node is one): the daemon
    retries EBUSY until a deadline, and names the holder problem when it passes."""
    r = sh(g, f"PYTHONPATH={GUEST_UBD_DIR} python3 - <<'EOF'\n" + r"""
import errno, os, threading, time
from ubdsrv import daemon, uapi
from ubdsrv.ctrl import Ctrl

with Ctrl() as c:
    c.add_dev(uapi.DevInfo(dev_id=7, nr_hw_queues=1, queue_depth=8, flags=uapi.UBLK_F_CMD_IOCTL_ENCODE))
    try:
        holder = daemon._open_cdev(7, os.O_RDWR, print)           # the node may still be on its way
        threading.Timer(1.5, os.close, [holder]).start()
        t0 = time.monotonic()
        fd = daemon._open_cdev(7, os.O_RDWR | os.O_CLOEXEC, print)
        print(f"opened after {time.monotonic() - t0:.2f} s")
        try:
            daemon._open_cdev(7, os.O_RDWR, print, timeout=1.0)
        except OSError as e:
            print(f"second opener: {errno.errorcode[e.errno]}: {e.strerror}")
        os.close(fd)
    finally:
        c.del_dev(7)
print("deleted")
EOF
""")
    out = r.stdout
    waited = float(re.search(r"opened after ([\d.]+) s", out).group(1))
    assert 1.3 <= waited < 5, out
    assert "Device or resource busy; retrying" in out, out
    assert re.search(r"second opener: EBUSY: /dev/ublkc7 still held by another process after 1 s", out), out
    assert "deleted" in out


def test_saved_state_of_a_device_recreated_by_someone_else_is_not_trusted(g):
    """Device 0 is deleted behind the server's back (its state file stays) and added again with the
    same parameters by another tool: `list` shows none of the old server's data, `recover` refuses."""
    sh(g, "ublk add -t null -n 0 -q 1 -r 1 -s 64M >/dev/null && test -s /run/ubdsrv/dev0.json")
    r = sh(g, f"PYTHONPATH={GUEST_UBD_DIR} python3 - <<'EOF'\n" + r"""
from ubdsrv import daemon, uapi
from ubdsrv.ctrl import Ctrl

with Ctrl() as c:
    info = c.get_dev_info(0)
    st, why = daemon.read_state(0, info)
    print("before:", "trusted" if st else why)
    c.stop_dev(0)
    c.del_dev(0)                      # returns once the old server has closed /dev/ublkc0
    new = c.add_dev(uapi.DevInfo(dev_id=0, nr_hw_queues=1, queue_depth=info.queue_depth,
                                 max_io_buf_bytes=info.max_io_buf_bytes, flags=info.flags))
    assert all(getattr(new, k) == getattr(info, k) for k in daemon.IDENTITY), (new, info)
    st, why = daemon.read_state(0, new)
    print("after:", "trusted" if st else why)
    print("load_state:", daemon.load_state(0, new))
EOF
test -s /run/ubdsrv/dev0.json && echo "state file still there"
echo "--- list"; ublk list -n 0; echo "--- end"
ublk recover -n 0; echo "recover status $?"
""", timeout=120)
    out = r.stdout
    assert "before: trusted" in out, out
    assert re.search(r"after: .*dev0\.json is stale: device 0 was deleted and added again", out), out
    assert "load_state: None" in out and "state file still there" in out, out
    listing = out.split("--- list\n")[1].split("--- end")[0]
    assert "target" not in listing and "queue 0:" not in listing, listing
    assert re.search(r"recover status [12]\b", out), out
    assert "deleted and added again" in r.stderr, r.stderr


@pytest.mark.parametrize("inline", ["1", "0"], ids=["ring", "sync"])
def test_usercopy_loop_verify_and_the_file_holds_the_data(g, inline):
    """USER_COPY: the driver copies nothing into the server's buffers; the queue moves the data through
    /dev/ublkcN itself (ring: linked copy SQEs around the passthrough IO; sync: pread/pwrite around the
    target's work, UBDSRV_INLINE=0)."""
    add = sh(g, f"truncate -s 64M /root/ubd-uc.img && UBDSRV_INLINE={inline} "
                "ublk add -t loop -n 0 -q 2 --usercopy -f /root/ubd-uc.img && test -b /dev/ublkb0")
    assert "USER_COPY" in add.stdout, add.stdout
    fio = sh(g, "fio --name=uc --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite "
                "--bsrange=4k-512k --iodepth=32 --size=24M --verify=crc32c --verify_fatal=1 2>&1",
             timeout=900)
    assert "err= 0" in fio.stdout and not VERIFY_FAILURE.search(fio.stdout), fio.stdout
    dev_sum = sh(g, "sha256sum /dev/ublkb0").stdout.split()[0]
    log = sh(g, "ublk del -n 0 && cat /var/log/ubdsrv/dev0.log").stdout
    # the data went through this server into the file (and not, say, into a stray /dev/ublkb0 file)
    file_sum = sh(g, "sha256sum /root/ubd-uc.img").stdout.split()[0]
    assert dev_sum == file_sum
    assert file_sum != sh(g, "head -c 64M /dev/zero | sha256sum").stdout.split()[0]
    assert "user copy" not in log.split("LIVE")[-1], log[-2000:]   # no failed copy


def test_usercopy_null_serves_io(g):
    add = sh(g, "ublk add -t null -n 0 -q 2 -s 1G --usercopy && test -b /dev/ublkb0")
    assert "USER_COPY" in add.stdout, add.stdout
    fio = sh(g, "fio --name=ucn --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randrw "
                "--bs=4k --iodepth=64 --numjobs=2 --runtime=5 --time_based --group_reporting 2>&1")
    assert "err= 0" in fio.stdout, fio.stdout
    log = sh(g, "ublk del -n 0 && cat /var/log/ubdsrv/dev0.log").stdout
    served = sum(int(n) for n in re.findall(r"exiting \((\d+) completions", log.split("LIVE")[-1]))
    assert served > 1000, log[-2000:]
