"""Host commands: `python -m vm exec|shell|image|bench-boot` (the justfile's recipes call these)."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import flavours, image, image_cache, kernel_tree
from .cli_guard import guarded
from .errors import BenchError, CommandTimeout
from .guest import Guest, GuestOptions


def _note(msg):
    print(msg, file=sys.stderr, flush=True)


def _guest_opts(a, **kw) -> GuestOptions:
    return GuestOptions(flavour=a.flavour, accel=a.accel, cpus=a.cpus, memory=a.memory, log=_note,
                        kernel_tree=a.kernel_tree, kernel_debug=a.debug_kernel, **kw)


def cmd_exec(a) -> int:
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        raise BenchError("vm-exec: no command given (usage: just vm-exec -- CMD [ARGS...])")
    line = command[0] if len(command) == 1 else " ".join(_sh_quote(c) for c in command)
    keep = Path(a.run_dir) if a.run_dir else None
    with Guest(_guest_opts(a, run_dir=keep)) as g:
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
    with Guest(_guest_opts(a)) as g:
        _note(f"guest: ready in {g.boot_seconds:.1f} s ({g.accel}); exit the shell to tear it down")
        return subprocess.call(g.ssh_argv())


def cmd_image(a) -> int:
    if a.prune:
        freed = image_cache.prune(_note)
        print(f"pruned the image cache: {freed / 2**20:.0f} MiB freed")
        return 0
    img = image.ensure(a.flavour, rebuild=a.rebuild, log=_note)
    print(f"{img.dir}\nkernel {img.kernel_release}")
    return 0


def cmd_bench_boot(a) -> int:
    """Cold boots (fresh overlay each time) from QEMU start to the first SSH command answered."""
    image.ensure(a.flavour, log=_note)
    times = []
    for i in range(a.boots):
        with tempfile.TemporaryDirectory(prefix="ubd-bootbench-") as tmp:
            with Guest(_guest_opts(a, run_dir=Path(tmp), push_server=False)) as g:
                g.exec("true", timeout=30, check=True)
                took = time.monotonic() - g.machine.started_at
                times.append(took)
                _note(f"boot {i + 1}/{a.boots}: {took:.2f} s to SSH-ready ({g.accel})")
    print(f"cold boot to SSH-ready over {len(times)} boots ({g.accel}, {a.cpus} vCPU, {a.memory}): "
          f"min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    return 0


def _parser():
    p = argparse.ArgumentParser(prog="python -m vm", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def machine_opts(sp):
        sp.add_argument("--flavour", default=os.environ.get("UBD_FLAVOUR", flavours.DEFAULT),
                        help="kernel flavour from kernel/flavours.toml (default: %(default)s)")
        sp.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                        default=os.environ.get("UBD_ACCEL", "auto"))
        sp.add_argument("--cpus", type=int, default=2)
        sp.add_argument("--memory", default="2G")
        kernel_tree.add_arguments(sp)

    sp = sub.add_parser("exec", help="run one command in a fresh guest; its exit status is ours")
    machine_opts(sp)
    sp.add_argument("--timeout", type=float, default=600.0)
    sp.add_argument("--run-dir", help="keep console.log etc. here instead of a temp dir")
    sp.add_argument("command", nargs=argparse.REMAINDER)
    sp.set_defaults(fn=cmd_exec)
    sp = sub.add_parser("shell", help="interactive root shell in a fresh guest, torn down on exit")
    machine_opts(sp)
    sp.set_defaults(fn=cmd_shell)
    sp = sub.add_parser("image", help="build the guest image if its recipe changed (or --rebuild)")
    sp.add_argument("--flavour", default=os.environ.get("UBD_FLAVOUR", flavours.DEFAULT))
    sp.add_argument("--rebuild", action="store_true")
    sp.add_argument("--prune", action="store_true",
                    help="remove cached images that no current recipe uses (older recipes, dead builds)")
    sp.set_defaults(fn=cmd_image)
    sp = sub.add_parser("bench-boot", help="cold boot time: min / median / max over several boots")
    machine_opts(sp)
    sp.add_argument("--boots", type=int, default=5)
    sp.set_defaults(fn=cmd_bench_boot)
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    return guarded(lambda: a.fn(a))


if __name__ == "__main__":
    sys.exit(main())
