"""The pytest plugin collects every shipped scenario variant as an item, without booting anything."""
import subprocess
import sys

from vm.paths import REPO
from vm.scenario import catalog, loader


def collect(*args):
    r = subprocess.run([sys.executable, "-m", "pytest", "scenarios", "--collect-only", "-q",
                        "-p", "no:cacheprovider", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    return r, [l for l in r.stdout.splitlines() if "::" in l]


def test_one_item_per_variant():
    r, items = collect()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "scenarios/kill_daemon.toml::kill_daemon[target=null]" in items
    assert "scenarios/heavy_io_delete.toml::heavy_io_delete[target=loop,need_get_data=1]" in items
    assert "scenarios/mq_loop.toml::mq_loop" in items
    # pytest.ini deselects the `nightly` marker unless asked for (just nightly)
    assert len(items) == sum(not c.nightly for p in catalog.shipped() for c in loader.load(p))


def test_nightly_scenarios_carry_the_nightly_marker():
    _, items = collect("-m", "nightly")
    nightly = [c.id for p in catalog.shipped() for c in loader.load(p) if c.nightly]
    assert nightly and sorted(i.split("::")[1] for i in items) == sorted(nightly)


def test_k_selects_like_pytest_users_expect():
    _, items = collect("-k", "kill and loop")
    assert items == ["scenarios/kill_daemon.toml::kill_daemon[target=loop]"]


def test_items_carry_the_guest_marker():
    _, items = collect("-m", "not guest")
    assert items == []
