"""Runs in the guest (python3, standard library only): the per-IO cost of the server against null_blk,
several server variants side by side in one guest session, interleaved, then perf on each.

    python3 guest_run.py PLAN.json OUT_DIR

The plan (written by bench/profile/__main__.py) names the fio argv (with {dev} and {out}), the
null_blk module parameters, the server variants (each its own ublk device, its own environment), the
preemption modes to cycle through (/sys/kernel/debug/sched/preempt), the repeats and the perf passes.
Every measurement goes to OUT_DIR/results.json; perf's text reports to OUT_DIR/perf/."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PREEMPT = "/sys/kernel/debug/sched/preempt"
# /proc/stat cpu line: user nice system idle iowait irq softirq steal
BUSY = ("user", "nice", "system", "irq", "softirq", "steal")


def sh(cmd, check=True, **kw):
    r = subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True, text=True, **kw)
    if check and r.returncode:
        raise SystemExit(f"guest_run: {cmd!r} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return r


def queue_pids(dev_id, comm_prefix=None):
    """The queue processes of one ubd device (ubdsrv/daemon.py names them ubdq<dev>.<queue>), or
    the processes whose name starts with comm_prefix (a C server: its queues are threads)."""
    prefix = comm_prefix or f"ubdq{dev_id}."
    out = []
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm.startswith(prefix):
            out.append(int(p))
    return sorted(out)


def proc_times(pids):
    """{pid: (utime, stime)} in ticks."""
    out = {}
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
            out[p] = (int(rest[11]), int(rest[12]))
        except OSError:
            pass
    return out


def cpu_totals():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return dict(zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), v))


def preempt_mode():
    try:
        with open(PREEMPT) as f:
            return next(w.strip("()") for w in f.read().split() if w.startswith("("))
    except (OSError, StopIteration):
        return None


def set_preempt(mode):
    if mode and preempt_mode() != mode:
        with open(PREEMPT, "w") as f:
            f.write(mode)


def fio_argv(plan, dev, out):
    return [a.replace("{dev}", dev).replace("{out}", out) for a in plan["fio"]]


def fio_ios(path):
    with open(path) as f:
        text = f.read()
    doc = json.loads(text[text.find("{"):])
    job = doc["jobs"][0]
    return job["read"]["total_ios"] + job["write"]["total_ios"], job["read"]["iops"] + job["write"]["iops"]


def measure(plan, out, name, dev, pids, mode, rnd):
    set_preempt(mode)
    tag = f"{name}.{mode or 'boot'}.r{rnd}"
    js = f"{out}/fio/{tag}.json"
    p0, c0, t0 = proc_times(pids), cpu_totals(), time.monotonic()
    r = subprocess.run(fio_argv(plan, dev, js), capture_output=True, text=True)
    t1, c1, p1 = time.monotonic(), cpu_totals(), proc_times(pids)
    rec = {"run": tag, "device": name, "preempt": mode, "round": rnd, "rc": r.returncode,
           "wall_s": t1 - t0}
    if r.returncode:
        rec["error"] = r.stderr.strip()[-500:]
        return rec
    ios, iops = fio_ios(js)
    us = 1e6 / CLK_TCK / ios
    rec.update(ios=ios, iops=iops,
               srv_user_us=sum(p1[p][0] - p0[p][0] for p in p1 if p in p0) * us,
               srv_sys_us=sum(p1[p][1] - p0[p][1] for p in p1 if p in p0) * us,
               sys_busy_us={k: (c1[k] - c0[k]) * us for k in BUSY},
               sys_idle_us=(c1["idle"] - c0["idle"]) * us)
    return rec


def dev_reads(dev):
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        return int(f.read().split()[0])


def perf_window(cmd, plan, dev):
    """One perf run over a busy device; returns the IOs the device completed while perf counted.

    perf starts disabled (`-D -1`) on an idle guest, then fio starts, and perf is enabled through
    its control fifo for perf_seconds. Two reasons: perf's start-up (seconds under TCG) stays out of
    the counts, and the kernel live-patches its static branches (tracepoints, perf's scheduler
    hooks) when perf opens and closes its events: QEMU's multi-threaded TCG can then run stale code
    on the other vCPU (an int3 Oops in a hot path, seen here in handle_softirqs). Patching while
    the guest is idle keeps that away from the code fio and the server are running."""
    ctl, ack = "/run/perf-ctl", "/run/perf-ack"
    for f in (ctl, ack):
        if os.path.exists(f):
            os.unlink(f)
        os.mkfifo(f)
    argv = [*cmd[:2], "-D", "-1", "--control", f"fifo:{ctl},{ack}", *cmd[2:]]
    if any("{self_pid}" in a for a in argv):
        # perf's own pid in its arguments: through a shell that execs it, $$ is that pid
        argv = ["sh", "-c", "exec " + " ".join(shlex.quote(a).replace("{self_pid}", "'$$'")
                                              for a in argv)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    argv = [a for a in fio_argv(plan, dev, "/dev/null") if not a.startswith(("--runtime", "--output"))]
    # perf opens its ends of the fifos once its events are set up; a perf that fails exits instead
    while True:
        try:
            fd = os.open(ctl, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError:   # ENXIO: no reader yet
            if proc.poll() is not None:
                raise SystemExit(f"guest_run: {' '.join(argv)} failed: {proc.stderr.read()[-800:]}")
            time.sleep(0.1)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "w") as c, open(ack) as a:
        def say(word):
            c.write(word + "\n")
            c.flush()
            a.readline()
        time.sleep(1)
        fio = subprocess.Popen(argv + ["--runtime=3600"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            time.sleep(plan["perf_delay"])
            say("enable")
            n0, t0 = dev_reads(dev), time.monotonic()
            time.sleep(plan["perf_seconds"])
            say("disable")
            n1, t1 = dev_reads(dev), time.monotonic()
        finally:
            fio.send_signal(signal.SIGINT)
            fio.wait(timeout=120)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=600)[1]
    return {"rc": proc.returncode, "ios": n1 - n0, "seconds": t1 - t0, "iops": (n1 - n0) / (t1 - t0),
            "stderr": err.strip()[-800:]}


def perf_pass(plan, out, name, dev, pids, mode):
    """perf stat (system-wide, event counts per IO), perf record -g of the server's queue processes
    and of the whole guest, each in its own window (perf_window)."""
    set_preempt(mode)
    tag = f"{name}.{mode or 'boot'}"
    d = f"{out}/perf"
    res = {"stat": perf_window(["perf", "stat", "-x", ";", "-a", "-e", ",".join(plan["perf_events"]),
                                "-o", f"{d}/{tag}.stat.csv"], plan, dev)}
    # which syscalls and user page faults, by process name (e.g. "ubdq0.1 NR 426")
    # (perf's own syscalls filtered out: each write of its data would be recorded, and so on)
    res["syscalls"] = perf_window(["perf", "record", "-q", "-e", "raw_syscalls:sys_enter",
                                   "--filter", "common_pid != {self_pid}",
                                   "-e", "exceptions:page_fault_user", "-a",
                                   "-o", f"{d}/{tag}.syscalls.data"], plan, dev)
    script = subprocess.run(["perf", "script", "-i", f"{d}/{tag}.syscalls.data", "-F", "comm,event,trace"],
                            capture_output=True, text=True).stdout
    counts = {}
    for line in script.splitlines():
        f = line.split()
        if len(f) < 2:
            continue
        what = " ".join(f[2:4]) if "sys_enter" in f[1] else "page_fault_user"
        key = f"{f[0]} {what}"
        counts[key] = counts.get(key, 0) + 1
    res["syscalls"]["by_comm"] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:30])
    os.unlink(f"{d}/{tag}.syscalls.data")
    # for null_blk there is no server: the whole guest only
    for kind, who in (("record", ["-p", ",".join(map(str, pids))] if pids else None),
                      ("record_all", ["-a"])):
        if not who:
            continue
        res[kind] = perf_window(["perf", "record", "-q", "-g", "-e", "cpu-clock", "-F",
                                 str(plan["perf_freq"]), *who, "-o", f"{d}/{tag}.{kind}.data"],
                                plan, dev)
        # own time per symbol; time under each symbol (inclusive); the call chains into the top ones
        for suffix, args in (("flat", ["--no-children", "-g", "none", "--sort", "comm,dso,sym"]),
                             ("children", ["--children", "-g", "none", "--sort", "sym",
                                           "--percent-limit", "1"]),
                             ("graph", ["--no-children", "--sort", "sym", "-g", "caller,2",
                                        "--percent-limit", "2"])):
            with open(f"{d}/{tag}.{kind}.{suffix}.txt", "w") as f:
                subprocess.run(["perf", "report", "-i", f"{d}/{tag}.{kind}.data", "--stdio", *args],
                               stdout=f, stderr=subprocess.DEVNULL)
    return res


def main():
    plan = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    for sub in ("fio", "perf"):
        os.makedirs(f"{out}/{sub}", exist_ok=True)
    sh("modprobe ublk_drv")
    sh("ublk del -a >/dev/null 2>&1 || true; modprobe -r null_blk 2>/dev/null || true")
    sh("modprobe null_blk " + " ".join(f"{k}={v}" for k, v in plan["null_blk"].items()))
    devices = [("null_blk", "/dev/nullb0", [])]
    for i, v in enumerate(plan["variants"]):
        env = dict(os.environ, **v.get("env", {}))
        sh((v.get("add") or plan["ublk_add"]).replace("{id}", str(i)), env=env)
        if not os.path.exists(f"/dev/ublkb{i}"):
            raise SystemExit(f"guest_run: variant {v['name']}: no /dev/ublkb{i} after adding it")
        pids = queue_pids(i, v.get("comm"))
        if not pids:
            raise SystemExit(f"guest_run: variant {v['name']}: no server process found")
        devices.append((v["name"], f"/dev/ublkb{i}", pids))
    modes = plan.get("preempt") or [preempt_mode()]
    info = {"uname": sh("uname -r").stdout.strip(), "cmdline": open("/proc/cmdline").read().strip(),
            "boot_preempt": preempt_mode(), "clk_tck": CLK_TCK, "ublk_list": sh("ublk list").stdout,
            "vulnerabilities": sh("grep -r . /sys/devices/system/cpu/vulnerabilities/ || true").stdout,
            "cpu_flags": sorted(set(next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo")
                                          if l.startswith("flags")), []))),
            "pids": {name: pids for name, _, pids in devices}, "plan": plan}
    runs = []
    n = len(devices)
    for rnd in range(plan["repeats"]):
        for m in (modes if rnd % 2 == 0 else modes[::-1]):
            for k in range(n):   # rotate who goes first, so a drift of the host hits every device
                name, dev, pids = devices[(k + rnd) % n]
                rec = measure(plan, out, name, dev, pids, m, rnd)
                runs.append(rec)
                print(json.dumps({x: rec.get(x) for x in ("run", "iops", "srv_user_us", "srv_sys_us")}),
                      flush=True)
    perf = {}
    save(out, info, runs, perf)   # the timings survive a failing perf pass
    if plan.get("perf_events") is not None:
        for m in modes:
            for name, dev, pids in devices:
                perf[f"{name}.{m}"] = perf_pass(plan, out, name, dev, pids, m)
                print(f"perf {name} {m}: {perf[f'{name}.{m}']}", flush=True)
    set_preempt(info["boot_preempt"])
    for v in plan["variants"]:
        if v.get("delete"):
            sh(v["delete"], check=False)
    sh("ublk del -a; modprobe -r null_blk", check=False)
    save(out, info, runs, perf)


def save(out, info, runs, perf):
    with open(f"{out}/results.json", "w") as f:
        json.dump({"info": info, "runs": runs, "perf": perf}, f, indent=1)


if __name__ == "__main__":
    main()
