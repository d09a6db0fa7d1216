"""The mem target (ubdsrv/targets/mem.py) against the guest's ublk_drv: every queue process serves the
same memory (fio verify across 4 queues, and data written through one queue read back through
another), discard gives the pages back and reads zeros after, ext4 lives on it, and `ublk help` and
`ublk list` know it. Every test ends with no device, no server and a clean dmesg."""
import json

import pytest

from .ublk_guest import checked, sh


@pytest.fixture
def g(guest):
    yield from checked(guest)


def _shmem_kib(g) -> int:
    return int(sh(g, "awk '/^Shmem:/ {print $2}' /proc/meminfo").stdout)


def test_four_queues_share_the_data_and_discard_frees_it(g):
    assert "-t mem:" in sh(g, "ublk help").stdout
    before = _shmem_kib(g)
    sh(g, "ublk add -t mem -n 0 -q 4 -s 64M >/dev/null")
    line = [x for x in sh(g, "ublk list -n 0").stdout.splitlines() if x.strip().startswith("target ")]
    target = json.loads(line[0].strip()[len("target "):])
    assert target["name"] == "mem" and target["dev_size"] == 64 << 20, target
    assert sh(g, "cat /sys/block/ublkb0/queue/logical_block_size").stdout.strip() == "4096"
    # fio's jobs land on all four queues: a queue with memory of its own would fail the verify
    r = sh(g, "fio --name=v --filename=/dev/ublkb0 --ioengine=io_uring --direct=1 --rw=randwrite "
              "--bs=4k --size=8M --numjobs=4 --offset_increment=8M --iodepth=8 --verify=crc32c "
              "--verify_fatal=1 --group_reporting --output-format=json", timeout=300)
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_kbytes"] == 32 << 10, job["write"]
    assert job["read"]["io_kbytes"] == 32 << 10, job["read"]   # the verify pass read it all back
    grew = _shmem_kib(g) - before
    assert grew >= 30 << 10, f"Shmem grew by {grew} KiB after 32 MiB written"
    # written on one CPU, read on the other: another queue (and process) serves the read
    sh(g, "taskset -c 0 dd if=/dev/urandom of=/root/ubd-pattern bs=1M count=4 status=none && "
          "taskset -c 0 dd if=/root/ubd-pattern of=/dev/ublkb0 bs=1M seek=40 oflag=direct status=none && "
          "taskset -c 1 dd if=/dev/ublkb0 of=/root/ubd-back bs=1M skip=40 count=4 iflag=direct status=none && "
          "cmp /root/ubd-pattern /root/ubd-back")
    # discard: whole pages go back (Shmem falls), the range reads zeros, the rest is kept
    sh(g, "blkdiscard -o 0 -l 32M /dev/ublkb0")
    freed = _shmem_kib(g) - before
    assert freed < 8 << 10, f"Shmem still {freed} KiB above the start after discarding 32 MiB"
    sh(g, "cmp -n 32M /dev/ublkb0 /dev/zero && "
          "dd if=/dev/ublkb0 bs=1M skip=40 count=4 iflag=direct status=none | cmp - /root/ubd-pattern")
    sh(g, "ublk del -n 0 && rm -f /root/ubd-pattern /root/ubd-back")


def test_ext4_on_mem_keeps_files_until_the_device_goes(g):
    sh(g, "ublk add -t mem -n 0 -s 128M >/dev/null && mkfs.ext4 -q /dev/ublkb0 && mkdir -p /mnt/ubdm && "
          "mount /dev/ublkb0 /mnt/ubdm && head -c 8M /dev/urandom > /root/ubd-m && "
          "cp /root/ubd-m /mnt/ubdm/f && umount /mnt/ubdm && "
          "mount /dev/ublkb0 /mnt/ubdm && cmp /root/ubd-m /mnt/ubdm/f && umount /mnt/ubdm")
    sh(g, "ublk del -n 0 && rm -f /root/ubd-m")


def test_bad_sizes_are_refused_before_any_device_exists(g):
    for size, said in (("1K", "at least 4096 bytes"), ("64T", "more than this machine's memory")):
        r = sh(g, f"ublk add -t mem -s {size}", ok=False)
        assert r.status == 2 and said in r.stderr, (r.status, r.stderr)
    assert sh(g, "ls /dev/ublkb* 2>/dev/null | wc -l").stdout.strip() == "0"
