"""What the guest tests share: a shell step that fails with its whole context, and the
clean-guest check around each test (ublk_drv loaded before; after: every device deleted, no server
process left, no kernel complaint in the test's part of dmesg, as vm/device.py defines one), and the
smallest scenario that drives the driver."""
from vm.device import find_splats

# The smallest scenario that drives the driver: a null device, two seconds of fio (job "short"), delete.
NULL_FIO_SCENARIO = """description = "a null device under a short fio, deleted"
[devices.ubd]
target = "null"
size = "64M"
[[steps]]
do = "add"
device = "ubd"
[[steps]]
do = "fio"
device = "ubd"
job = "short"
runtime = 2
[[steps]]
do = "delete"
device = "ubd"
"""


def sh(g, script, timeout=300, ok=True):
    """Runs script (under `set -u`) in the guest; with ok, any status but 0 fails the test."""
    r = g.exec("set -u\n" + script, timeout=timeout)
    if ok:
        assert r.status == 0, f"status {r.status}\n--- script\n{script}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}"
    return r


def splats(text, allowed=None) -> list:
    """The kernel complaints in dmesg text; `allowed` (a pattern) drops the known ones."""
    return [line for _kind, line in find_splats(text.splitlines())
            if not (allowed and allowed.search(line))]


def checked(guest, allowed=None):
    """Generator for a fixture: yields the guest with ublk_drv loaded, then checks it was left clean."""
    sh(guest, "modprobe ublk_drv && test -c /dev/ublk-control")
    before = int(sh(guest, "dmesg | wc -l").stdout)
    yield guest
    left = guest.exec("timeout 150 ublk del -a; ls /dev/ublkb* /dev/ublkc* 2>/dev/null; "
                      "pgrep -f '[-]m ubdsrv' | sed 's/^/server left: /'; rm -f /root/ubd-*.img",
                      timeout=200)
    bad = splats(sh(guest, f"dmesg | tail -n +{before + 1}").stdout, allowed)
    assert not bad, "dmesg:\n" + "\n".join(bad)
    assert "/dev/ublk" not in left.stdout and "server left" not in left.stdout, left.stdout
