"""Shared fixtures: booted guests. `guest` is shared by the tests that cannot harm it (rebooted only if
a test left it dead); `fresh_guest` is a new one for tests that crash or taint the kernel.

There are no skips: a VM test whose prerequisites are missing fails, in CI and everywhere else.
Guest options: `pytest --flavour backports ...` or the environment (UBD_FLAVOUR, ...), as for every
other command (vm/options.py)."""
import signal
from pathlib import Path

import pytest

from vm import options
from vm.cli_guard import raise_interrupt
from vm.guest import Guest, GuestOptions
from vm.scenario import shard


def pytest_addoption(parser):
    options.add_pytest_options(parser)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    options.pytest_configure_node(node)   # xdist workers share the controller's run folder


def pytest_collection_modifyitems(config, items):
    shard.deselect(config, items)


def pytest_configure(config):
    options.pytest_check(config)
    # SIGTERM unwinds like Ctrl-C, so fixtures stop their QEMUs.
    signal.signal(signal.SIGTERM, raise_interrupt)


def _opts(config, name, flavour=None) -> GuestOptions:
    values = options.values(config.option)
    if flavour is not None:
        # a given flavour's own kernel: not the kernel built from --kernel-tree (the newer-kernel
        # guest exists to test what the packaged 7.x kernel has)
        values.update(flavour=flavour, kernel_tree=None, kernel_debug=False)
    worker = options.pytest_worker(config)   # xdist workers' guests apart: gw0-shared-guest-1
    name = f"{worker}-{name}" if worker else name
    return GuestOptions(**values, run_dir=options.pytest_run_dir(config) / name,
                        log=lambda msg: print(msg, flush=True))


class GuestPool:
    """One shared guest; a new one replaces it when a test left it dead."""

    def __init__(self, config):
        self.config = config
        self.current = None
        self.boots = 0

    def get(self) -> Guest:
        if self.current is None or not self.current.is_alive():
            self.close()
            self.boots += 1
            g = Guest(_opts(self.config, f"shared-guest-{self.boots}"))
            g.__enter__()
            self.current = g
        return self.current

    def close(self):
        if self.current is not None:
            self.current.stop()
            self.current = None


@pytest.fixture(scope="session")
def guest_pool(pytestconfig):
    pool = GuestPool(pytestconfig)
    yield pool
    pool.close()


@pytest.fixture
def guest(guest_pool) -> Guest:
    return guest_pool.get()


@pytest.fixture
def fresh_guest(request) -> Guest:
    g = Guest(_opts(request.config, "fresh-" + request.node.name.replace("/", "_")[:80]))
    with g:
        yield g


@pytest.fixture
def newer_kernel_guest(request) -> Guest:
    """A fresh guest on the newest packaged kernel (flavour `backports`, 7.x), for driver features
    6.12 lacks; its image is built on first use."""
    g = Guest(_opts(request.config, "fresh-newer-" + request.node.name.replace("/", "_")[:80],
                    flavour="backports"))
    with g:
        yield g


@pytest.fixture
def run_dir(pytestconfig) -> Path:
    path = options.pytest_run_dir(pytestconfig)
    path.mkdir(parents=True, exist_ok=True)
    return path
