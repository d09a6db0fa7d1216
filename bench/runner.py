"""Runs a preset in one guest: per queue count a *phase* (devices up, every run, devices down), each
phase's runs in a single bash script in the guest (an SSH exec costs ~0.65 s under TCG, fio ~0.4 s to
start), then the raw fio JSON, the CPU snapshots and the timings come back in one tarball."""
import shlex
import tarfile
import time
from pathlib import Path

from vm import device
from vm.guest import GUEST_UBD_DIR

from . import cpu, fio
from .cases import Preset, fio_args

GUEST_DIR = "/tmp/ubd-bench"
BACKING_FILE = "/var/tmp/ubd-bench.img"  # on the root ext4 (O_DIRECT needs a real filesystem)
BACKING_MIB = 512
NULL_GIB = 250                           # null_blk's own default size (gb=250), for both sides
UBD_ID = {"null": 0, "loop": 1}
USERCOPY_ID = {"null": 2, "loop": 3}   # the same devices with --usercopy
KERNEL_LOOP = device.Device(target="kernel_loop", file=BACKING_FILE)


def ubd_device(target, queues, usercopy=False) -> device.Device:
    """The server's device of a pair; queue depth and the rest are the vocabulary's defaults."""
    n = (USERCOPY_ID if usercopy else UBD_ID)[target]
    if target == "null":
        return device.Device(target="null", id=n, queues=queues, size=NULL_GIB << 30, usercopy=usercopy)
    return device.Device(target="loop", id=n, queues=queues, file=BACKING_FILE, usercopy=usercopy)


def ubd_side(usercopy) -> str:
    """The side name of the server's device in a phase's device table."""
    return "ubd-usercopy" if usercopy else "ubd"


DEVICE_DEPTH = ubd_device("null", 1).depth   # also null_blk's hw_queue_depth: the pairs alike


class PhaseError(RuntimeError):
    pass


def null_blk_params(queues):
    return {"nr_devices": 1, "queue_mode": 2, "submit_queues": queues, "hw_queue_depth": DEVICE_DEPTH,
            "gb": NULL_GIB, "memory_backed": 0}


PROFILE_SITE = f"{GUEST_DIR}/prof-site"   # holds bench/guest_profile.py as sitecustomize.py


def _add_ubd(target, queues, usercopy, env) -> list:
    d = ubd_device(target, queues, usercopy)
    name = f"add-{target}{'-usercopy' if usercopy else ''}.txt"
    return [f"{env}{device.add_command(d)} > {GUEST_DIR}/{name}",
            f"test -b /dev/ublkb{d.id}",
            f"echo \"@dev {target} {ubd_side(usercopy)} /dev/ublkb{d.id}\""]


def setup_script(queues, targets, profile=None, usercopy=False) -> str:
    """usercopy: also the server's devices with --usercopy, beside the plain ones."""
    nb = " ".join(f"{k}={v}" for k, v in null_blk_params(queues).items())
    env = f"UBDSRV_PROFILE={shlex.quote(profile)} PYTHONPATH={PROFILE_SITE} " if profile else ""
    lines = ["set -e",
             "modprobe ublk_drv; modprobe loop",
             f"mkdir -p {GUEST_DIR}",
             "ublk del -a >/dev/null 2>&1 || true",
             "losetup -D || true",
             "modprobe -r null_blk 2>/dev/null || true"]
    if profile:
        lines += [f"rm -rf {shlex.quote(profile.rsplit('/', 1)[0])}",
                  f"mkdir -p {shlex.quote(profile.rsplit('/', 1)[0])}"]
    if "null" in targets:
        lines += [f"modprobe null_blk {nb}",
                  "test -b /dev/nullb0",
                  "echo \"@dev null kernel /dev/nullb0\"",
                  *_add_ubd("null", queues, False, env)]
        if usercopy:
            lines += _add_ubd("null", queues, True, env)
    if "loop" in targets:
        lines += [f"if [ \"$(stat -c %s {BACKING_FILE} 2>/dev/null)\" != {BACKING_MIB << 20} ]; then",
                  f"  rm -f {BACKING_FILE}",
                  f"  dd if=/dev/zero of={BACKING_FILE} bs=1M count={BACKING_MIB} oflag=direct status=none",
                  "fi",
                  "sync",
                  f"L=$({device.add_command(KERNEL_LOOP)})",
                  "echo \"@dev loop kernel $L\"",
                  "echo \"@loopdio $(cat /sys/block/${L#/dev/}/loop/dio)\"",
                  *_add_ubd("loop", queues, False, env)]
        if usercopy:
            lines += _add_ubd("loop", queues, True, env)
    lines += ["ublk list"]
    return "\n".join(lines) + "\n"


TEARDOWN = ("ublk del -a; rc=$?; losetup -D; modprobe -r null_blk 2>/dev/null; "
            "for i in 1 2 3 4 5 6 7 8 9 10; do ls /dev/ublk[bc]* >/dev/null 2>&1 || break; sleep 0.5; done; "
            "exit $rc")


def run_script(runs, out_dir) -> str:
    """runs: [(run_id, argv)]. Per run: CPU snapshot of the ubdsrv processes, fio, snapshot, times."""
    head = f"""#!/bin/bash
OUT={out_dir}
rm -rf "$OUT"; mkdir -p "$OUT"
# the server's processes, as the server defines them (ubdsrv/proc.py)
PIDS=$(PYTHONPATH={GUEST_UBD_DIR} python3 -m ubdsrv.proc)
echo "@pids" $PIDS
snap() {{ local p s; for p in $PIDS; do {{ read -r s < /proc/$p/stat; }} 2>/dev/null && echo "$s"; done; }}
run() {{
  local id=$1; shift
  echo "@run $id"
  snap > "$OUT/$id.cpu0"
  local t0=$EPOCHREALTIME
  "$@" > "$OUT/$id.log" 2>&1
  echo $? > "$OUT/$id.rc"
  local t1=$EPOCHREALTIME
  snap > "$OUT/$id.cpu1"
  echo "$t0 $t1" > "$OUT/$id.time"
}}
"""
    body = "".join(f"run {rid} {shlex.join(argv)}\n" for rid, argv in runs)
    return head + body + "echo @done\n"


def plan_phase(preset: Preset, cases, devices, out_dir):
    """The runs of one phase, interleaved: each repeat visits every case, alternating which side goes
    first, so slow drift of the host affects ubd and kernel alike."""
    runs, meta = [], {}
    for rep in range(preset.repeats):
        for i, c in enumerate(cases):
            sides = ("ubd", "kernel") if (rep + i) % 2 == 0 else ("kernel", "ubd")
            for side in sides:
                rid = f"{c.id}.{side}.r{rep}"
                dev = devices[(c.target, ubd_side(c.usercopy) if side == "ubd" else side)]
                runs.append((rid, fio_args(c, dev, f"{out_dir}/{rid}.json", preset.runtime, preset.ramp)))
                meta[rid] = {"case": c.id, "side": side, "repeat": rep, "device": dev}
    return runs, meta


def parse_devices(stdout):
    devices, dio = {}, None
    for line in stdout.splitlines():
        f = line.split()
        if f[:1] == ["@dev"] and len(f) == 4:
            devices[(f[1], f[2])] = f[3]
        elif f[:1] == ["@loopdio"] and len(f) == 2:
            dio = f[1]
    return devices, dio


def collect(local_dir: Path, meta: dict, clk_tck: int) -> list:
    """Measurements from a phase's files (see report.py for the shape)."""
    out = []
    for rid, m in meta.items():
        rec = dict(m, run=rid, metrics=None, error=None, srv_cpu_s=None, elapsed_s=None)
        try:
            rc = int((local_dir / f"{rid}.rc").read_text().strip())
        except (OSError, ValueError):
            rec["error"] = "fio did not run (no exit status recorded)"
            out.append(rec)
            continue
        try:
            t0, t1 = (float(x) for x in (local_dir / f"{rid}.time").read_text().split())
            rec["elapsed_s"] = t1 - t0
        except (OSError, ValueError):
            pass
        try:
            d = cpu.delta((local_dir / f"{rid}.cpu0").read_text(), (local_dir / f"{rid}.cpu1").read_text(),
                          clk_tck)
            rec["srv_cpu_s"], rec["srv_cpu_per_process"] = d["cpu_s"], d["per_process"]
        except OSError:
            pass
        try:
            text = (local_dir / f"{rid}.json").read_text()
        except OSError:
            text = ""
        try:
            if rc != 0:
                raise fio.FioError(f"fio exited {rc}: "
                                   + _tail(local_dir / f"{rid}.log"))
            doc = fio.load(text)
            rec["metrics"] = fio.metrics(doc)
            rec["fio_version"] = fio.version(doc)
        except fio.FioError as e:
            rec["error"] = str(e)
        out.append(rec)
    return out


def _tail(path, n=300):
    try:
        return path.read_text(errors="replace").strip()[-n:] or "(no output)"
    except OSError:
        return "(no output)"


def run_phase(g, preset, queues, cases, raw_dir: Path, clk_tck: int, log, profile=None):
    """Devices up, every run, files back, devices down. Returns (measurements, phase info)."""
    targets = sorted({c.target for c in cases})
    r = g.exec(setup_script(queues, targets, profile, any(c.usercopy for c in cases)), timeout=300)
    info = {"queues": queues, "setup_stdout": r.stdout, "setup_stderr": r.stderr}
    if r.status != 0:
        raise PhaseError(f"device setup for {queues} queue(s) failed (exit {r.status}):\n"
                         f"{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    devices, info["loop_dio"] = parse_devices(r.stdout)
    info["devices"] = {f"{t}/{s}": d for (t, s), d in devices.items()}
    if "loop" in targets and info["loop_dio"] != "1":
        log(f"warning: the kernel loop device did not enable direct IO (dio={info['loop_dio']})")
    out_dir = f"{GUEST_DIR}/out-q{queues}"
    runs, meta = plan_phase(preset, cases, devices, out_dir)
    script = run_script(runs, out_dir)
    g.exec(f"mkdir -p {GUEST_DIR} && cat > {GUEST_DIR}/run-q{queues}.sh", timeout=30, check=True,
           stdin=script.encode())
    n, t0 = len(runs), time.monotonic()
    state = {"i": 0, "buf": b""}

    def progress(data):
        state["buf"] += data
        *lines, state["buf"] = state["buf"].split(b"\n")
        for line in lines:
            if line.startswith(b"@run "):
                state["i"] += 1
                log(f"  [{state['i']:3d}/{n}] {time.monotonic() - t0:6.1f} s  {line[5:].decode()}")
            elif line.startswith(b"@pids"):
                info["server_pids"] = line.decode().split()[1:]

    budget = n * (preset.runtime + preset.ramp + 1.0) * 2.5 + 120
    r = g.exec(f"bash {GUEST_DIR}/run-q{queues}.sh", timeout=budget, on_stdout=progress)
    info["run_seconds"] = time.monotonic() - t0
    if r.status != 0 or "@done" not in r.stdout:
        log(f"warning: the run script for {queues} queue(s) ended with status {r.status}: {r.stderr[-500:]}")
    tgz = f"{GUEST_DIR}/out-q{queues}.tgz"
    g.exec(f"tar -C {out_dir} -czf {tgz} .", timeout=120, check=True)
    local_dir = raw_dir / f"q{queues}"
    local_dir.mkdir(parents=True, exist_ok=True)
    g.pull(tgz, raw_dir / f"q{queues}.tgz")
    with tarfile.open(raw_dir / f"q{queues}.tgz") as tf:
        tf.extractall(local_dir, filter="data")
    (raw_dir / f"q{queues}.tgz").unlink()
    (local_dir / "run.sh").write_text(script)
    r = g.exec(TEARDOWN, timeout=120)
    info["teardown_status"] = r.status
    if r.status != 0:
        log(f"warning: teardown after {queues} queue(s) failed: {r.stderr[-500:]}")
    return collect(local_dir, meta, clk_tck), info


ENV_SCRIPT = r"""
echo "kernel=$(uname -r)"
echo "fio=$(fio --version)"
echo "nproc=$(nproc)"
echo "clk_tck=$(getconf CLK_TCK)"
echo "python=$(python3 -c 'import sys; print(sys.version.split()[0])')"
echo "cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "mem_kib=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
echo "rootfs=$(findmnt -no FSTYPE,SOURCE / | tr ' ' ,)"
"""


def guest_environment(g) -> dict:
    r = g.exec(ENV_SCRIPT, timeout=120)
    env = {}
    for line in r.stdout.splitlines():
        k, sep, v = line.partition("=")
        if sep:
            env[k.strip()] = v.strip()
    return env


def health(g, dest: Path) -> dict:
    """dmesg and the server logs into the run folder; any splat in dmesg is reported."""
    r = g.exec("dmesg; echo @@@; for f in /var/log/ubdsrv/*.log; do [ -f \"$f\" ] && "
               "{ echo \"=== $f\"; tail -n 200 \"$f\"; }; done; true", timeout=60)
    dmesg, _, logs = r.stdout.partition("@@@\n")
    (dest / "dmesg.txt").write_text(dmesg)
    (dest / "server.log").write_text(logs)
    splats = [line for _, line in device.find_splats(dmesg.splitlines())]
    return {"dmesg_splats": splats[:50]}
