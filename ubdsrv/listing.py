"""What `ublk list`, `ublk list -v` and `ublk features` print, byte for byte as ublksrv's C tool does:
pure functions of the kernel's dev_info and params and the server's saved state (no driver needed, so
the host tests check every field).

    format_device    ublksrv_ctrl_dump (lib/ublksrv_cmd.c)
    format_json      ublksrv_json_dump (lib/ublksrv_json.cpp): nlohmann's dump(4), keys sorted
    format_features  cmd_dev_get_features (targets/ublk.cpp)

The saved state plays the part of ublksrv's JSON in /run/ublksrvd/N.pid: the queue and target lines
come from it whether or not its daemon still runs (as in C), and it is left out when it belongs to
another device (daemon.read_state decides)."""
import json

from . import uapi


def state_name(state):
    return uapi.STATE_NAMES.get(state, "UNKNOWN")


def list_flag_names(flags):
    return [name for bit, name in uapi.LIST_FLAG_NAMES if flags & bit]


def target_line(obj):
    """The target object as nlohmann's dump() writes it: compact, keys sorted."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def affinity(cpus):
    """ublksrv_build_cpu_str: every CPU followed by a space."""
    return "".join(f"{c} " for c in cpus)


def _queue(state, q_id):
    for qd in state.get("queues", ()):
        if qd.get("q_id") == q_id:
            return qd.get("tid", 0), qd.get("affinity", ())
    return 0, ()


def format_device(info, params, state=None):
    """`ublk list` for one device: `info` a uapi.DevInfo (GET_DEV_INFO), `params` a uapi.Params
    (GET_PARAMS), `state` the saved server state or None."""
    names = "".join(" " + n for n in list_flag_names(info.flags))
    lines = [
        f"dev id {info.dev_id}: nr_hw_queues {info.nr_hw_queues} queue_depth {info.queue_depth} "
        f"block size {1 << params.logical_bs_shift} dev_capacity {params.dev_sectors}",
        f"\tmax rq size {info.max_io_buf_bytes} daemon pid {info.ublksrv_pid} state {state_name(info.state)}",
        f"\tflags 0x{info.flags:x} [{names} ]",
        f"\tublkc: {params.char_major}:{params.char_minor} ublkb: {params.disk_major}:{params.disk_minor} "
        f"owner: {info.owner_uid}:{info.owner_gid}",
    ]
    if state is not None:
        for q in range(info.nr_hw_queues):
            tid, cpus = _queue(state, q)
            lines.append(f"\tqueue {q}: tid {tid} affinity({affinity(cpus)})")
        if "target_json" in state:
            lines.append("\ttarget " + target_line(state["target_json"]))
    return "\n".join(lines)


def dev_info_json(info):
    """struct ublksrv_ctrl_dev_info with ublksrv's field names (padding and reserved included)."""
    return {"nr_hw_queues": info.nr_hw_queues, "queue_depth": info.queue_depth, "state": info.state,
            "pad0": 0, "max_io_buf_bytes": info.max_io_buf_bytes, "dev_id": info.dev_id,
            "ublksrv_pid": info.ublksrv_pid, "pad1": 0, "flags": info.flags,
            "ublksrv_flags": info.ublksrv_flags, "owner_uid": info.owner_uid, "owner_gid": info.owner_gid,
            "reserved1": 0, "reserved2": 0}


def params_json(p):
    """struct ublk_params (Linux 6.12: basic, discard, devt, zoned) with ublksrv's field names."""
    return {
        "len": p.len, "types": p.types,
        "basic": {"attrs": p.attrs, "logical_bs_shift": p.logical_bs_shift,
                  "physical_bs_shift": p.physical_bs_shift, "io_opt_shift": p.io_opt_shift,
                  "io_min_shift": p.io_min_shift, "max_sectors": p.max_sectors,
                  "chunk_sectors": p.chunk_sectors, "dev_sectors": p.dev_sectors,
                  "virt_boundary_mask": p.virt_boundary_mask},
        "discard": {"discard_alignment": p.discard_alignment, "discard_granularity": p.discard_granularity,
                    "max_discard_sectors": p.max_discard_sectors,
                    "max_write_zeroes_sectors": p.max_write_zeroes_sectors,
                    "max_discard_segments": p.max_discard_segments, "reserved0": 0},
        "devt": {"char_major": p.char_major, "char_minor": p.char_minor, "disk_major": p.disk_major,
                 "disk_minor": p.disk_minor},
        "zoned": {"max_open_zones": 0, "max_active_zones": 0, "max_zone_append_sectors": 0,
                  "reserved": [0] * 20},
    }


def format_json(info, params, state):
    """`ublk list -v`: the device's JSON as ublksrv keeps it (dev_info, params, target, queues), dumped
    with an indent of 4. dev_info and params are the kernel's current ones."""
    j = {"dev_info": dev_info_json(info), "params": params_json(params)}
    if "target_json" in state:
        j["target"] = state["target_json"]
    j["queues"] = {str(q): {"qid": q, "tid": tid, "affinity": affinity(cpus)}
                   for q in range(info.nr_hw_queues) for tid, cpus in [_queue(state, q)]}
    return json.dumps(j, indent=4, sort_keys=True, ensure_ascii=False)


def format_features(features):
    """`ublk features`: the mask, then one line per bit with ublksrv's name for it."""
    lines = [f"ublk_drv features: 0x{features:x}"]
    for bit in range(64):
        if features >> bit & 1:
            name = uapi.FEATURE_NAMES[bit] if bit < len(uapi.FEATURE_NAMES) else "unknown"
            lines.append(f"\t{name:<20}: 0x{1 << bit:x}")
    return "\n".join(lines)
