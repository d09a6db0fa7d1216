"""Scenario files: validation names file and key, matrix expansion, the static step walk."""
import textwrap

import pytest

from vm import device
from vm.scenario import loader
from vm.scenario.errors import ScenarioError

DEVICE = """
[devices.ubd]
target = "null"
"""
ADD_DEL = """
[[steps]]
do = "add"
device = "ubd"

[[steps]]
do = "delete"
device = "ubd"
"""


def load(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return loader.load(p)


def error(tmp_path, text) -> ScenarioError:
    with pytest.raises(ScenarioError) as e:
        load(tmp_path, text)
    assert e.value.exit_status == 2
    assert str(tmp_path / "s.toml") in str(e.value)
    return e.value


def test_minimal_scenario_gets_defaults(tmp_path):
    [case] = load(tmp_path, 'description = "d"\n' + DEVICE + ADD_DEL)
    d = case.devices["ubd"]
    assert (d.queues, d.depth, d.size, d.id, d.recovery) == (1, 128, 256 << 20, 0, False)
    assert case.id == "s" and case.loops == 1 and case.timeout == 600
    assert [s.kind for s in case.steps] == ["add", "delete"]
    assert case.steps[0].timeout == 60


def test_syntax_error_names_file_and_line(tmp_path):
    e = error(tmp_path, 'description = "x\n')
    assert "not valid TOML" in str(e) and "line 1" in str(e)


def test_unknown_top_level_key_suggests(tmp_path):
    e = error(tmp_path, 'description = "d"\nloop = 3\n' + DEVICE + ADD_DEL)
    assert e.key == "loop" and 'did you mean "loops"' in str(e)


def test_unknown_step_kind(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + ADD_DEL +
              '[[steps]]\ndo = "kil"\ndevice = "ubd"\n')
    assert e.key == "steps[2].do"
    assert "unknown step kind 'kil'" in str(e) and 'did you mean "kill"' in str(e)


def test_wrong_type(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'queues = "two"\n' + ADD_DEL)
    assert e.key == "devices.ubd.queues" and f"an integer from 1 to {device.UBLK['queues'].hi}" in str(e)


def test_bool_is_not_an_integer(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'depth = true\n' + ADD_DEL)
    assert e.key == "devices.ubd.depth"


def test_out_of_range(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'depth = 5000\n' + ADD_DEL)
    assert e.key == "devices.ubd.depth" and "got 5000" in str(e)


def test_unknown_key_in_step(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "add"\ndevice = "ubd"\nsignal = 9\n')
    assert e.key == "steps[0].signal" and "unknown key" in str(e)


def test_bad_signal(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "add"\ndevice = "ubd"\n'
              '[[steps]]\ndo = "kill"\ndevice = "ubd"\nsignal = "KIL"\n'
              '[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    assert e.key == "steps[1].signal" and "signal name" in str(e)


def test_signal_by_name_or_number(tmp_path):
    body = ('description = "d"\n' + DEVICE +
            '[[steps]]\ndo = "add"\ndevice = "ubd"\n'
            '[[steps]]\ndo = "kill"\ndevice = "ubd"\nsignal = "{}"\n'
            '[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    assert load(tmp_path, body.format("SIGTERM"))[0].steps[1].args["signal"] == 15
    assert load(tmp_path, body.format("stop"))[0].steps[1].args["signal"] == 19


def test_missing_device(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "add"\ndevice = "ubd2"\n')
    assert e.key == "steps[0].device" and "not defined in [devices]" in str(e)
    assert 'did you mean "ubd"' in str(e)


def test_missing_description(tmp_path):
    e = error(tmp_path, DEVICE + ADD_DEL)
    assert e.key == "description" and "missing" in str(e)


def test_device_used_before_add(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "kill"\ndevice = "ubd"\n' + ADD_DEL)
    assert e.key == "steps[0].device" and "not added at this point" in str(e)


def test_device_left_at_the_end(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + '[[steps]]\ndo = "add"\ndevice = "ubd"\n')
    assert e.key == "steps" and "still present at the end" in str(e)


def test_delete_while_mounted(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "add"\ndevice = "ubd"\n[[steps]]\ndo = "mkfs"\ndevice = "ubd"\n'
              '[[steps]]\ndo = "mount"\ndevice = "ubd"\n' +
              '[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    assert e.key == "steps[3].device" and "umount before delete" in str(e)


def test_kill_queue_beyond_the_device(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'queues = 2\n' +
              '[[steps]]\ndo = "add"\ndevice = "ubd"\n'
              '[[steps]]\ndo = "kill"\ndevice = "ubd"\nqueue = 2\n'
              '[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    assert e.key == "steps[1].queue" and "has 2 queues" in str(e)


def test_kernel_loop_rejects_ublk_settings(tmp_path):
    e = error(tmp_path, 'description = "d"\n[devices.k]\ntarget = "kernel_loop"\n'
              'file = "/var/tmp/f.img"\nqueues = 4\n'
              '[[steps]]\ndo = "add"\ndevice = "k"\n[[steps]]\ndo = "delete"\ndevice = "k"\n')
    assert e.key == "devices.k.queues"


def test_recovery_modifier_needs_recovery(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'recovery_reissue = 1\n' + ADD_DEL)
    assert e.key == "devices.ubd.recovery_reissue"


def test_wait_for_a_job_that_is_not_background(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "add"\ndevice = "ubd"\n'
              '[[steps]]\ndo = "fio"\ndevice = "ubd"\njob = "a"\n'
              '[[steps]]\ndo = "wait"\njob = "a"\n'
              '[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    assert e.key == "steps[2].job" and "not a background job" in str(e)


def test_verify_job_takes_size_not_runtime(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE +
              '[[steps]]\ndo = "add"\ndevice = "ubd"\n'
              '[[steps]]\ndo = "fio"\ndevice = "ubd"\nrw = "write"\nverify = "crc32c"\nruntime = 5\n'
              '[[steps]]\ndo = "delete"\ndevice = "ubd"\n')
    assert e.key == "steps[1].runtime"


def test_loop_target_gets_a_backing_file_and_ids_are_assigned(tmp_path):
    [case] = load(tmp_path, 'description = "d"\n[devices.a]\ntarget = "loop"\nid = 0\n'
                            '[devices.b]\ntarget = "null"\n'
                            '[[steps]]\ndo = "add"\ndevice = "a"\n[[steps]]\ndo = "add"\ndevice = "b"\n'
                            '[[steps]]\ndo = "delete"\ndevice = "a"\n'
                            '[[steps]]\ndo = "delete"\ndevice = "b"\n')
    assert case.devices["a"].file == "/var/tmp/ubd-scenario/a.img"
    assert (case.devices["a"].id, case.devices["b"].id) == (0, 1)


MATRIX = """
description = "kill ${target} with ${queues} queues"
[matrix]
target = ["null", "loop"]
queues = [1, 4]
[devices.ubd]
target = "${target}"
queues = "${queues}"
""" + ADD_DEL


def test_matrix_expands_to_cases_with_readable_ids(tmp_path):
    cases = load(tmp_path, MATRIX, "kill.toml")
    assert [c.id for c in cases] == ["kill[target=null,queues=1]", "kill[target=null,queues=4]",
                                     "kill[target=loop,queues=1]", "kill[target=loop,queues=4]"]
    last = cases[-1]
    assert last.devices["ubd"].queues == 4 and last.devices["ubd"].target == "loop"
    assert last.description == "kill loop with 4 queues"
    assert cases[0].safe_id == "kill-target=null-queues=1"


def test_matrix_value_is_validated_per_variant(tmp_path):
    e = error(tmp_path, MATRIX.replace("queues = [1, 4]", "queues = [1, 99]"))
    assert e.key == "devices.ubd.queues" and "variant target=null,queues=99" in str(e)


def test_unknown_placeholder(tmp_path):
    e = error(tmp_path, MATRIX.replace('queues = "${queues}"', 'queues = "${qs}"'))
    assert e.key == "devices.ubd.queues" and "${qs} is not a [matrix] parameter" in str(e)


def test_unused_matrix_parameter(tmp_path):
    e = error(tmp_path, MATRIX.replace('queues = "${queues}"', 'queues = 2')
              .replace("with ${queues} queues", ""))
    assert e.key == "matrix.queues" and "not used" in str(e)


@pytest.mark.parametrize("path,key", [
    ("syntax_error.toml", ""), ("unknown_step.toml", "steps[1].do"),
    ("wrong_type.toml", "devices.ubd.queues"), ("missing_device.toml", "steps[1].device"),
    ("out_of_range.toml", "devices.ubd.depth"), ("bad_signal.toml", "steps[1].signal"),
])
def test_shipped_broken_examples(path, key):
    from vm.paths import REPO
    f = REPO / "tests/data/scenarios" / path
    with pytest.raises(ScenarioError) as e:
        loader.load(f)
    assert e.value.key == key and str(f) in str(e.value)


def test_every_shipped_scenario_loads():
    from vm.scenario import catalog
    files = catalog.shipped()
    assert {f.stem for f in files} >= {"kill_daemon", "heavy_io_delete", "mq_loop",
                                       "kill_daemon_recover"}
    for f in files:
        assert loader.load(f)


def test_a_setting_of_another_target_names_what_this_one_takes(tmp_path):
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'buffered_io = true\n' + ADD_DEL)
    assert e.key == "devices.ubd.buffered_io"
    assert "not a null setting (null takes: target, size, queues, depth" in str(e)


def test_scheduler_is_a_device_setting_of_every_target(tmp_path):
    s = load(tmp_path, 'description = "d"\n' + DEVICE + 'scheduler = "mq-deadline"\n' + ADD_DEL)
    assert s[0].devices["ubd"].scheduler == "mq-deadline"
    e = error(tmp_path, 'description = "d"\n' + DEVICE + 'scheduler = "cfq"\n' + ADD_DEL)
    assert e.key == "devices.ubd.scheduler" and "mq-deadline" in str(e) and "cfq" in str(e)


FAULT_ADD_DEL = ADD_DEL.replace('"ubd"', '"f"')


def test_fault_settings_are_checked_before_any_guest(tmp_path):
    e = error(tmp_path, 'description = "d"\n[devices.f]\ntarget = "fault"\nerror_rate = 2\n'
              + FAULT_ADD_DEL)
    assert e.key == "devices.f.error_rate" and "from 0.0 to 1.0, got 2" in str(e)
    e = error(tmp_path, 'description = "d"\n[devices.f]\ntarget = "fault"\nerrno = "eio"\n'
              + FAULT_ADD_DEL)
    assert e.key == "devices.f.errno"
    e = error(tmp_path, 'description = "d"\n[devices.f]\ntarget = "fault"\nbuffered_io = true\n'
              + FAULT_ADD_DEL)
    assert e.key == "devices.f.buffered_io" and "applies only with base = loop" in str(e)


def test_fault_on_a_loop_base_gets_a_backing_file(tmp_path):
    [case] = load(tmp_path, 'description = "d"\n[devices.f]\ntarget = "fault"\nbase = "loop"\n'
                            'delay_us = 100\n[devices.n]\ntarget = "fault"\n' + FAULT_ADD_DEL +
                  '[[steps]]\ndo = "add"\ndevice = "n"\n[[steps]]\ndo = "delete"\ndevice = "n"\n')
    f, n = case.devices["f"], case.devices["n"]
    assert f.file == "/var/tmp/ubd-scenario/f.img" and f.options["delay_us"] == 100
    assert n.file is None and n.options["base"] is None
