"""`python -m bench` (`just bench`): the Python ublk server against the kernel's null_blk and loop
drivers, side by side in one guest; a table, bench.json and a ratio chart (ratios.svg) in the run folder.

    python -m bench [--quick] [--compare OLD.json] [--results DIR] [--accel auto|kvm|tcg] [--cpus N]
    python -m bench --profile [loop|null]       one case with the server under cProfile
    python -m bench --report RUN.json [--compare OLD.json]   re-print a run (no guest)

Exit status: 0 every case measured, 1 some case failed, 2 bad input or setup error."""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from vm import options
from vm.cli_guard import guarded
from vm.errors import BenchError, CommandTimeout
from vm.paths import REPO

from . import cases as cases_mod, report, runner, svg

SCHEMA = 1
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")   # no "..", no "/", no leading dot


def _note(msg):
    print(msg, file=sys.stderr, flush=True)


def _git():
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"git_commit": git("rev-parse", "HEAD") or None,
            "git_dirty": bool(git("status", "--porcelain", "--", "ubdsrv", "bench", "vm")),
            "ubdsrv_sha256": _tree_hash(REPO / "ubdsrv")}


def _tree_hash(root: Path) -> str:
    """Content hash of the server that was pushed: tells runs of a dirty tree apart."""
    import hashlib
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _parser():
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short preset (the optimisation target only)")
    p.add_argument("--profile", nargs="?", const="loop", choices=cases_mod.TARGETS,
                   help="run the target case once with the server under cProfile (UBDSRV_PROFILE)")
    p.add_argument("--compare", metavar="OLD.json", help="print the per-case change against an earlier run")
    p.add_argument("--report", metavar="RUN.json", help="print the table of an earlier run (no guest)")
    p.add_argument("--only", metavar="TEXT", action="append",
                   help="keep only the cases whose id contains TEXT (repeatable)")
    p.add_argument("--runtime", type=float, help="seconds measured per fio run (preset default)")
    p.add_argument("--ramp", type=float, help="warm-up seconds per fio run (preset default)")
    p.add_argument("--repeats", type=int, help="runs per case and side; the median is reported")
    p.add_argument("--list", action="store_true", help="print the case matrix and the time estimate")
    options.add_arguments(p)   # --results DIR: the run folder (default results/bench-<time>/)
    return p


def _load(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or "cases" not in doc:
        raise BenchError(f"{path} is not a bench.json")
    if doc.get("measurements"):  # recompute with this version of the report code
        cs = [cases_mod.BenchCase.from_dict(e["case"]) for e in doc["cases"]]
        doc["cases"] = report.summarize(cs, doc["measurements"])
    return doc


def _select(a) -> cases_mod.Preset:
    name = "profile" if a.profile else "quick" if a.quick else "full"
    p = cases_mod.preset(name, a.runtime, a.ramp, a.repeats)
    cs = p.cases
    if a.profile:
        cs = tuple(cases_mod.BenchCase(a.profile, c.workload, c.engine, c.queues, c.iodepth) for c in cs)
    if a.only:
        cs = tuple(c for c in cs if any(t in c.id for t in a.only))
    if not cs:
        raise BenchError("no case left after --only")
    if p.repeats < 1 or p.runtime <= 0 or p.ramp < 0:
        raise BenchError("--repeats must be >= 1, --runtime > 0, --ramp >= 0")
    return cases_mod.Preset(p.name, cs, p.runtime, p.ramp, p.repeats)


def _print_compare(old_path, doc):
    old = _load(old_path)
    cmp = report.compare(old, doc)
    print()
    print(report.compare_table(cmp))
    return cmp


def run(a, preset, run_dir: Path) -> int:
    started = time.monotonic()
    run_dir.mkdir(parents=True, exist_ok=True)
    raw_dir = run_dir / "raw"
    doc = {"schema": SCHEMA,
           "run": {"name": run_dir.name, "preset": preset.name, "argv": sys.argv[1:],
                   "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   "runtime_s": preset.runtime, "ramp_s": preset.ramp, "repeats": preset.repeats,
                   "device_depth": runner.DEVICE_DEPTH, "backing_file": runner.BACKING_FILE,
                   "backing_mib": runner.BACKING_MIB},
           "environment": {"flavour": a.flavour, "kernel_tree": str(a.kernel_tree or ""),
                           "cpus": a.cpus, "memory": a.memory,
                           "host": platform.node(), "host_cpus": os.cpu_count(),
                           "host_load_start": os.getloadavg(), **_git()},
           "phases": [], "cases": [], "measurements": []}
    _note(f"bench: {preset.name} preset, {len(preset.cases)} cases x 2 sides x {preset.repeats} repeats "
          f"= {preset.runs()} fio runs of {preset.ramp:g}+{preset.runtime:g} s; "
          f"estimated {preset.estimate_seconds() / 60:.1f} min; results in {run_dir}")
    from vm.guest import Guest
    opts = options.guest_options(a, run_dir=run_dir, log=_note)
    measurements, failed_phase = [], None
    with Guest(opts) as g:
        _note(f"bench: guest ready in {g.boot_seconds:.1f} s ({g.accel})")
        env = runner.guest_environment(g)
        doc["environment"].update(accel=g.accel, kernel=env.get("kernel"), fio=env.get("fio"),
                                  guest_nproc=env.get("nproc"), guest_python=env.get("python"),
                                  cpu_model=env.get("cpu_model"), guest_mem_kib=env.get("mem_kib"),
                                  rootfs=env.get("rootfs"), clk_tck=env.get("clk_tck"),
                                  boot_s=round(g.boot_seconds, 2))
        clk_tck = int(env.get("clk_tck") or 100)
        profile = None
        if a.profile:
            profile = f"{runner.GUEST_DIR}/prof/ubd"
            g.exec(f"mkdir -p {runner.PROFILE_SITE}", timeout=30, check=True)
            g.push(Path(__file__).with_name("guest_profile.py"), f"{runner.PROFILE_SITE}/sitecustomize.py")
        for q in sorted({c.queues for c in preset.cases}, reverse=True):
            phase_cases = [c for c in preset.cases if c.queues == q]
            _note(f"bench: phase {q} queue(s): {len(phase_cases)} cases")
            try:
                ms, info = runner.run_phase(g, preset, q, phase_cases, raw_dir, clk_tck, _note, profile)
            except (runner.PhaseError, CommandTimeout) as e:
                _note(f"bench: error: {e}")
                failed_phase = str(e)
                doc["phases"].append({"queues": q, "error": str(e)})
                if not g.is_alive():
                    break
                g.exec(runner.TEARDOWN, timeout=120)
                continue
            doc["phases"].append(info)
            measurements += ms
        if a.profile and g.is_alive():
            doc["profile"] = _pull_profile(g, run_dir)
        if g.is_alive():
            doc["health"] = runner.health(g, run_dir)
    doc["measurements"] = measurements
    doc["cases"] = report.summarize(preset.cases, measurements)
    doc["run"]["wall_s"] = round(time.monotonic() - started, 1)
    doc["environment"]["host_load_end"] = os.getloadavg()
    if failed_phase:
        doc["run"]["error"] = failed_phase
    (run_dir / "bench.json").write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    (run_dir / "ratios.svg").write_text(_chart(doc))
    table = report.table(doc["cases"])
    (run_dir / "table.txt").write_text(table + "\n")
    print(table)
    if a.compare:
        cmp = _print_compare(a.compare, doc)
        (run_dir / "compare.json").write_text(json.dumps(cmp, indent=1) + "\n")
    for s in (doc.get("health") or {}).get("dmesg_splats", []):
        _note(f"bench: dmesg: {s}")
    if a.profile:
        _note(doc["profile"]["note"])
    load = max(doc["environment"]["host_load_start"][0], doc["environment"]["host_load_end"][0])
    if load > (os.cpu_count() or 1):
        _note(f"bench: note: the host was busy (load average {load:.1f} on {os.cpu_count()} CPUs): "
              "TCG numbers vary a lot between repeats; see the ratio ranges")
    _note(f"bench: {doc['run']['wall_s']:.0f} s wall; {run_dir}/bench.json, table.txt, ratios.svg")
    return 0 if all(e["ok"] for e in doc["cases"]) and not failed_phase else 1


def _chart(doc):
    env = doc.get("environment", {})
    r = doc.get("run", {})
    sub = (f"{r.get('preset')} preset, {env.get('kernel')}, {env.get('accel')}, {env.get('cpus')} vCPU; "
           f"fio {r.get('ramp_s')}+{r.get('runtime_s')} s x {r.get('repeats')} (median); "
           f"commit {str(env.get('git_commit'))[:10]}{'+dirty' if env.get('git_dirty') else ''}")
    return svg.chart(doc["cases"], f"ubd vs kernel drivers: {r.get('name')}", sub)


def _pull_profile(g, run_dir: Path) -> dict:
    """The server's cProfile dumps (if it honours UBDSRV_PROFILE), pulled and summarised."""
    # regular files only, by plain names: a guest must never make us write outside the run folder
    r = g.exec(f"find {runner.GUEST_DIR}/prof -maxdepth 1 -type f -printf '%f\\n' 2>/dev/null",
               timeout=30)
    names = [n for n in r.stdout.splitlines() if n]
    refused = [n for n in names if not SAFE_NAME.fullmatch(n)]
    if refused:
        raise BenchError(f"bench: profile: the guest listed files with unsafe names: {refused[:5]}")
    if not names:
        return {"files": [], "note": "bench: profile: no profile was written (expected cProfile dumps "
                                     f"under {runner.GUEST_DIR}/prof; see {runner.PROFILE_SITE})"}
    import io
    import pstats
    dest = run_dir / "profile"
    dest.mkdir(exist_ok=True)
    text = io.StringIO()
    got = []
    for n in names:
        g.pull(f"{runner.GUEST_DIR}/prof/{n}", dest / n)
        got.append(n)
    # the queue processes do the IO work: their profiles first, then one merged view of them
    queues = [n for n in got if ".ubdq" in n]
    for n in queues + [n for n in got if n not in queues]:
        try:
            st = pstats.Stats(str(dest / n), stream=text)
            text.write(f"==== {n}\n")
            st.sort_stats("tottime").print_stats(25 if n in queues else 8)
        except Exception as e:  # a dump from another Python version, or a non-profile file
            text.write(f"==== {n}: not readable by pstats here ({e})\n")
    (dest / "top.txt").write_text(text.getvalue())
    print(text.getvalue())
    return {"files": got, "note": f"bench: profile: {len(got)} file(s) in {dest}; summary in {dest}/top.txt"}


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    return guarded(lambda: _main(a), prefix="bench: ")


def _main(a) -> int:
    if a.report:
        doc = _load(a.report)
        print(report.table(doc["cases"]))
        if a.compare:
            _print_compare(a.compare, doc)
        return 0
    if a.compare:
        _load(a.compare)  # fail before spending minutes on a run
    preset = _select(a)
    if a.list:
        for c in preset.cases:
            print(c.id)
        print(f"{len(preset.cases)} cases, {preset.runs()} fio runs, "
              f"estimated {preset.estimate_seconds() / 60:.1f} min")
        return 0
    return run(a, preset, options.run_dir(a, "bench-"))


if __name__ == "__main__":
    sys.exit(main())
