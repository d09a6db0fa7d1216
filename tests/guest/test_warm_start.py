"""Warm start on real guests (vm/warm.py): a cold boot saves the booted guest, two guests restored
from that state at once are apart (own overlays, own randomness), have the host's time, drive the
real ublk driver, and a power cut of a restored guest boots its own disks cold.

These tests use a memory size of their own (TEST_MEMORY) so the state they delete and create is
theirs, never the one other runs restore from."""
import hashlib
import json
import shutil
import subprocess
import threading
import time
from dataclasses import replace

import pytest

from vm import image, options, warm
from vm.guest import Guest, GuestOptions
from vm.machine import Machine

pytestmark = pytest.mark.guest

TEST_MEMORY = "1536M"
BROKEN_MEMORY = "1280M"   # the shape of the broken state: a restore that must fall back


def _opts(config, tmp_path, name, **kw) -> GuestOptions:
    said = []
    o = GuestOptions(**{**options.values(config.option), "memory": TEST_MEMORY, "cold": False},
                     run_dir=options.pytest_run_dir(config) / tmp_path.name / name, log=lambda msg: (said.append(msg), print(msg, flush=True)))
    o = replace(o, **kw)
    o.said = said
    return o


def _state_of(o: GuestOptions) -> warm.State:
    m = Machine(image.ensure(o.flavour, log=o.log), o.run_dir, cpus=o.cpus, memory=o.memory,
                accel=o.accel, data_disk=o.data_disk, log=o.log)
    try:
        return m.warm_state()
    finally:
        m.kill()


def _digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sh(g, cmd, timeout=120) -> str:
    r = g.exec(cmd, timeout=timeout)
    assert r.ok, f"{cmd}: exit {r.status}\n{r.stdout}\n{r.stderr}"
    return r.stdout


class BothStarted:
    """Starts two guests at once, each from a thread of its own that lives as long as its guest:
    QEMU gets PR_SET_PDEATHSIG (vm/machine.py), which fires when the thread that started it ends."""

    def __init__(self, opts_list):
        self.guests = [Guest(o) for o in opts_list]
        self.started = [threading.Event() for _ in self.guests]
        self.done = threading.Event()
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(len(self.guests))]

    def _run(self, i):
        g = self.guests[i]
        try:
            g.start()
        except BaseException as e:   # reported by __enter__
            self.errors.append(e)
        self.started[i].set()
        self.done.wait()
        g.stop()

    def __enter__(self):
        for t in self.threads:
            t.start()
        for e in self.started:
            e.wait()
        if self.errors:
            self.__exit__()
            raise self.errors[0]
        return self.guests

    def __exit__(self, *exc):
        self.done.set()
        for t in self.threads:
            t.join()


def test_two_guests_restored_from_one_saved_boot(pytestconfig, tmp_path):
    first = _opts(pytestconfig, tmp_path, "cold")
    state = _state_of(first)
    shutil.rmtree(state.dir, ignore_errors=True)   # this test's own shape: start from no state
    with Guest(first) as g:
        assert g.machine.restored_from is None, "with no saved state the first guest boots cold"
        assert any("no saved state" in m for m in first.said), first.said
        _sh(g, "true")   # the saved guest runs on after the save
    assert state.complete(), f"the cold boot left no complete state in {state.dir}"
    meta = json.loads(state.meta.read_text())
    assert meta["memory"] == TEST_MEMORY and meta["data_disk"] is False
    base = {f: _digest(f) for f in (state.root, state.vmstate)}

    a_opts, b_opts = (_opts(pytestconfig, tmp_path, n) for n in ("warm-a", "warm-b"))
    with BothStarted([a_opts, b_opts]) as (a, b):
        for g, o in ((a, a_opts), (b, b_opts)):
            assert g.machine.restored_from == state, f"both guests start from the saved state: {o.said}"
            assert g.machine.overlay.exists() and g.machine.overlay.parent == g.machine.run_dir
        assert a.machine.port != b.machine.port

        # own overlays: a file written in one is not in the other
        for g, text in ((a, "written in A"), (b, "written in B")):
            _sh(g, f"echo '{text}' > /root/warm-mark && sync")
        assert _sh(a, "cat /root/warm-mark").strip() == "written in A"
        assert _sh(b, "cat /root/warm-mark").strip() == "written in B"

        # own randomness: the CRNG state was saved once, each guest reseeded after the restore
        draws = [_sh(g, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").strip() for g in (a, b)]
        assert len(draws[0]) == 64 and draws[0] != draws[1], draws
        for g in (a, b):
            assert "crng reseeded due to virtual machine fork" in _sh(g, "dmesg")

        # the host's time, not the save's
        for g in (a, b):
            before = time.time()
            guest_now = float(_sh(g, "date +%s.%N"))
            assert before - 3 <= guest_now <= time.time() + 3, (guest_now, before)

        # the real driver in a restored guest
        out = _sh(a, "modprobe ublk_drv && ublk add -t null -n 0 -s 64M >/dev/null && "
                     "dd if=/dev/ublkb0 of=/dev/null bs=1M count=8 iflag=direct 2>&1 && "
                     "ublk del -n 0 && ! test -e /dev/ublkb0 && echo ublk-ok", timeout=300)
        assert "8388608 bytes" in out and "ublk-ok" in out, out
        dmesg = _sh(a, "dmesg")
        assert "BUG" not in dmesg and "WARNING" not in dmesg, dmesg[-3000:]

        # a power cut of a restored guest boots its own disks cold: what it synced is still there
        b.power_cut()
        b.boot_again()
        assert b.machine.console_contains(b"Linux version"), "boot_again() must boot, not restore"
        assert _sh(b, "cat /root/warm-mark").strip() == "written in B"
    assert {f: _digest(f) for f in base} == base, "the saved state changed under its guests"


def test_a_state_that_does_not_restore_falls_back_to_a_cold_boot(pytestconfig, tmp_path):
    o = _opts(pytestconfig, tmp_path, "broken", memory=BROKEN_MEMORY)
    state = _state_of(o)
    shutil.rmtree(state.dir, ignore_errors=True)
    state.dir.mkdir()
    state.vmstate.write_bytes(b"QEVM but not a migration stream")
    state.meta.write_text("{}")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(image.ensure(o.flavour, log=o.log).rootfs), str(state.root)], check=True)
    try:
        with Guest(o) as g:
            assert g.machine.restored_from is None
            assert _sh(g, "echo alive").strip() == "alive"
        fallbacks = [m for m in o.said if "warm start: restoring" in m and "cold boot" in m]
        assert len(fallbacks) == 1, o.said
        assert (o.run_dir / "console.restore-failed.log").exists()
    finally:
        shutil.rmtree(state.dir, ignore_errors=True)
