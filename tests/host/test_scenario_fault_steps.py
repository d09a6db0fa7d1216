"""The fault and crash steps without a VM: what the loader accepts and refuses before anything boots,
the machine's disks across a power cut, and `run-all` leaving the nightly scenarios out."""
import textwrap
from pathlib import Path

import pytest

from vm import machine
from vm.errors import SetupError
from vm.scenario import catalog, cli, loader
from vm.scenario.errors import ScenarioError

ON_DATA = """
description = "d"
[devices.pc]
target = "loop"
file = "/data/pc.img"
[devices.ubd]
target = "null"
queues = 2
"""


def load(tmp_path, steps, head=ON_DATA):
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(head) + textwrap.dedent(steps))
    return loader.load(p)


def refused(tmp_path, steps, head=ON_DATA) -> str:
    with pytest.raises(ScenarioError) as e:
        load(tmp_path, steps, head)
    return str(e.value)


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v).replace("'", '"')


def step(kind, **kw):
    return f"[[steps]]\ndo = \"{kind}\"\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in kw.items())


CUT_AND_CHECK = (step("add", device="pc") + step("mount", device="pc") +
                 step("write_acked", device="pc") + step("power_cut") + step("add", device="pc") +
                 step("mount", device="pc") + step("verify_acked", device="pc") +
                 step("umount", device="pc") + step("delete", device="pc"))


def test_a_power_cut_case_loads_and_ends_the_old_boots_devices(tmp_path):
    [case] = load(tmp_path, CUT_AND_CHECK)
    assert [s.kind for s in case.steps][3] == "power_cut"
    # no umount or delete before the cut: the cut takes the device and its mount away
    assert case.steps[3].timeout == 300


def test_write_acked_needs_a_file_on_the_data_disk(tmp_path):
    head = ON_DATA.replace('file = "/data/pc.img"', 'file = "/var/tmp/pc.img"')
    msg = refused(tmp_path, CUT_AND_CHECK, head)
    assert "steps[2].device" in msg and 'must be on the data disk' in msg and '"/data/..."' in msg
    msg = refused(tmp_path, step("add", device="ubd") + step("mount", device="ubd") +
                  step("write_acked", device="ubd") + step("power_cut"))
    assert "keeps no data to check" in msg


def test_write_acked_must_end_in_a_cut_and_verify_must_follow_one(tmp_path):
    msg = refused(tmp_path, step("add", device="pc") + step("mount", device="pc") +
                  step("write_acked", device="pc") + step("umount", device="pc"))
    assert "write_acked writes on 'pc' until the power_cut or reboot" in msg
    msg = refused(tmp_path, step("add", device="pc") + step("mount", device="pc") +
                  step("verify_acked", device="pc") + step("umount", device="pc") +
                  step("delete", device="pc"))
    assert "no write_acked on 'pc' before a power_cut or reboot" in msg


def test_after_a_cut_nothing_of_the_old_boot_is_there(tmp_path):
    msg = refused(tmp_path, step("add", device="pc") + step("reboot") + step("delete", device="pc"))
    assert "steps[2].device" in msg and "not added at this point" in msg
    fio = step("fio", device="pc", job="bg", background=True)
    msg = refused(tmp_path, step("add", device="pc") + fio + step("power_cut") +
                  step("wait", job="bg"))
    assert "fio job 'bg' ended with its boot" in msg


def test_module_reload_wants_no_ublk_device(tmp_path):
    msg = refused(tmp_path, step("add", device="ubd") + step("module_reload") +
                  step("delete", device="ubd"))
    assert "ublk_drv cannot unload while a ublk device exists (added: ubd)" in msg
    load(tmp_path, step("module_reload") + step("add", device="ubd") + step("delete", device="ubd"))


def test_signals_check_the_queue_and_reach_a_device_being_deleted(tmp_path):
    msg = refused(tmp_path, step("add", device="ubd") + step("stop", device="ubd", queue=2) +
                  step("delete", device="ubd"))
    assert "expected a queue index below 2" in msg
    [case] = load(tmp_path, step("add", device="ubd") + step("stop", device="ubd") +
                  step("delete", device="ubd", background=True) + step("cont", device="ubd") +
                  step("wait_state", device="ubd", state="GONE"))
    assert case.steps[2].args["background"] is True
    msg = refused(tmp_path, step("add", device="ubd") + step("delete", device="ubd", background=True))
    assert "the background delete of 'ubd' is never waited for" in msg


def test_an_add_that_must_fail_leaves_no_device(tmp_path):
    [case] = load(tmp_path, step("add", device="ubd", expect="fails") + step("add", device="ubd") +
                  step("delete", device="ubd"))
    assert case.steps[0].args["expect"] == "fails"
    msg = refused(tmp_path, step("add", device="ubd", expect="fails") + step("delete", device="ubd"))
    assert "not added at this point" in msg


def test_signal_steps_refuse_the_kernel_loop_driver(tmp_path):
    head = 'description = "d"\n[devices.k]\ntarget = "kernel_loop"\nfile = "/data/k.img"\n'
    for kind in ("stop", "cont", "terminate", "update_size", "quiesce"):
        extra = {"size": "1G"} if kind == "update_size" else {}
        msg = refused(tmp_path, step("add", device="k") + step(kind, device="k", **extra) +
                      step("delete", device="k"), head)
        assert f"{kind} needs a ublk device" in msg, kind


def test_nightly_is_a_scenario_key_and_run_all_leaves_it_out(tmp_path, monkeypatch, capsys):
    [case] = load(tmp_path, step("add", device="ubd") + step("delete", device="ubd"),
                  ON_DATA.replace('description = "d"', 'description = "d"\nnightly = true'))
    assert case.nightly
    nightly = [p.stem for p in catalog.shipped() if any(c.nightly for c in loader.load(p))]
    assert {"recover_stress", "power_cut_kernel_loop"} <= set(nightly)
    ran = []
    monkeypatch.setattr(cli, "run_cases", lambda cases, a: ran.append(cases) or 0)
    assert cli.main(["run-all"]) == 0
    assert not {c.scenario for c in ran[-1]} & set(nightly)
    err = capsys.readouterr().err
    assert "leaving out the nightly scenarios (" in err and all(n in err for n in nightly)
    assert cli.main(["run-all", "--nightly"]) == 0
    assert set(nightly) <= {c.scenario for c in ran[-1]}
    assert cli.main(["run", "recover_stress"]) == 0      # asked for by name: it runs
    assert {c.scenario for c in ran[-1]} == {"recover_stress"}


class FakeImage:
    kernel, initrd, rootfs = Path("/k"), Path("/i"), Path("/r")


def test_the_data_disk_is_raw_and_honours_flushes(tmp_path):
    m = machine.Machine(FakeImage(), tmp_path, data_disk=True)
    m.accel, m.port = "tcg", 2222
    argv = m._cmdline("qemu")
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives[1] == f"file={tmp_path}/data.raw,if=virtio,format=raw,cache=writeback"
    assert "cache=unsafe" not in drives[1]
    assert any(a.endswith("append=on") for a in argv)   # a second boot appends to the console log
    assert len([a for a in machine.Machine(FakeImage(), tmp_path)._cmdline("qemu")
                if a == "-drive"]) == 1


def test_booting_again_needs_the_previous_boots_disks(tmp_path, monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda name: "/usr/bin/" + name)
    m = machine.Machine(FakeImage(), tmp_path, data_disk=True)
    m.accel = "tcg"
    with pytest.raises(SetupError, match="boot again without the previous boot's disks"):
        m.start(fresh=False)
