"""The guest options, defined once for every front end: `python -m vm`, `python -m vm.scenario`,
`python -m bench` and the pytest plugin (tests/ and scenarios/) all take the options of GUEST below,
with the same flag, environment variable and default.

The command line beats the environment, which beats the default. A bad value (an unknown flavour, a
kernel tree that is not one) is refused while the options are parsed: exit status 2, nothing started.
A new option (a `-j N`) is one more row here, and every front end has it; `--flavour all` would be
`_flavour` accepting "all" and the front ends running once per flavour `values()` names."""
import argparse
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import flavours, kernel_tree
from .errors import BenchError
from .paths import results_dir

ACCELS = ("auto", "kvm", "tcg")


ALL_FLAVOURS = "all"   # --flavour all: the scenario front ends run once per flavour (flavours())


def _flavour(name: str) -> str:
    if name != ALL_FLAVOURS:
        flavours.get(name)   # BenchError naming the known flavours and the file
    return name


def _cpus(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 64:
        raise ValueError(f"expected 1 to 64 virtual CPUs, got {n}")
    return n


def _memory(text: str) -> str:
    if not re.fullmatch(r"[1-9]\d*[MG]", text):
        raise ValueError(f"expected QEMU's form, e.g. 2G or 1536M, got {text!r}")
    return text


def _accel(text: str) -> str:
    if text not in ACCELS:
        raise ValueError(f"expected one of {', '.join(ACCELS)}, got {text!r}")
    return text


@dataclass(frozen=True)
class Option:
    dest: str                  # attribute of the parsed options (GuestOptions' field when guest)
    flag: str
    env: str                   # the environment variable that changes the default
    default: object
    help: str
    parse: Callable = str      # text -> value, for the command line and the environment alike
    switch: bool = False       # takes no value; the environment turns it on with 1
    metavar: str = None
    guest: bool = True         # a field of vm.guest.GuestOptions
    short: str = None          # a one-letter flag as well (-j); argparse front ends only

    def env_default(self):
        """The default, as the environment changes it (text, parsed later like a command line)."""
        raw = os.environ.get(self.env) or None
        if self.switch:
            return raw == "1" if raw is not None else self.default
        return raw if raw is not None else self.default

    def convert(self, text):
        try:
            return self.parse(text)
        except (ValueError, BenchError) as e:
            raise argparse.ArgumentTypeError(f"{e} (from {self.flag} or {self.env})") from None


GUEST = (
    Option("flavour", "--flavour", "UBD_FLAVOUR", flavours.DEFAULT,
           "kernel flavour from kernel/flavours.toml (`all`: each in turn, for the scenario "
           "commands)", _flavour, metavar="NAME"),
    Option("accel", "--accel", "UBD_ACCEL", "auto",
           "QEMU accelerator: auto tries KVM (a real start proves it), else TCG", _accel,
           metavar="|".join(ACCELS)),
    Option("cpus", "--cpus", "UBD_CPUS", 2, "virtual CPUs of the guest", _cpus, metavar="N"),
    Option("memory", "--memory", "UBD_MEMORY", "2G", "guest memory", _memory, metavar="SIZE"),
    Option("kernel_tree", "--kernel-tree", "UBD_KERNEL_TREE", None,
           "build the guest kernel from this Linux source tree (out of tree, cached) and boot it "
           "on the flavour's root filesystem", kernel_tree.check_tree, metavar="DIR"),
    Option("kernel_debug", "--debug-kernel", "UBD_KERNEL_DEBUG", False,
           "with --kernel-tree: add kernel/debug.config (KASAN, lockdep, ...)", switch=True),
    Option("profile_image", "--profile-image", "UBD_PROFILE_IMAGE", False,
           "boot the flavour's `profile` image: linux-perf installed, kernel symbols and perf events "
           "open to root (vm/image.py)", switch=True),
    Option("cold", "--cold", "UBD_COLD", False,
           "boot every guest cold: do not restore the booted guest saved after the first cold boot "
           "of this image and machine shape (vm/warm.py)", switch=True),
    Option("results", "--results", "UBD_RESULTS", None,
           "the run's folder (default: a new one under $UBD_RESULTS, itself default results/; "
           "for `vm exec` and `vm shell` a temporary one)",
           Path, metavar="DIR", guest=False),
)
BY_DEST = {o.dest: o for o in GUEST}


def _jobs(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 16:
        raise ValueError(f"expected 1 to 16 guests at once, got {n}")
    return n


def _shard(text: str) -> tuple:
    from .scenario import shard
    return shard.parse(text)


def _target(text: str):
    from .scenario import target
    return target.parse(text)


# How and where a scenario run is spread: `python -m vm.scenario` (run, run-all, run-matrix). The
# pytest route has xdist's `-n N` for jobs and scenarios/conftest.py's --shard (the same parse).
RUN = (
    Option("jobs", "--jobs", "UBD_JOBS", 1,
           "guests at once, each with its own overlay, port and folder", _jobs, metavar="N",
           guest=False, short="-j"),
    Option("shard", "--shard", "UBD_SHARD", None,
           "run only share I of N of the cases (by a hash of the case id: stable when scenarios "
           "are added)", _shard, metavar="I/N", guest=False),
    Option("target", "--target", "UBD_TARGET", None,
           "run on this existing machine instead of booting guests: ssh://USER@HOST[:PORT] or "
           "vagrant[:NAME]; its kernel must have ublk, its host key must be in --known-hosts",
           _target, metavar="URL", guest=False),
    Option("target_identity", "--target-identity", "UBD_TARGET_IDENTITY", None,
           "with --target: log in with this private key too (besides the ssh agent and ~/.ssh/id_*)",
           Path, metavar="FILE", guest=False),
    Option("known_hosts", "--known-hosts", "UBD_KNOWN_HOSTS", "~/.ssh/known_hosts",
           "with --target: the known_hosts file that must hold the target's host key", Path,
           metavar="FILE", guest=False),
)


def default(dest: str):
    """The built-in default (no environment): for GuestOptions and the engine's own dataclasses."""
    return BY_DEST[dest].default


def _help(o: Option) -> str:
    shown = "" if o.default in (None, False) else f"; default {o.default}"
    return o.help if o.env in o.help else f"{o.help} (env {o.env}{shown})"


def _specs(only=None, table=GUEST):
    """(flag, keyword arguments) of each option, for argparse and pytest alike."""
    for o in table:
        if only is not None and o.dest not in only:
            continue
        kw = {"dest": o.dest, "help": _help(o)}
        if o.switch:
            kw.update(action="store_true", default=o.env_default())
        else:
            # the run folder's default is named later, under $UBD_RESULTS (run_dir)
            raw = o.env_default()
            # argparse converts a text default itself; pytest does not
            kw.update(type=o.convert, metavar=o.metavar,
                      default=None if o.dest == "results" else
                      o.convert(raw) if isinstance(raw, str) and table is RUN else raw)
        yield o.flag, kw


def add_arguments(parser, only=None):
    """The guest options (or the `only` ones, by dest) on an argparse parser or sub-parser."""
    g = parser.add_argument_group("guest options")
    for flag, kw in _specs(only):
        g.add_argument(flag, **kw)


def add_run_arguments(parser):
    """-j N, --shard I/N, --target URL (and its key options), for the scenario front ends."""
    g = parser.add_argument_group("run options")
    for o, (flag, kw) in zip(RUN, _specs(table=RUN)):
        g.add_argument(*([o.short] if o.short else []), flag, **kw)


def add_pytest_shard_option(group):
    """--shard I/N for the scenarios' pytest plugin (the same row as the scenario front ends')."""
    flag, kw = next((f, kw) for o, (f, kw) in zip(RUN, _specs(table=RUN)) if o.dest == "shard")
    group.addoption(flag, **kw)


def flavours_of(a) -> list:
    """The flavours a run covers: every one in kernel/flavours.toml for --flavour all."""
    return sorted(flavours.load_all()) if a.flavour == ALL_FLAVOURS else [a.flavour]


def add_pytest_options(parser):
    """The same options for pytest (`pytest --flavour backports`). Both conftest files call it; the
    first call registers them."""
    g = parser.getgroup("guest", "ubd guest options (vm/options.py)")
    if any(opt.dest == GUEST[0].dest for opt in g.options):
        return
    for flag, kw in _specs():
        g.addoption(flag, **kw)
    add_pytest_shard_option(parser.getgroup("run", "how the session is spread (vm/options.py)"))


def values(a) -> dict:
    """GuestOptions' fields from parsed options (an argparse namespace or pytest's config.option)."""
    if getattr(a, "flavour", None) == ALL_FLAVOURS:
        raise BenchError("--flavour all: only the scenario commands (run, run-all, run-matrix) "
                         "run on every flavour; name one flavour here")
    return {o.dest: getattr(a, o.dest) for o in GUEST if o.guest}


def guest_options(a, **kw):
    """A vm.guest.GuestOptions from parsed options; kw adds the rest (run_dir, log, ...)."""
    from .guest import GuestOptions
    return GuestOptions(**values(a), **kw)


def run_dir(a, prefix: str) -> Path:
    """--results, or a new folder under $UBD_RESULTS named PREFIX<time>."""
    return Path(a.results) if a.results else results_dir() / (prefix + time.strftime("%Y%m%d-%H%M%S"))


def pytest_run_dir(config) -> Path:
    """The folder of a pytest session, shared by its guests and scenarios: --results, or a new one
    under $UBD_RESULTS named pytest-<time> (fixed on first use, so both conftest files agree).
    An xdist worker uses the controller's (handed over by pytest_configure_node)."""
    if config.option.results is None:
        given = getattr(config, "workerinput", {}).get("ubd_results")
        config.option.results = Path(given) if given else run_dir(config.option, "pytest-")
    return Path(config.option.results)


def pytest_check(config):
    """pytest_configure: options pytest cannot honour, refused before anything is collected."""
    import pytest
    if config.option.flavour == ALL_FLAVOURS:
        raise pytest.UsageError("--flavour all: pytest runs on one flavour; for every flavour use "
                                "`just run-matrix` (or `just run-all --flavour all`)")


def pytest_worker(config) -> str:
    """The xdist worker's id (gw0, ...), "" without xdist: a prefix that keeps workers' guest
    folders apart."""
    return getattr(config, "workerinput", {}).get("workerid", "")


def pytest_configure_node(node):
    """xdist, on the controller: every worker writes into the controller's run folder."""
    node.workerinput["ubd_results"] = str(pytest_run_dir(node.config))
