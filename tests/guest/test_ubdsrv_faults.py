"""Daemon kills, each in a fresh guest: without recovery the device goes DEAD and IO fails instead of
hanging; with `-r 1 -i 1` it goes QUIESCED, `ublk recover` brings it back LIVE and a verify workload
spanning the kill passes."""
import re

from .ublk_guest import splats

# shell helpers: fields by position, as existing scripts read `ublk list`; never signal an unchecked pid
HELPERS = r"""
state() { ublk list -n $1 2>/dev/null | awk 'NR==2{print $9}'; }
dpid() { ublk list -n $1 2>/dev/null | awk 'NR==2{print $7}'; }
killd() {
  p=$(dpid $1)
  case "$p" in ''|*[!0-9]*|0|1) echo "refusing to kill pid '$p'"; exit 90;; esac
  grep -q ubdsrv /proc/$p/cmdline || { echo "pid $p is not a ubdsrv daemon"; exit 91; }
  kill -9 $p; echo "killed $p"
}
wait_state() {  # dev state timeout_s
  t0=$(date +%s)
  while [ "$(state $1)" != "$2" ]; do
    [ $(( $(date +%s) - t0 )) -ge $3 ] && { echo "state $(state $1) not $2 after $3 s"; exit 92; }
    sleep 0.5
  done
  echo "$2 after $(( $(date +%s) - t0 )) s"
}
fio_status() {  # pid timeout_s: the background fio's exit status, or fail if it outlives the timeout
  t0=$(date +%s)
  while kill -0 $1 2>/dev/null; do
    [ $(( $(date +%s) - t0 )) -ge $2 ] && { echo "fio hangs"; exit 93; }
    sleep 0.5
  done
  wait $1; echo "fio status $?"
}
"""


def run(g, script, timeout=600):
    r = g.exec("set -u\n" + HELPERS + script, timeout=timeout)
    return r


def check_clean(g):
    # '[-]m ubdsrv' matches the servers' argv but not this shell's own command line
    r = g.exec("ls /dev/ublkb* /dev/ublkc* 2>/dev/null; pgrep -f '[-]m ubdsrv' | sed 's/^/server left: /'; "
               "modprobe -r ublk_drv && echo unloaded; dmesg", timeout=120)
    bad = splats(r.stdout)
    assert not bad, "dmesg:\n" + "\n".join(bad)
    assert "/dev/ublk" not in r.stdout and "server left" not in r.stdout, r.stdout[-3000:]
    assert "unloaded" in r.stdout, r.stdout[-3000:]


def test_kill_under_io_makes_the_device_dead_and_io_fail(fresh_guest):
    g = fresh_guest
    r = run(g, r"""
modprobe ublk_drv
truncate -s 256M /root/k.img
ublk add -t loop -n 0 -q 2 -f /root/k.img >/dev/null || exit 1
fio --name=k --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=64 \
    --numjobs=2 --runtime=120 --time_based > /root/fio.log 2>&1 &
FIO=$!
sleep 3
killd 0
wait_state 0 DEAD 30
fio_status $FIO 60
grep -c "error=Input/output error" /root/fio.log
timeout 60 ublk del -n 0 && echo deleted
""")
    assert r.status == 0, r.stdout + r.stderr
    assert "DEAD after" in r.stdout
    status = int(re.search(r"fio status (\d+)", r.stdout).group(1))
    assert status != 0, r.stdout
    assert "deleted" in r.stdout
    check_clean(g)


def test_kill_recover_keeps_a_verify_workload_correct(fresh_guest):
    g = fresh_guest
    r = run(g, r"""
modprobe ublk_drv
truncate -s 128M /root/r.img
ublk add -t loop -n 0 -q 2 -r 1 -i 1 -f /root/r.img | sed -n 3p
fio --name=r --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k \
    --iodepth=32 --size=48M --verify=crc32c --verify_fatal=1 > /root/fio.log 2>&1 &
FIO=$!
sleep 4
old=$(dpid 0)
killd 0
wait_state 0 QUIESCED 30
timeout 120 ublk recover -n 0 >/dev/null && echo recovered
wait_state 0 LIVE 10
new=$(dpid 0); [ "$new" != "$old" ] && echo "new daemon $new"
fio_status $FIO 400
# a second kill/recover cycle, idle this time
killd 0
wait_state 0 QUIESCED 30
timeout 120 ublk recover -n 0 >/dev/null && echo recovered-again
dd if=/dev/ublkb0 of=/dev/null bs=1M count=8 iflag=direct status=none && echo readable
timeout 60 ublk del -n 0 && echo deleted
tail -5 /root/fio.log
""", timeout=900)
    assert r.status == 0, r.stdout + r.stderr
    assert "RECOVERY_REISSUE" in r.stdout
    for word in ("QUIESCED after", "recovered", "new daemon", "fio status 0", "recovered-again",
                 "readable", "deleted"):
        assert word in r.stdout, r.stdout
    check_clean(g)


def test_delete_under_heavy_io_returns_and_fio_ends(fresh_guest):
    g = fresh_guest
    r = run(g, r"""
modprobe ublk_drv
ublk add -t null -n 0 -q 2 -s 1G >/dev/null
# randrw: on 6.12 reads of the deleted disk (capacity 0) return 0 bytes, so a pure time_based reader
# would spin until its runtime ends; the writes fail (ENOSPC) and end the job
fio --name=d --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randrw --bs=4k --iodepth=128 \
    --numjobs=2 --runtime=120 --time_based > /root/fio.log 2>&1 &
FIO=$!
sleep 3
t0=$(date +%s)
timeout 90 ublk del -n 0 && echo "deleted in $(( $(date +%s) - t0 )) s"
ls /dev/ublkb0 /dev/ublkc0 2>/dev/null && echo "nodes left"
fio_status $FIO 60
sleep 1; ublk add -t null -n 0 -s 64M >/dev/null && ublk del -n 0 && echo "id reusable"
""")
    assert r.status == 0, r.stdout + r.stderr
    for word in ("deleted in", "fio status", "id reusable"):
        assert word in r.stdout, r.stdout
    assert "nodes left" not in r.stdout
    check_clean(g)


def test_fail_io_recovery_fails_io_at_once_and_recovers_the_data(newer_kernel_guest):
    """`-r 1 -e 1` (UBLK_F_USER_RECOVERY_FAIL_IO, 6.13+): once the server dies, IO fails at once
    instead of waiting in the queue, and `recover` brings the device back LIVE with its data."""
    g = newer_kernel_guest
    r = run(g, r"""
modprobe ublk_drv
truncate -s 64M /root/e.img
ublk add -t loop -n 0 -q 2 -r 1 -e 1 -f /root/e.img | sed -n 3p
head -c 16M /dev/urandom > /root/pattern
dd if=/root/pattern of=/dev/ublkb0 bs=1M oflag=direct status=none && echo written
fio --name=e --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randread --bs=4k --iodepth=32 \
    --runtime=120 --time_based > /root/fio.log 2>&1 &
FIO=$!
sleep 3
killd 0
wait_state 0 FAIL_IO 30
fio_status $FIO 30
# with no server, a new read fails at once instead of queueing until recovery
t0=$(date +%s%N)
if timeout 20 dd if=/dev/ublkb0 of=/dev/null bs=4k count=1 iflag=direct status=none; then echo "read served"
else echo "read failed with $? after $(( ($(date +%s%N) - t0) / 1000000 )) ms"; fi
timeout 120 ublk recover -n 0 >/dev/null && echo recovered
wait_state 0 LIVE 10
echo "pattern $(sha256sum < /root/pattern | cut -c1-64)"
echo "device $(head -c 16M /dev/ublkb0 | sha256sum | cut -c1-64)"
timeout 60 ublk del -n 0 && echo deleted
""", timeout=600)
    out = r.stdout
    print(out)
    assert r.status == 0, out + r.stderr
    assert "RECOVERY_FAIL_IO" in out and "written" in out, out
    assert "FAIL_IO after" in out, out
    assert int(re.search(r"fio status (\d+)", out).group(1)) != 0, out
    failed = re.search(r"read failed with (\d+) after (\d+) ms", out)
    assert failed and failed.group(1) != "124", out   # 124: timeout killed dd, the read was stuck
    assert "recovered" in out and "LIVE after" in out, out
    pattern = re.search(r"pattern ([0-9a-f]{64})", out).group(1)
    assert f"device {pattern}" in out, out
    assert "deleted" in out, out
    check_clean(g)
