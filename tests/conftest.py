"""Shared fixtures: booted guests. `guest` is shared by the tests that cannot harm it (rebooted only if
a test left it dead); `fresh_guest` is a new one for tests that crash or taint the kernel.

There are no skips: a VM test whose prerequisites are missing fails, in CI and everywhere else."""
import os
import signal
import time
from pathlib import Path

import pytest

from vm import kernel_tree
from vm.cli_guard import raise_interrupt
from vm.guest import Guest, GuestOptions
from vm.paths import results_dir

_RUN = results_dir() / ("pytest-" + time.strftime("%Y%m%d-%H%M%S"))


def pytest_configure(config):
    # SIGTERM unwinds like Ctrl-C, so fixtures stop their QEMUs.
    signal.signal(signal.SIGTERM, raise_interrupt)


def _opts(name, flavour=None) -> GuestOptions:
    run_dir = _RUN / name
    # UBD_KERNEL_TREE: every guest boots the kernel built from that tree (not the newer-kernel one,
    # which exists to test what the packaged 7.x kernel has)
    tree, debug = kernel_tree.from_env() if flavour is None else (None, False)
    return GuestOptions(flavour=flavour or os.environ.get("UBD_FLAVOUR", "cloud"),
                        accel=os.environ.get("UBD_ACCEL", "auto"), run_dir=run_dir,
                        kernel_tree=tree, kernel_debug=debug,
                        log=lambda msg: print(msg, flush=True))


class GuestPool:
    """One shared guest; a new one replaces it when a test left it dead."""

    def __init__(self):
        self.current = None
        self.boots = 0

    def get(self) -> Guest:
        if self.current is None or not self.current.is_alive():
            self.close()
            self.boots += 1
            g = Guest(_opts(f"shared-guest-{self.boots}"))
            g.__enter__()
            self.current = g
        return self.current

    def close(self):
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def guest_pool():
    pool = GuestPool()
    yield pool
    pool.close()


@pytest.fixture
def guest(guest_pool) -> Guest:
    return guest_pool.get()


@pytest.fixture
def fresh_guest(request) -> Guest:
    g = Guest(_opts("fresh-" + request.node.name.replace("/", "_")[:80]))
    with g:
        yield g


@pytest.fixture
def newer_kernel_guest(request) -> Guest:
    """A fresh guest on the newest packaged kernel (flavour `backports`, 7.x), for driver features
    6.12 lacks; its image is built on first use."""
    g = Guest(_opts("fresh-newer-" + request.node.name.replace("/", "_")[:80], flavour="backports"))
    with g:
        yield g


@pytest.fixture
def run_dir() -> Path:
    _RUN.mkdir(parents=True, exist_ok=True)
    return _RUN
