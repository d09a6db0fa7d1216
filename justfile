# ubd test bench. Every recipe first makes sure the host has what it needs (vm/setup.sh).
set positional-arguments
set shell := ["bash", "-euo", "pipefail", "-c"]

py := ".venv/bin/python"

# List the recipes.
default:
    @just --list

# Install the host's packages and the .venv (idempotent; quiet when nothing is missing).
setup:
    @vm/setup.sh

# Run scenarios: `just run scenario/kill_daemon`; no argument lists them.
run *ARGS: setup
    @{{py}} -m vm.scenario run "$@"

# Run every shipped scenario (`-j N`: N guests at once; `--shard I/N`: a CI runner's share).
run-all *ARGS: setup
    @{{py}} -m vm.scenario run-all "$@"

# Scenarios (default: every shipped one) on every kernel flavour, plus `--kernel-tree DIR`: one table.
run-matrix *ARGS: setup
    @{{py}} -m vm.scenario run-matrix "$@"

# The whole test suite: host tests, guest tests and scenarios (boots real guests), on 2 pytest-xdist
# workers, each with its own guests (`-n N` to change, `-n 0` for one process): on 2 cores the suite
# took 18 min this way against 26 min in one process, since most of a guest test is waiting.
test *ARGS: setup
    @{{py}} -m pytest -n 2 "$@"

# Host-only tests (no VM).
test-host *ARGS: setup
    @{{py}} -m pytest tests/host "$@"

# Build the guest image if its recipe changed; `just image --rebuild` forces it.
image *ARGS: setup
    @{{py}} -m vm image "$@"

# An interactive root shell in a fresh guest, torn down on exit.
shell *ARGS: setup
    @{{py}} -m vm shell "$@"

# One command in a fresh guest: `just vm-exec -- uname -r`; its exit status becomes ours.
vm-exec *ARGS: setup
    @{{py}} -m vm exec "$@"

# Cold boot time to SSH-ready: min / median / max over several boots.
bench-boot *ARGS: setup
    @{{py}} -m vm bench-boot "$@"

# The Python server against the kernel's loop and null_blk drivers; `--quick` for a short preset.
bench *ARGS: setup
    @{{py}} -m bench "$@"

# The kernel's own ublk selftests in the guest (`--flavour F | --kernel-tree DIR`, `-k PATTERN`).
selftests *ARGS: setup
    @{{py}} -m vm.selftests "$@"

# One scenario x kernel table from several runs (the nightly workflow's shards); needs no guest.
merge *ARGS:
    @python3 -m vm.scenario.matrix "$@"

# The bench scores itself: `just mutants --kernel-tree DIR [--mutants DIR] [--scenarios NAME...]`
# builds each kernel/mutants/*.patch variant of ublk_drv and runs the scenarios until one kills it.
mutants *ARGS: setup
    @{{py}} -m vm.mutants "$@"

# The long tests (pytest marker `nightly`, deselected elsewhere): e.g. a real mutation run.
nightly *ARGS: setup
    @{{py}} -m pytest -m nightly "$@"
