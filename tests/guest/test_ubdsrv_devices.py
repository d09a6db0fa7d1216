"""The Python ubd server against the guest's ublk_drv: add/list/del, data integrity through the null and
loop targets, filesystems, discard, NEED_GET_DATA, and refusals. Every test deletes its devices and
fails on a new BUG/WARNING/Oops line in dmesg."""
import re

import pytest

from .ublk_guest import checked, sh



@pytest.fixture
def g(guest):
    """The shared guest with ublk_drv loaded; afterwards: no device, no server, dmesg clean."""
    yield from checked(guest)


def parse_list(text):
    """`ublk list` output -> dict per device (fields by position, as scripts read them)."""
    devs = {}
    cur = None
    for line in text.splitlines():
        f = line.split()
        if line.startswith("dev id "):
            cur = {"id": int(f[2].rstrip(":")), "nr_hw_queues": int(f[4]), "queue_depth": int(f[6]),
                   "block_size": int(f[9]), "dev_capacity": int(f[11]), "queues": []}
            devs[cur["id"]] = cur
        elif f[:3] == ["max", "rq", "size"]:
            cur["max_rq"], cur["pid"], cur["state"] = int(f[3]), int(f[6]), f[8]
        elif f[:1] == ["flags"]:
            cur["flags"] = int(f[1], 16)
            cur["flag_names"] = f[3:-1]
        elif f[:1] == ["ublkc:"]:
            cur["ublkc"], cur["ublkb"] = f[1], f[3]
        elif f[:1] == ["queue"]:
            cur["queues"].append(int(f[3]))
        elif f[:1] == ["target"]:
            cur["target"] = line.split("target ", 1)[1]
    return devs


def nproc(g):
    return int(sh(g, "nproc").stdout)


def test_features_prints_the_drivers_flags_as_ublksrv_does(g):
    # ublksrv's cmd_dev_get_features: "ublk_drv features: 0x%llx", then "\t%-20s: 0x%llx" per bit
    r = sh(g, "ublk features")
    first, *lines = r.stdout.splitlines()
    mask = int(first.removeprefix("ublk_drv features: "), 16)
    names, total = [], 0
    for line in lines:
        assert re.fullmatch(r"\t[A-Za-z_]{1,20} *: 0x[0-9a-f]+", line) and line.index(":") == 21, repr(line)
        name, value = line[1:].split(":")
        names.append(name.strip())
        total |= int(value, 16)
    assert total == mask and bin(mask).count("1") == len(lines)
    for expected in ("COMP_IN_TASK", "GET_DATA", "USER_RECOVERY", "RECOVERY_REISSUE", "CMD_IOCTL_ENCODE",
                     "USER_COPY"):
        assert expected in names, r.stdout


@pytest.mark.parametrize("target", ["null", "loop"])
@pytest.mark.parametrize("queues", [1, 4])
def test_add_list_del(g, target, queues):
    size = 256 << 20
    extra = f"-s {size}" if target == "null" else "-f /root/ubd-disk.img"
    add = sh(g, f"truncate -s {size} /root/ubd-disk.img && ublk add -t {target} -n 0 -q {queues} -d 64 {extra}")
    dev = parse_list(add.stdout)[0]
    lst = parse_list(sh(g, "ublk list -n 0").stdout)[0]
    assert dev == lst
    want_q = min(queues, nproc(g))
    assert dev["nr_hw_queues"] == want_q and len(dev["queues"]) == want_q
    assert dev["queue_depth"] == 64 and dev["block_size"] == 512
    assert dev["dev_capacity"] == size // 512 and dev["state"] == "LIVE"
    assert f'"name":"{target}"' in dev["target"]
    pids = [dev["pid"], *dev["queues"]]
    assert all(p > 1 for p in pids)
    r = sh(g, f"blockdev --getsize64 /dev/ublkb0; for p in {' '.join(map(str, pids))}; do "
              "test -d /proc/$p || echo missing $p; done; dd if=/dev/ublkb0 of=/dev/null bs=64k count=16 "
              "iflag=direct status=none && echo read-ok")
    assert r.stdout.split() == [str(size), "read-ok"]
    sh(g, "ublk del -n 0")
    r = sh(g, f"ls /dev/ublkb0 /dev/ublkc0 2>&1; for p in {' '.join(map(str, pids))}; do "
              "test -d /proc/$p && echo alive $p; done; ublk list", ok=False)
    assert "alive" not in r.stdout and "dev id" not in r.stdout
    assert r.stdout.count("No such file") == 2


def test_fio_verify_on_4_queue_loop_and_the_file_holds_the_data(g):
    sh(g, "truncate -s 256M /root/ubd-verify.img && ublk add -t loop -n 0 -q 4 -f /root/ubd-verify.img")
    fio = sh(g, "fio --name=verify --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite "
                "--bs=4k --iodepth=64 --numjobs=2 --size=32M --offset_increment=64M --verify=crc32c "
                "--verify_fatal=1 --group_reporting 2>&1", timeout=900)
    assert "err= 0" in fio.stdout, fio.stdout   # fio exits non-zero on any verify mismatch
    dev_sum = sh(g, "sync; sha256sum /dev/ublkb0").stdout.split()[0]
    sh(g, "ublk del -n 0")
    file_sum = sh(g, "sha256sum /root/ubd-verify.img").stdout.split()[0]
    assert dev_sum == file_sum


def test_mkfs_mount_write_umount_fsck(g):
    r = sh(g, """set -e
truncate -s 512M /root/ubd-fs.img
ublk add -t loop -n 0 -q 2 -f /root/ubd-fs.img >/dev/null
mkfs.ext4 -q -F /dev/ublkb0
mkdir -p /mnt/ubd && mount /dev/ublkb0 /mnt/ubd
dd if=/dev/urandom of=/mnt/ubd/a bs=1M count=24 status=none
cp /mnt/ubd/a /mnt/ubd/b && mkdir /mnt/ubd/d && echo hello > /mnt/ubd/d/h
sha256sum /mnt/ubd/a | cut -d' ' -f1 > /root/ubd-sum
rm /mnt/ubd/b && fstrim -v /mnt/ubd
umount /mnt/ubd
fsck.ext4 -n -f /dev/ublkb0 && echo "fsck clean"
mount /dev/ublkb0 /mnt/ubd
test "$(sha256sum /mnt/ubd/a | cut -d' ' -f1)" = "$(cat /root/ubd-sum)" && cat /mnt/ubd/d/h
umount /mnt/ubd
""", timeout=600)
    assert "hello" in r.stdout and "trimmed" in r.stdout
    assert "fsck clean" in r.stdout   # fsck -n exits non-zero on any inconsistency


def test_discard_punches_and_write_zeroes_zero_the_file(g):
    r = sh(g, """set -e
head -c 16M /dev/urandom > /root/ubd-z.img
ublk add -t loop -n 0 -f /root/ubd-z.img >/dev/null
before=$(du -k /root/ubd-z.img | cut -f1)
blkdiscard -o 4M -l 4M /dev/ublkb0
blkdiscard -z -o 8M -l 4M /dev/ublkb0
ublk del -n 0
after=$(du -k /root/ubd-z.img | cut -f1)
echo "blocks $before $after"
cmp -n 8M -i 4M:0 /root/ubd-z.img /dev/zero && echo zeroed
""")
    before, after = map(int, r.stdout.split("blocks ")[1].split()[:2])
    assert r.stdout.strip().endswith("zeroed")
    # The discarded 4 MiB were punched out (ext4 may keep an extent block or two more).
    assert after <= before - 4096 + 64, r.stdout


@pytest.mark.parametrize("opts", ["-g 1", "--buffered_io", "-g 1 --buffered_io"])
def test_loop_variants_verify(g, opts):
    add = sh(g, f"truncate -s 64M /root/ubd-v.img && ublk add -t loop -n 0 -q 2 {opts} -f /root/ubd-v.img")
    dev = parse_list(add.stdout)[0]
    assert ("NEED_GET_DATA" in dev["flag_names"]) == ("-g 1" in opts)
    fio = sh(g, "fio --name=v --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite "
                "--bsrange=4k-128k --iodepth=32 --size=16M --verify=crc32c --verify_fatal=1 2>&1",
             timeout=600)
    assert "err= 0" in fio.stdout, fio.stdout


def test_null_with_deep_queue_and_flush(g):
    sh(g, "ublk add -t null -n 0 -q 2 -d 256 -s 1G >/dev/null")
    fio = sh(g, "fio --name=n --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randrw "
                "--bs=4k --iodepth=128 --numjobs=2 --fsync=8 --runtime=5 --time_based 2>&1", timeout=300)
    assert "err= 0" in fio.stdout, fio.stdout


def test_refusals_are_clear_and_leave_nothing_behind(g):
    sh(g, "ublk add -t null -n 3 -s 64M >/dev/null")
    r = sh(g, "ublk add -t null -n 3 -s 64M", ok=False)
    assert r.status == 1 and "ADD_DEV failed" in r.stderr and "EEXIST" in r.stderr, r.stderr
    assert parse_list(sh(g, "ublk list -n 3").stdout)[3]["state"] == "LIVE"   # untouched
    r = sh(g, "ublk add -t null -s 64M -e 1", ok=False)
    feats = sh(g, "ublk features").stdout
    if "RECOVERY_FAIL_IO" in feats:
        assert r.status == 0
    else:
        assert r.status == 2 and "-e 1" in r.stderr and "USER_RECOVERY_FAIL_IO" in r.stderr, r.stderr
    # deleting a device that does not exist is no error for ublksrv's `ublk del` either
    r = sh(g, "ublk del -n 9", ok=False)
    assert r.status == 0 and "device 9 does not exist" in r.stderr, r.stderr
    r = sh(g, "ublk recover -n 3", ok=False)
    assert r.status == 1 and "-r 1" in r.stderr
    # a server that cannot start (queue rings refused) leaves no device behind
    r = sh(g, "UBDSRV_RING_FLAGS=0x80000000 ublk add -t null -n 5 -s 64M", ok=False)
    assert r.status == 1 and "server for device 5 failed to start" in r.stderr, r.stderr
    assert "io_uring_setup" in r.stderr and "/var/log/ubdsrv/dev5.log" in r.stderr, r.stderr
    left = sh(g, "ls /dev/ublkc5 /dev/ublkb5 2>&1; ublk list -n 5", ok=False)
    assert left.stdout.count("No such file") == 2 and "ENODEV" in left.stderr, (
        left.stdout + left.stderr + "\nthe add said: " + r.stderr
        + sh(g, "tail -n 40 /var/log/ubdsrv/dev5.log", ok=False).stdout)
    sh(g, "ublk del -a")
    assert "dev id" not in sh(g, "ublk list").stdout


def test_add_u1_sets_comp_in_task_and_serves(g):
    # -u is ublksrv's --uring_comp (URING_CMD_COMP_IN_TASK), not zero copy
    dev = parse_list(sh(g, "ublk add -t null -n 0 -u 1 -s 64M").stdout)[0]
    assert "URING_CMD_COMP_IN_TASK" in dev["flag_names"] and dev["state"] == "LIVE"
    r = sh(g, "dd if=/dev/ublkb0 of=/dev/null bs=64k count=64 iflag=direct status=none && echo read-ok")
    assert "read-ok" in r.stdout
    r = sh(g, "ublk add -t null -n 1 -z", ok=False)
    assert r.status == 2 and "-z: zero copy" in r.stderr and not r.stdout
    assert "No such file" in sh(g, "ls /dev/ublkc1 2>&1", ok=False).stdout


def test_del_blocks_until_the_id_is_free_and_async_does_not(g):
    # ublksrv's del: STOP_DEV, then DEL_DEV, which returns once the last opener of /dev/ublkbN closed
    # it (the id is free then); --async: DEL_DEV_ASYNC, the id is freed at that last close. A reader
    # holds the disk open; no timing is assumed (`ublk` takes seconds to start under TCG).
    r = sh(g, """
gone() { for i in $(seq 120); do [ -e /sys/class/ublk-char/ublkc0 ] || return 0; sleep 0.25; done; return 1; }
ublk add -t null -n 0 -s 64M >/dev/null || exit 1
sleep 60 < /dev/ublkb0 & R=$!
ublk del -n 0 & D=$!
gone && echo removed
sleep 2
kill -0 $D 2>/dev/null && echo del-waits
kill $R; wait $R
wait $D; echo "del status $?"
ublk add -t null -n 0 -s 64M >/dev/null && echo id-free
sleep 60 < /dev/ublkb0 & R=$!
ublk del -n 0 --async; echo "async status $?"
kill -0 $R 2>/dev/null && echo reader-still-open
ublk add -t null -n 0 -s 64M 2>&1 >/dev/null | grep -o EEXIST
kill $R; wait $R
sleep 1
ublk list -n 0 2>&1 | grep -o ENODEV
true
""", timeout=400)
    for needle in ("removed", "del-waits", "del status 0", "id-free", "async status 0", "reader-still-open",
                   "EEXIST", "ENODEV"):
        assert needle in r.stdout, (needle, r.stdout, r.stderr)


def test_list_of_a_dead_daemon_keeps_the_saved_queue_lines(g):
    add = parse_list(sh(g, "ublk add -t null -n 0 -q 2 -s 64M").stdout)[0]
    pid, tids = add["pid"], add["queues"]
    assert pid > 1 and len(tids) == min(2, nproc(g))
    r = sh(g, f"""grep -q ubdsrv /proc/{pid}/cmdline && kill -9 {pid}
for i in $(seq 60); do ublk list -n 0 | grep -q 'state DEAD' && break; sleep 0.5; done
ublk list -n 0""")
    dev = parse_list(r.stdout)[0]
    assert dev["state"] == "DEAD", r.stdout
    # as ublksrv prints its JSON's queue lines whether or not the daemon lives
    assert dev["queues"] == tids and '"name":"null"' in dev["target"], r.stdout
    assert sh(g, "ublk list -n 0 -v").stdout.startswith("{\n    \"dev_info\": {")


@pytest.mark.parametrize("target", ["null", "loop"])
def test_usercopy(g, target):
    extra = "-s 256M" if target == "null" else "-f /root/ubd-uc.img"
    add = sh(g, f"truncate -s 256M /root/ubd-uc.img && ublk add -t {target} -n 0 -q 2 --usercopy {extra}")
    assert "USER_COPY" in parse_list(add.stdout)[0]["flag_names"]
    if target == "null":    # keeps no data: IO must just complete
        fio = sh(g, "fio --name=uc --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randrw "
                    "--bs=4k --iodepth=32 --size=64M --runtime=5 --time_based 2>&1", timeout=300)
    else:
        fio = sh(g, "fio --name=uc --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite "
                    "--bsrange=4k-256k --iodepth=32 --size=32M --verify=crc32c --verify_fatal=1 2>&1",
                 timeout=600)
    assert "err= 0" in fio.stdout, fio.stdout


def test_loop_on_4k_sector_storage_uses_4k_blocks(g):
    # a kernel loop device with 4096-byte sectors: O_DIRECT on it needs 4 KiB alignment, so the ublk
    # device must have 4096-byte logical blocks (ublksrv: BLKSSZGET)
    try:
        r = sh(g, """set -e
modprobe loop
truncate -s 128M /root/ubd-4k.img
LO=$(losetup --sector-size 4096 --direct-io=on -f --show /root/ubd-4k.img)
echo "lo $LO $(cat /sys/block/${LO#/dev/}/queue/logical_block_size)"
ublk add -t loop -n 0 -q 2 -f $LO
echo "lbs $(cat /sys/block/ublkb0/queue/logical_block_size) pbs $(cat /sys/block/ublkb0/queue/physical_block_size)"
""")
        lo = r.stdout.split("lo ")[1].split()
        assert lo[1] == "4096", r.stdout
        assert "lbs 4096 pbs 4096" in r.stdout, r.stdout
        dev = parse_list(r.stdout)[0]
        assert dev["block_size"] == 4096 and dev["dev_capacity"] == (128 << 20) // 512
        assert f'"backing_file":"{lo[0]}"' in dev["target"] and '"direct_io":1' in dev["target"]
        fio = sh(g, "fio --name=v4k --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite "
                    "--bsrange=4k-128k --iodepth=32 --size=48M --verify=crc32c --verify_fatal=1 2>&1",
                 timeout=600)
        assert "err= 0" in fio.stdout, fio.stdout
        r = sh(g, "dd if=/dev/ublkb0 of=/dev/null bs=512 count=1 iflag=direct 2>&1", ok=False)
        assert r.status != 0 and "Invalid argument" in r.stdout, r.stdout   # the block layer refuses 512
        # discard on a block device: advertised (the loop device discards), served by BLKDISCARD
        r = sh(g, f"""set -e
test $(cat /sys/block/ublkb0/queue/discard_max_bytes) -gt 0
dd if=/dev/urandom of=/dev/ublkb0 bs=1M count=4 oflag=direct status=none
blkdiscard -o 0 -l 4M /dev/ublkb0
cmp -n 4M {lo[0]} /dev/zero && echo discarded""")
        assert "discarded" in r.stdout, r.stdout
    finally:
        g.exec("ublk del -n 0; losetup -j /root/ubd-4k.img -n -O NAME | xargs -r -n1 losetup -d",
               timeout=120)


def test_loop_offset_skips_sectors_of_the_backing_file(g):
    # ublksrv's loop --offset NUM: the device starts NUM 512-byte sectors into the backing file
    r = sh(g, """set -e
head -c 8M /dev/urandom > /root/ubd-off.img
add=$(ublk add -t loop -n 0 --offset 2048 -f /root/ubd-off.img)
echo "$add" | grep -o '"offset":2048'
echo "cap $(blockdev --getsize64 /dev/ublkb0)"
cmp -n 7M -i 1M:0 /root/ubd-off.img /dev/ublkb0 && echo same-data
dd if=/dev/zero of=/dev/ublkb0 bs=4096 count=1 oflag=direct status=none
ublk del -n 0
cmp -n 4096 -i 1M:0 /root/ubd-off.img /dev/zero && echo write-landed-at-1M
cmp -n 1M /root/ubd-off.img /dev/zero >/dev/null 2>&1 || echo head-untouched
""")
    assert '"offset":2048' in r.stdout and f"cap {7 << 20}" in r.stdout, r.stdout
    for needle in ("same-data", "write-landed-at-1M", "head-untouched"):
        assert needle in r.stdout, r.stdout
