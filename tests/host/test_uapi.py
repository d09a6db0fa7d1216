"""ublk_cmd.h structures and opcodes: sizes, offsets and the ioctl encodings the kernel expects."""
from ubdsrv import uapi


def test_struct_sizes():
    assert uapi.CTRL_CMD.size == 32
    assert uapi.DEV_INFO.size == 64
    assert uapi.IO_DESC.size == 24
    assert uapi.IO_CMD.size == 16
    assert uapi.PARAM_BASIC.size == 32
    assert uapi.PARAM_DISCARD.size == 20
    assert uapi.PARAM_DEVT.size == 16
    assert (uapi.PARAMS_BASIC_OFF, uapi.PARAMS_DISCARD_OFF, uapi.PARAMS_DEVT_OFF) == (8, 40, 60)


def test_ioctl_encodings_match_known_values():
    assert uapi.UBLK_U_CMD_ADD_DEV == uapi._IOWR("u", 0x04, 32) == 0xC0207504
    assert uapi.UBLK_U_CMD_GET_DEV_INFO == 0x80207502
    assert uapi.UBLK_U_CMD_START_DEV == 0xC0207506
    assert uapi.UBLK_U_CMD_GET_FEATURES == 0x80207513
    assert uapi.UBLK_U_IO_FETCH_REQ == 0xC0107520
    assert uapi.UBLK_U_IO_COMMIT_AND_FETCH_REQ == 0xC0107521
    assert uapi.UBLK_U_IO_NEED_GET_DATA == 0xC0107522
    for name, (enc, legacy) in uapi.CTRL_OPS.items():
        if legacy is not None:
            assert uapi.ioc_nr(enc) == legacy, name


def test_desc_area_geometry():
    assert uapi.cmd_buf_size_max() == 98304          # round_up(4096 * 24, 4096)
    assert uapi.cmd_buf_offset(2) == 2 * 98304
    assert uapi.cmd_buf_size(128) == 4096 and uapi.cmd_buf_size(200) == 8192


def test_dev_info_round_trip():
    i = uapi.DevInfo(nr_hw_queues=4, queue_depth=64, dev_id=7, flags=0x5A, ublksrv_pid=1234)
    raw = i.pack()
    assert len(raw) == 64
    j = uapi.DevInfo.unpack(raw)
    assert (j.nr_hw_queues, j.queue_depth, j.dev_id, j.flags, j.ublksrv_pid) == (4, 64, 7, 0x5A, 1234)
    # field offsets per ublk_cmd.h
    assert raw[16:20] == (1234).to_bytes(4, "little") and raw[24:32] == (0x5A).to_bytes(8, "little")


def test_params_pack():
    p = uapi.Params()
    p.types = uapi.UBLK_PARAM_TYPE_BASIC
    p.dev_sectors = 2048
    p.max_sectors = 1024
    raw = p.pack()
    assert len(raw) == 40 and int.from_bytes(raw[0:4], "little") == 40
    p.types |= uapi.UBLK_PARAM_TYPE_DISCARD
    p.discard_granularity = 4096
    raw = p.pack()
    assert len(raw) == 60 and int.from_bytes(raw[4:8], "little") == 3
    q = uapi.Params.unpack(raw + bytes(64))
    assert (q.dev_sectors, q.max_sectors, q.discard_granularity) == (2048, 1024, 4096)


def test_flag_and_state_names():
    assert uapi.flag_names(0x4A) == ["URING_CMD_COMP_IN_TASK", "RECOVERY", "CMD_IOCTL_ENCODE"]
    assert [uapi.state_name(s) for s in range(4)] == ["DEAD", "LIVE", "QUIESCED", "FAIL_IO"]


def test_user_copy_offsets():
    # include/uapi/linux/ublk_cmd.h: tag at bit 25 (UBLK_IO_BUF_BITS), q_id at bit 41 (+16 tag bits)
    assert uapi.user_copy_offset(0, 0) == 0x80000000
    assert uapi.user_copy_offset(0, 1) == 0x80000000 + (1 << 25)
    assert uapi.user_copy_offset(3, 5) == 0x80000000 + (3 << 41) + (5 << 25)
    # the largest position still fits a signed 64-bit file offset
    top = uapi.user_copy_offset(uapi.UBLK_MAX_NR_QUEUES - 1, uapi.UBLK_MAX_QUEUE_DEPTH - 1)
    assert top + (1 << uapi.UBLK_IO_BUF_BITS) < 1 << 63
