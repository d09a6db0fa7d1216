"""Host commands: `python -m vm exec|shell|image|bench-boot` (the justfile's recipes call these)."""
import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import flavours, image, image_cache, options
from .cli_guard import guarded
from .errors import BenchError, CommandTimeout
from .guest import Guest


def _note(msg):
    print(msg, file=sys.stderr, flush=True)


def _guest_opts(a, **kw):
    return options.guest_options(a, log=_note, **kw)


def cmd_exec(a) -> int:
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        raise BenchError("vm-exec: no command given (usage: just vm-exec -- CMD [ARGS...])")
    line = command[0] if len(command) == 1 else " ".join(_sh_quote(c) for c in command)
    with Guest(_guest_opts(a, run_dir=a.results)) as g:
        _note(f"guest: ready in {g.boot_seconds:.1f} s; running: {line}")
        out, err = sys.stdout.buffer, sys.stderr.buffer
        try:
            r = g.exec(line, timeout=a.timeout, on_stdout=lambda d: (out.write(d), out.flush()),
                       on_stderr=lambda d: (err.write(d), err.flush()))
        except CommandTimeout as e:
            _note(f"error: {e}")
            return 124  # as coreutils' timeout does
        return r.status


def _sh_quote(s):
    import shlex
    return shlex.quote(s)


def cmd_shell(a) -> int:
    with Guest(_guest_opts(a, run_dir=a.results)) as g:
        _note(f"guest: ready in {g.boot_seconds:.1f} s ({g.accel}); exit the shell to tear it down")
        return subprocess.call(g.ssh_argv())


def cmd_image(a) -> int:
    if a.prune:
        freed = image_cache.prune(_note)
        print(f"pruned the image cache: {freed / 2**20:.0f} MiB freed")
        return 0
    if a.print_key:   # the CI cache key: the image's folder name, which holds the recipe hash
        print(image._entry_dir(flavours.get(a.flavour), a.profile_image).name)
        return 0
    img = image.ensure(a.flavour, rebuild=a.rebuild, log=_note, profile=a.profile_image)
    print(f"{img.dir}\nkernel {img.kernel_release}")
    return 0


def _boot_times(a, cold: bool, rounds: int) -> tuple:
    """Seconds from QEMU's start to the first SSH command answered, over `rounds` guests started
    warm (restored: vm/warm.py) or cold. A warm round that booted cold instead (the saved state
    was missing, or the restore failed) is said and not counted. Returns (times, accelerator)."""
    what = "cold" if cold else "warm"
    times, tries = [], 0
    while len(times) < rounds:
        tries += 1
        if tries > rounds + 2:
            raise BenchError(f"bench-boot: {len(times)} of {rounds} {what} starts were warm after "
                             f"{tries - 1} tries; see the log above for why")
        with tempfile.TemporaryDirectory(prefix="ubd-bootbench-") as tmp:
            kept = a.results / f"{what}-{tries}" if a.results else Path(tmp)
            opts = dataclasses.replace(_guest_opts(a, run_dir=kept, push_server=False), cold=cold)
            with Guest(opts) as g:
                g.exec("true", timeout=30, check=True)
                took = time.monotonic() - g.machine.started_at
                if not cold and g.machine.restored_from is None:
                    _note(f"{what} {tries}: booted cold ({took:.2f} s), not counted")
                    continue
                times.append(took)
                accel = g.accel
                _note(f"{what} {len(times)}/{rounds}: {took:.2f} s to SSH-ready ({g.accel})")
    return times, accel


def cmd_bench_boot(a) -> int:
    """Warm starts and cold boots (fresh overlays each time), side by side: seconds from QEMU's
    start to the first SSH command answered. --cold: the cold boots only."""
    if a.boots < 1:
        raise BenchError(f"bench-boot: --boots must be 1 or more, got {a.boots}")
    img = image.ensure(a.flavour, log=_note, profile=a.profile_image)
    modes = (True,) if a.cold else (False, True)
    results = {cold: _boot_times(a, cold, a.boots) for cold in modes}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"boot to SSH-ready, {a.boots} rounds each ({a.flavour}, {img.kernel_release}, "
          f"{a.cpus} vCPU, {a.memory}, {results[True][1]}; host load average {load}):")
    for cold, (times, _) in results.items():
        print(f"  {'cold' if cold else 'warm'}: min {min(times):.2f} s, median "
              f"{statistics.median(times):.2f} s, max {max(times):.2f} s")
    return 0


def _parser():
    p = argparse.ArgumentParser(prog="python -m vm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    # --results: keep console.log and the overlay there (default: a temporary folder, removed)
    sp = sub.add_parser("exec", help="run one command in a fresh guest; its exit status is ours")
    options.add_arguments(sp)
    sp.add_argument("--timeout", type=float, default=600.0)
    sp.add_argument("command", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_exec)
    sp = sub.add_parser("shell", help="interactive root shell in a fresh guest, torn down on exit")
    options.add_arguments(sp)
    sp.set_defaults(fn=cmd_shell)
    sp = sub.add_parser("image", help="build the guest image if its recipe changed (or --rebuild)")
    options.add_arguments(sp, only=("flavour", "profile_image"))
    sp.add_argument("--rebuild", action="store_true")
    sp.add_argument("--print-key", action="store_true", help="print the image's cache key and exit")
    sp.add_argument("--prune", action="store_true",
                    help="remove cached images that no current recipe uses (older recipes, dead builds)")
    sp.set_defaults(fn=cmd_image)
    sp = sub.add_parser("bench-boot", help="warm start and cold boot times side by side: min / "
                                          "median / max over several rounds each")
    options.add_arguments(sp)
    sp.add_argument("--boots", type=int, default=5)
    sp.set_defaults(fn=cmd_bench_boot)
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    return guarded(lambda: a.fn(a))


if __name__ == "__main__":
    sys.exit(main())
