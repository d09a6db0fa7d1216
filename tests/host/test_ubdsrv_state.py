"""The daemon's saved state (/run/ubdsrv/devN.json) is trusted only for the device that wrote it:
same boot, same kernel object (sysfs inode of ublkcN), same dev_info geometry and flags."""
import json

import pytest

from ubdsrv import daemon, uapi


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon, "STATE_DIR", str(tmp_path))
    monkeypatch.setattr(daemon, "boot_id", lambda: "boot-A")
    monkeypatch.setattr(daemon, "cdev_identity", lambda dev_id: 1000 + dev_id)
    return tmp_path


def _info(**kw):
    base = dict(nr_hw_queues=2, queue_depth=128, max_io_buf_bytes=512 << 10, dev_id=3, flags=0x4A,
                ublksrv_pid=4321, state=uapi.UBLK_S_DEV_LIVE)
    base.update(kw)
    return uapi.DevInfo(**base)


def _save(dev_id=3, **over):
    st = {"dev_id": dev_id, "daemon_pid": 4321, "target": {"name": "null", "dev_size": 1 << 20},
          "boot_id": "boot-A", "cdev_ino": 1000 + dev_id, "queues": []}
    st.update((k, getattr(_info(), k)) for k in daemon.IDENTITY)
    st.update(over)
    daemon.save_state(dev_id, st)
    return st


def test_matching_state_is_returned(state_dir):
    st = _save()
    assert daemon.load_state(3, _info()) == st
    # the server's pid is not part of the identity: STOP_DEV sets it to -1, recovery to the new one
    assert daemon.read_state(3, _info(ublksrv_pid=-1, state=uapi.UBLK_S_DEV_DEAD)) == (st, None)


def test_missing_and_unreadable_state(state_dir):
    st, why = daemon.read_state(3, _info())
    assert st is None and "no saved state" in why and "dev3.json" in why
    (state_dir / "dev3.json").write_text("{not json")
    st, why = daemon.read_state(3, _info())
    assert st is None and "unreadable" in why


def test_recreated_device_is_not_trusted(state_dir, monkeypatch):
    _save()
    monkeypatch.setattr(daemon, "cdev_identity", lambda dev_id: 2000)   # a new kernel object
    st, why = daemon.read_state(3, _info())
    assert st is None and "deleted and added again" in why
    assert daemon.load_state(3, _info()) is None


@pytest.mark.parametrize("field, value", [("flags", 0x42), ("nr_hw_queues", 1), ("queue_depth", 64),
                                          ("max_io_buf_bytes", 1 << 20)])
def test_different_geometry_or_flags_is_not_trusted(state_dir, field, value):
    _save()
    st, why = daemon.read_state(3, _info(**{field: value}))
    assert st is None and field in why


def test_state_from_before_a_reboot_or_of_another_device_is_not_trusted(state_dir, monkeypatch):
    _save()
    monkeypatch.setattr(daemon, "boot_id", lambda: "boot-B")
    st, why = daemon.read_state(3, _info())
    assert st is None and "reboot" in why
    monkeypatch.setattr(daemon, "boot_id", lambda: "boot-A")
    (state_dir / "dev3.json").write_text(json.dumps(dict(_save(), dev_id=4)))
    st, why = daemon.read_state(3, _info())
    assert st is None and "does not describe device 3" in why


def test_state_without_identity_is_not_trusted(state_dir):
    """A file written by an older server (no boot_id/cdev_ino) proves nothing."""
    st = _save()
    for key in ("boot_id", "cdev_ino"):
        st.pop(key)
    daemon.save_state(3, st)
    assert daemon.load_state(3, _info()) is None
