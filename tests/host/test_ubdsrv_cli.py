"""`ublk` as a drop-in for ublksrv's C tool, checked without a driver: a table of C invocations with
what C makes of them (each group cites the C function it is drawn from) and what we make of them:
the parse, the output bytes, the exit status. Where we deliberately differ (C stays silent on bad
input, or would start something this server cannot serve) the row says so.

C sources: ublk-org/ublksrv targets/ublk.cpp, targets/ublksrv_tgt.cpp, targets/ublk.loop.cpp,
targets/ublk.null.cpp, lib/ublksrv_cmd.c, lib/ublksrv_json.cpp, include/ublksrv.h."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ubdsrv import cli, cliargs, listing, targets, uapi
from ubdsrv.targets.base import Option, Target, TargetError

REPO = Path(__file__).resolve().parents[2]
ENC = uapi.UBLK_F_CMD_IOCTL_ENCODE
REC = uapi.UBLK_F_USER_RECOVERY


def ublk(*args):
    return subprocess.run([sys.executable, "-m", "ubdsrv", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


# ---- add: the common options --------------------------------------------------------------------------
# C: ublksrv_parse_add_opts (ublksrv_tgt.cpp): getopt_long "-:t:n:d:q:u:g:r:e:i:T:zbS", values by
# strtol(optarg, NULL, 10) (--debug_mask base 16), -q clamped to MAX_NR_HW_QUEUES (32), -d to MAX_QD
# (4096), defaults DEF_NR_HW_QUEUES 1, DEF_QD 128, DEF_BUF_SIZE 512 KiB (include/ublksrv.h).
ADD_TABLE = [
    # (argv after `add`, expected AddRequest fields, a note we print (C prints none))
    (["-t", "null"], dict(queues=1, depth=128, max_io=512 << 10, dev_id=uapi.UBLK_DEV_ID_AUTO, flags=ENC), None),
    (["-tnull", "-n", "3"], dict(dev_id=3), None),
    (["-t", "null", "-n", "010"], dict(dev_id=10), None),                  # strtol base 10: not octal
    (["-t", "null", "-n", "-1"], dict(dev_id=uapi.UBLK_DEV_ID_AUTO), None),  # -1: the driver picks
    (["-t", "null", "-q", "12abc"], dict(queues=12), "read as 12"),        # strtol stops at 'a'
    (["-t", "null", "-q", " +2"], dict(queues=2), None),                   # strtol: blanks, a sign
    (["-t", "null", "-q", "64"], dict(queues=32), "clamped to 32"),
    (["-t", "null", "-d", "5000"], dict(depth=4096), "clamped to 4096"),
    (["-t", "null", "-q4", "-d64"], dict(queues=4, depth=64), None),       # values glued on
    (["-t", "null", "--queues=4", "--depth", "64"], dict(queues=4, depth=64), None),
    (["-t", "null", "-u", "1"], dict(flags=ENC | uapi.UBLK_F_URING_CMD_COMP_IN_TASK), None),
    (["-t", "null", "-u", "0"], dict(flags=ENC), None),
    (["-t", "null", "--uring_comp", "1"], dict(flags=ENC | uapi.UBLK_F_URING_CMD_COMP_IN_TASK), None),
    (["-t", "null", "-g", "1"], dict(flags=ENC | uapi.UBLK_F_NEED_GET_DATA), None),
    (["-t", "null", "--need_get", "1"], dict(flags=ENC | uapi.UBLK_F_NEED_GET_DATA), None),  # abbreviated
    (["-t", "null", "-r", "1"], dict(flags=ENC | REC), None),
    (["-t", "null", "-r", "0"], dict(flags=ENC), None),
    (["-t", "null", "-r", "2"], dict(flags=ENC | REC), None),              # any non-zero value
    # a bare -r: getopt runs out of argv for its required value and returns ':' (optstring "-:..."),
    # which the switch ignores: no recovery, and no word from C
    (["-t", "null", "-r"], dict(flags=ENC), "-r without a value is ignored"),
    (["-t", "null", "-e", "1"], dict(flags=ENC | REC | uapi.UBLK_F_USER_RECOVERY_FAIL_IO), None),
    (["-t", "null", "-i", "1"], dict(flags=ENC | REC | uapi.UBLK_F_USER_RECOVERY_REISSUE), None),
    (["-t", "null", "--usercopy"], dict(flags=ENC | uapi.UBLK_F_USER_COPY), None),
    (["-t", "null", "--max_io_buf_bytes", "1048576"], dict(max_io=1 << 20), None),
    (["-t", "null", "--debug_mask", "0x1f"], dict(debug_mask=0x1F), None),   # strtol base 16
    (["-t", "null", "-T", "1"], dict(queues=1), None),                       # one thread per queue: ours
    # args_parse_number_type (ublk.cpp) reads -t with "-:n:t:": the last -t wins
    (["-t", "loop", "-t", "null"], dict(spec={"name": "null", "dev_size": 250 << 30}), None),
]


@pytest.mark.parametrize("argv, want, note", ADD_TABLE, ids=[" ".join(r[0]) for r in ADD_TABLE])
def test_add_reads_argv_as_ublksrv_does(argv, want, note):
    req = cli.parse_add(argv)
    for key, value in want.items():
        assert getattr(req, key) == value, (key, req)
    if note:
        assert any(note in n for n in req.notes), req.notes
    else:
        assert req.notes == []


# Where C accepts and we refuse (exit 2, one line naming the option): what C does is in the comment.
ADD_REFUSED = [
    (["-t", "null", "-z"], "-z: zero copy"),                  # C: UBLK_F_SUPPORT_ZERO_COPY|AUTO_BUF_REG
    (["-t", "null", "--zerocopy"], "--zerocopy: zero copy"),
    (["-t", "null", "-b"], "-b: UBLK_F_BATCH_IO"),            # C: batch io
    (["-t", "null", "-T", "2"], "-T: this server"),           # C: 2 io threads per queue
    (["-t", "null", "--unprivileged"], "--unprivileged"),     # C: UBLK_F_UNPRIVILEGED_DEV
    (["-t", "null", "--eventfd", "3"], "--eventfd"),          # C: ublksrv_execv_helper refuses it too
    (["-t", "null", "-q", "0"], "-q 0: expected at least 1"),      # C: ADD_DEV fails (EINVAL)
    (["-t", "null", "-d", "0"], "-d 0: expected at least 1"),
    (["-t", "null", "-q", "many"], "-q: expected a number, not 'many'"),   # C: strtol -> 0
    (["-t", "null", "-n", "-5"], "-n -5: expected a device id"),          # C: any negative id -> any
    # C: -r takes "-q" as its value (strtol -> 0, no recovery); "2" is a word; the queue count stays 1
    (["-t", "null", "-r", "-q", "2"], "-r: expected a number, not '-q'"),
    (["-t", "null", "--user_rec", "1"], "--user_rec: ambiguous"),     # C: getopt_long: '?', ignored
    (["-t", "null", "-i", "1", "-e", "1"], "contradict"),             # C: both flags; the kernel refuses
    (["-t", "null", "--frob"], "--frob: unknown option"),             # C: '?', ignored
    (["-t", "null", "stray"], "'stray': unexpected argument"),        # C: returned as 1, ignored
    (["-t", "null", "--usercopy=1"], "--usercopy: takes no value"),
    (["-t", "null", "--max_io_buf_bytes", "100"], "--max_io_buf_bytes 100"),
    (["-t", "nbd"], "-t nbd: unknown target"),                # C: execv of ublk.nbd fails
    ([], "-t TYPE is required"),                              # C: "no dev type specified", -EINVAL
    (["-t", "null", "-s", "lots"], "-s: expected a size"),    # -s: our null's size (C's null: 250G)
    (["-t", "null", "-s", "100"], "-s 100: size must be at least 512 bytes"),
    (["-t", "null", "-f", "/etc/hostname"], "-f: unknown option"),       # loop's option, not null's
    (["-t", "null", "--buffered_io"], "--buffered_io: unknown option"),
    (["-t", "loop"], "-f FILE is required"),                             # C: init_tgt returns -1
    (["-t", "loop", "-f", "/nonexistent/disk.img"], "-f /nonexistent/disk.img: no such file"),
    (["-t", "loop", "-f", "/dev/null"], "not a regular file or block device"),
]


@pytest.mark.parametrize("argv, needle", ADD_REFUSED, ids=[" ".join(r[0]) or "(none)" for r in ADD_REFUSED])
def test_add_refuses_with_exit_2_naming_the_option(argv, needle):
    with pytest.raises(cli.CliError) as e:
        cli.parse_add(argv)
    assert e.value.status == 2 and needle in str(e.value), str(e.value)


# ---- add -t loop: its own options ------------------------------------------------------------------------
# C: loop_init_tgt (ublk.loop.cpp): getopt_long "-:f:o:" with --file, --buffered_io (no argument),
# --offset (strtoul, in 512-byte sectors, "skips first NUM sectors"); dev_size = file size - offset;
# an offset at or past the end fails. Its JSON: backing_file, direct_io (1/0), offset, name, type 0,
# dev_size.
@pytest.fixture
def img(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(16 << 20)
    return str(p)


def test_loop_options_and_target_json(img):
    req = cli.parse_add(["-t", "loop", "-f", img])
    s = req.spec
    assert s["backing_file"] == img and s["dev_size"] == 16 << 20 and s["offset"] == 0
    assert s["direct_io"] in (0, 1) and s["logical_block_size"] in (512, 1024, 2048, 4096)
    t = targets.from_spec(s)
    assert t.describe() == {"backing_file": img, "dev_size": 16 << 20, "direct_io": s["direct_io"],
                            "name": "loop", "offset": 0, "type": 0}
    # the C tool's key order is nlohmann's: sorted
    assert listing.target_line(t.describe()).startswith('{"backing_file":')


def test_loop_offset_is_in_sectors_and_shrinks_the_device(img):
    s = cli.parse_add(["-t", "loop", "-f", img, "--offset", "8"]).spec
    assert s["offset"] == 8 and s["dev_size"] == (16 << 20) - 8 * 512
    assert cli.parse_add(["-t", "loop", "-f", img, "-o", "16"]).spec["offset"] == 16
    with pytest.raises(cli.CliError, match="at or past the end"):
        cli.parse_add(["-t", "loop", "-f", img, "--offset", str(32 << 11)])


def test_loop_buffered_io_gets_ublksrvs_common_block_sizes(img):
    # C: "in case of buffered io, use common bs/pbs so that all FS image can be supported"
    s = cli.parse_add(["-t", "loop", "-f", img, "--buff"]).spec      # abbreviation, as getopt_long
    assert (s["direct_io"], s["logical_block_size"], s["physical_block_size"]) == (0, 512, 4096)
    p = targets.from_spec(s).params(uapi.DevInfo(max_io_buf_bytes=512 << 10))
    assert (p.logical_bs_shift, p.physical_bs_shift, p.max_sectors) == (9, 12, 1024)


def test_loop_geometry_follows_direct_io_alignment(img, monkeypatch):
    from ubdsrv.targets import loop
    # 4K-native storage: STATX_DIOALIGN says 4096, so the device's blocks are 4096 bytes
    monkeypatch.setattr(loop, "_statx_dio_align", lambda path: 4096)
    s = cli.parse_add(["-t", "loop", "-f", img]).spec
    assert (s["direct_io"], s["logical_block_size"], s["physical_block_size"]) == (1, 4096, 4096)
    p = targets.from_spec(s).params(uapi.DevInfo(max_io_buf_bytes=512 << 10))
    assert (p.logical_bs_shift, p.physical_bs_shift, p.io_min_shift) == (12, 12, 12)
    with pytest.raises(cli.CliError, match="whole 4096-byte blocks"):
        cli.parse_add(["-t", "loop", "-f", img, "--offset", "1"])
    # no direct IO at all (statx reports alignment 0): buffered, as ublksrv falls back
    monkeypatch.setattr(loop, "_statx_dio_align", lambda path: 0)
    assert cli.parse_add(["-t", "loop", "-f", img]).spec["direct_io"] == 0


def test_loop_advertises_discard_only_when_the_store_can(img, monkeypatch):
    from ubdsrv.targets import loop
    info = uapi.DevInfo(max_io_buf_bytes=512 << 10)
    s = cli.parse_add(["-t", "loop", "-f", img]).spec
    assert s["discard"] is True          # the host's /tmp filesystem punches holes
    assert targets.from_spec(s).params(info).types & uapi.UBLK_PARAM_TYPE_DISCARD
    monkeypatch.setattr(loop, "_can_punch", lambda fd, size: False)
    s = cli.parse_add(["-t", "loop", "-f", img]).spec
    assert not targets.from_spec(s).params(info).types & uapi.UBLK_PARAM_TYPE_DISCARD


def test_empty_backing_file_is_refused(tmp_path):
    f = tmp_path / "empty.img"
    f.write_bytes(b"")
    r = ublk("add", "-t", "loop", "-f", str(f))
    assert r.returncode == 2 and "smaller than" in r.stderr


# ---- list: ublksrv_ctrl_dump (lib/ublksrv_cmd.c) -------------------------------------------------------
# "dev id %d: nr_hw_queues %d queue_depth %d block size %d dev_capacity %lld", "\tmax rq size %d daemon
# pid %d state %s" (ublksrv_dev_state_desc: DEAD LIVE QUIESCED FAIL_IO, else UNKNOWN), "\tflags 0x%llx
# [%s...%s ]" (each name with a space before it, in its own order), "\tublkc: %u:%d ublkb: %u:%u owner:
# %u:%u", then, when the daemon's JSON exists (alive or not), "\tqueue %u: tid %d affinity(%s)" per
# queue (ublksrv_build_cpu_str: "%d " per CPU) and "\ttarget %s" (nlohmann dump: compact, sorted keys).
def _info(**kw):
    d = dict(nr_hw_queues=2, queue_depth=128, state=uapi.UBLK_S_DEV_LIVE, dev_id=0, ublksrv_pid=1234,
             flags=0x4A, max_io_buf_bytes=524288)
    d.update(kw)
    return uapi.DevInfo(**d)


def _params(lbs_shift=9, sectors=2097152):
    p = uapi.Params()
    p.types = 5
    p.len = 60
    p.logical_bs_shift = lbs_shift
    p.dev_sectors = sectors
    p.char_major, p.char_minor, p.disk_major, p.disk_minor = 511, 0, 259, 1
    return p


LOOP_STATE = {"queues": [{"q_id": 0, "tid": 1235, "affinity": [0]}, {"q_id": 1, "tid": 1236, "affinity": [1]}],
              "target_json": {"name": "loop", "type": 0, "dev_size": 1073741824, "backing_file": "/srv/disk.img",
                              "direct_io": 1, "offset": 0}}
HEAD = ("dev id 0: nr_hw_queues 2 queue_depth 128 block size 512 dev_capacity 2097152\n"
        "\tmax rq size 524288 daemon pid 1234 state LIVE\n"
        "\tflags 0x4a [ URING_CMD_COMP_IN_TASK RECOVERY CMD_IOCTL_ENCODE ]\n"
        "\tublkc: 511:0 ublkb: 259:1 owner: 0:0")
QUEUES = "\n\tqueue 0: tid 1235 affinity(0 )\n\tqueue 1: tid 1236 affinity(1 )"
ALL_C_NAMES = ("SUPPORT_ZERO_COPY URING_CMD_COMP_IN_TASK NEED_GET_DATA UNPRIVILEGED_DEV RECOVERY "
               "RECOVERY_REISSUE CMD_IOCTL_ENCODE USER_COPY ZONED RECOVERY_FAIL_IO")
LIST_TABLE = [
    ("live loop device", _info(), _params(), LOOP_STATE, HEAD + QUEUES +
     '\n\ttarget {"backing_file":"/srv/disk.img","dev_size":1073741824,"direct_io":1,"name":"loop",'
     '"offset":0,"type":0}'),
    # the daemon was killed: C still prints the queue lines of its JSON
    ("dead daemon", _info(state=uapi.UBLK_S_DEV_DEAD), _params(), LOOP_STATE,
     HEAD.replace("LIVE", "DEAD") + QUEUES + "\n\ttarget " + listing.target_line(LOOP_STATE["target_json"])),
    ("no saved state", _info(), _params(), None, HEAD),
    ("quiesced", _info(state=uapi.UBLK_S_DEV_QUIESCED), _params(), None, HEAD.replace("LIVE", "QUIESCED")),
    ("fail_io", _info(state=uapi.UBLK_S_DEV_FAIL_IO), _params(), None, HEAD.replace("LIVE", "FAIL_IO")),
    ("unknown state", _info(state=7), _params(), None, HEAD.replace("LIVE", "UNKNOWN")),
    ("no flags", _info(flags=0), _params(), None, HEAD.replace("0x4a [ URING_CMD_COMP_IN_TASK RECOVERY "
                                                               "CMD_IOCTL_ENCODE ]", "0x0 [ ]")),
    # every bit: C's names in C's order (UNPRIVILEGED_DEV before RECOVERY); bits 10+ it does not name
    ("every flag", _info(flags=(1 << 18) - 1), _params(), None,
     HEAD.replace("0x4a [ URING_CMD_COMP_IN_TASK RECOVERY CMD_IOCTL_ENCODE ]", f"0x3ffff [ {ALL_C_NAMES} ]")),
    ("4k blocks", _info(), _params(lbs_shift=12, sectors=2048), None,
     HEAD.replace("block size 512 dev_capacity 2097152", "block size 4096 dev_capacity 2048")),
    ("queue missing from the state", _info(nr_hw_queues=1), _params(),
     {"queues": [], "target_json": {"name": "null", "type": 0, "dev_size": 512}},
     HEAD.replace("nr_hw_queues 2", "nr_hw_queues 1") + "\n\tqueue 0: tid 0 affinity()"
     + '\n\ttarget {"dev_size":512,"name":"null","type":0}'),
]


@pytest.mark.parametrize("what, info, params, state, want", LIST_TABLE, ids=[r[0] for r in LIST_TABLE])
def test_list_prints_what_ublksrv_prints(what, info, params, state, want):
    assert listing.format_device(info, params, state) == want


def test_list_field_positions_scripts_read():
    lines = listing.format_device(_info(), _params(), LOOP_STATE).split("\n")
    assert lines[1].split()[6] == "1234" and lines[1].split()[8] == "LIVE"
    assert lines[4].split()[3] == "1235"


# list -v: ublksrv_json_dump (lib/ublksrv_json.cpp): std::cout << std::setw(4) << j: nlohmann's pretty
# print, 4 spaces, keys sorted (std::map); the JSON holds dev_info, params, target and queues
# ({"0": {"qid", "tid", "affinity"}}), with ublksrv's field names.
def test_list_verbose_is_ublksrvs_json_dump():
    out = listing.format_json(_info(), _params(), LOOP_STATE)
    j = json.loads(out)
    assert sorted(j) == ["dev_info", "params", "queues", "target"]
    assert j["queues"] == {"0": {"affinity": "0 ", "qid": 0, "tid": 1235},
                           "1": {"affinity": "1 ", "qid": 1, "tid": 1236}}
    assert sorted(j["dev_info"]) == sorted(["nr_hw_queues", "queue_depth", "state", "pad0", "max_io_buf_bytes",
                                            "dev_id", "ublksrv_pid", "pad1", "flags", "ublksrv_flags",
                                            "owner_uid", "owner_gid", "reserved1", "reserved2"])
    assert j["params"]["basic"]["dev_sectors"] == 2097152 and j["params"]["devt"]["char_major"] == 511
    assert j["target"] == LOOP_STATE["target_json"]
    # the bytes: nlohmann's dump(4) of a nested object
    assert out.startswith('{\n    "dev_info": {\n        "dev_id": 0,\n        "flags": 74,\n')
    assert '    "queues": {\n        "0": {\n            "affinity": "0 ",\n' in out
    assert out.endswith('        "type": 0\n    }\n}')


# features: cmd_dev_get_features (ublk.cpp): "ublk_drv features: 0x%llx", then "\t%-20s: 0x%llx" per set
# bit, names from feat_map (bits 0-11), "unknown" past it.
FEATURES_TABLE = [
    (0x4A, "ublk_drv features: 0x4a\n"
           "\tCOMP_IN_TASK        : 0x2\n\tUSER_RECOVERY       : 0x8\n\tCMD_IOCTL_ENCODE    : 0x40"),
    (0x0, "ublk_drv features: 0x0"),
    (1 << 11 | 1 << 12 | 1 << 40, "ublk_drv features: 0x10000001800\n"
                                  "\tAUTO_ZC             : 0x800\n\tunknown             : 0x1000\n"
                                  "\tunknown             : 0x10000000000"),
]


@pytest.mark.parametrize("features, want", FEATURES_TABLE)
def test_features_prints_what_ublksrv_prints(features, want):
    assert listing.format_features(features) == want


def test_features_names_every_bit_ublksrv_names():
    out = listing.format_features((1 << 12) - 1).split("\n")[1:]
    assert [line.split(":")[0].strip() for line in out] == [
        "ZERO_COPY", "COMP_IN_TASK", "GET_DATA", "USER_RECOVERY", "RECOVERY_REISSUE", "UNPRIVILEGED_DEV",
        "CMD_IOCTL_ENCODE", "USER_COPY", "ZONED", "RECOVERY_FAIL_IO", "UPDATE_SIZE", "AUTO_ZC"]


# ---- exit status of whole invocations (no driver on the host) ------------------------------------------
# C's main (ublk.cpp) returns -errno or EXIT_FAILURE; we return 0 / 1 (the kernel refused) / 2 (bad
# arguments). C's status in the comment.
EXIT_TABLE = [
    ([], 2, "missing command"),                          # C: 1, "missing command" and the usage
    (["frobnicate"], 2, "unknown command 'frobnicate'"),  # C: 1, "unknown command: frobnicate"
    (["set_affinity", "-n", "0"], 2, "not supported"),  # C: sets the queue's CPUs
    (["-v"], 0, "ubdsrv "),                              # C: 0, PACKAGE_STRING
    (["--version"], 0, "ubdsrv "),
    (["help"], 0, "usage: ublk add -t TYPE"),            # C: 0, cmd_usage
    (["-h"], 0, "usage: ublk add"),
    (["add"], 2, "-t TYPE is required"),                 # C: -EINVAL (234), "no dev type specified"
    (["add", "-t", "null", "-z"], 2, "-z: zero copy"),
    (["del"], 2, "-n DEV_ID or -a is required"),          # C: 0 after deleting every device (!)
    (["del", "-n", "x"], 2, "-n: expected a number"),     # C: strtol -> 0: deletes device 0
    (["list", "-n", "-3"], 2, "-n -3: expected a device id"),   # C: a negative -n lists every device
    (["list", "--frob"], 2, "--frob: unknown option"),  # C: getopt prints an error, lists anyway
    (["recover"], 2, "-n DEV_ID is required"),           # C: 1, "wrong dev_id provided for recover"
    (["recover", "-t", "loop", "-f", "x.img"], 2, "-n DEV_ID is required"),
    (["features", "x"], 2, "'x': unexpected argument"),  # C: ignores its arguments
]


@pytest.mark.parametrize("argv, status, needle", EXIT_TABLE, ids=[" ".join(r[0]) or "(none)" for r in EXIT_TABLE])
def test_exit_status(argv, status, needle):
    r = ublk(*argv)
    assert r.returncode == status, r
    out = r.stdout if status == 0 else r.stderr
    assert needle in out, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    if status:
        assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_recover_ignores_target_options_as_ublksrv_does():
    # cmd_dev_recover reads -n and -t only ("-:n:t:"); -f IMG and friends are ignored: the run goes on
    # to the driver (absent on the host)
    if Path("/dev/ublk-control").exists():
        pytest.skip("this host has ublk")
    r = ublk("recover", "-t", "loop", "-f", "x.img", "--buffered_io", "-n", "3")
    assert r.returncode == 1 and "/dev/ublk-control" in r.stderr, r.stderr


def test_no_driver_is_a_clear_error_not_a_traceback():
    if Path("/dev/ublk-control").exists():
        pytest.skip("this host has ublk")
    r = ublk("add", "-t", "null", "-s", "1G")
    assert r.returncode == 1
    assert "/dev/ublk-control" in r.stderr and "modprobe ublk_drv" in r.stderr
    assert "Traceback" not in r.stderr


def test_notes_go_to_stderr_and_the_command_goes_on():
    if Path("/dev/ublk-control").exists():
        pytest.skip("this host has ublk")
    r = ublk("add", "-t", "null", "-q", "64", "-r")
    assert "-q 64 clamped to 32" in r.stderr and "-r without a value is ignored" in r.stderr
    assert r.returncode == 1 and "/dev/ublk-control" in r.stderr      # it went on to the driver


# ---- targets own their options (issue 13) -----------------------------------------------------------
def test_help_lists_every_targets_own_options():
    out = ublk("help").stdout
    for t in targets.TARGETS.values():
        assert f"-t {t.name}: {t.help}" in out
        own = getattr(t, "own_options", t.options)
        for o in own:
            assert o.usage() in out and o.help in out, (t.name, o.name)
    loop_only = ublk("help", "-t", "loop").stdout
    assert "-f FILE" in loop_only and "-t null:" not in loop_only and "--delay_us" not in loop_only


def test_a_new_target_needs_no_cli_change(monkeypatch):
    class Echo(Target):
        name = "echo"
        help = "a test target"
        options = (Option("word", "w", "str", "hi", "what to say"),
                   Option("times", "", "int", 1, "how often"))

        @classmethod
        def spec_from_options(cls, values, given):
            if values["times"] < 1:
                raise TargetError(f"{given['times']} {values['times']}: expected at least 1")
            return {"name": cls.name, "dev_size": 4096, "say": values["word"] * values["times"]}

    monkeypatch.setitem(targets.TARGETS, "echo", Echo)
    req = cli.parse_add(["-t", "echo", "-w", "ab", "--times", "3", "-q", "2"])
    assert req.target is Echo and req.spec["say"] == "ababab" and req.queues == 2
    with pytest.raises(cli.CliError, match="--times 0: expected at least 1"):
        cli.parse_add(["-t", "echo", "--times", "0"])
    with pytest.raises(cli.CliError, match="-s: unknown option"):
        cli.parse_add(["-t", "echo", "-s", "1G"])
    assert "--times N" in cli.usage() or "--times TIMES" in cli.usage()


def test_one_default_for_queues_and_depth():
    # DevInfo carries none of its own: the CLI's are the server's only defaults
    i = uapi.DevInfo()
    assert (i.nr_hw_queues, i.queue_depth, i.max_io_buf_bytes) == (0, 0, 0)
    req = cli.parse_add(["-t", "null"])
    assert (req.queues, req.depth, req.max_io) == (cli.DEFAULT_QUEUES, cli.DEFAULT_DEPTH, cli.DEFAULT_MAX_IO)


# ---- cliargs: getopt_long and strtol as glibc has them ------------------------------------------------
@pytest.mark.parametrize("text, base, want", [
    ("010", 10, (10, "")), ("12abc", 10, (12, "abc")), ("  -7", 10, (-7, "")), ("+3", 10, (3, "")),
    ("0x1f", 10, (0, "x1f")), ("abc", 10, (None, "abc")), ("", 10, (None, "")),
    ("0x1f", 16, (31, "")), ("1F", 16, (31, "")), ("0xg", 16, (0, "xg")),
])
def test_strtol(text, base, want):
    assert cliargs.strtol(text, base) == want


def test_getopt_long_items():
    opts = (Option("file", "f", "path"), Option("queues", "q", "int"), Option("zc", "z"))
    items = cliargs.getopt_long(["-zq3", "x", "-f", "-y", "--que", "4", "-k", "--", "-q", "5"], opts)
    got = [(i.kind, i.name or i.value, i.value if i.kind == "opt" else None) for i in items]
    assert got == [("opt", "-z", True), ("opt", "-q", "3"), ("word", "x", None), ("opt", "-f", "-y"),
                   ("opt", "--que", "4"), ("unknown", "-k", None), ("end", None, None)]


def test_is_ours_refuses_dangerous_pids():
    for pid in (0, 1, -1, os.getpid()):
        assert not cli._is_ours(pid)


def test_a_server_gone_between_check_and_kill_does_not_stop_the_cleanup(monkeypatch):
    """A daemon that reports its failed start exits right after: `add` saw it alive, then its SIGKILL
    found no process. The device must still be deleted (once a CI run was left with a DEAD device)."""
    gone = subprocess.Popen(["true"])
    gone.wait()                                          # reaped: its pid is no process now
    monkeypatch.setattr(cli.proc, "is_server", lambda pid: True)   # ... but it was one when checked
    deleted, lines = [], []

    class FakeCtrl:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def del_dev(self, dev_id):
            deleted.append(dev_id)

    monkeypatch.setattr(cli, "Ctrl", FakeCtrl)
    monkeypatch.setattr(cli, "_stop", lambda dev_id, log, pid: None)
    monkeypatch.setattr(cli, "_wait_gone", lambda dev_id, timeout: [])
    monkeypatch.setattr(cli, "bdev_holders", lambda dev_id: [])
    monkeypatch.setattr(cli.daemon, "remove_state", lambda dev_id: None)
    cli._remove(5, lines.append, gone.pid, failed_add=True)
    assert deleted == [5] and lines[-1] == "del: device 5 deleted (DEL_DEV)"
    cli._kill_servers([gone.pid], lines.append)
    assert not any("SIGKILL" in line for line in lines), lines
