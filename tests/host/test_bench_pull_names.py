"""The bench pulls files the guest names: a name that could reach outside the run folder stops it."""
from types import SimpleNamespace

import pytest

from bench import __main__ as bench_main
from vm.errors import BenchError


class FakeGuest:
    def __init__(self, listing):
        self.listing, self.pulled = listing, []

    def exec(self, cmd, timeout):
        return SimpleNamespace(stdout=self.listing, status=0)

    def pull(self, remote, local):
        self.pulled.append(local)


@pytest.mark.parametrize("bad", ["../../etc/cron.d/x", "/etc/passwd", "..", ".hidden", "a/b"])
def test_an_unsafe_name_from_the_guest_is_refused_before_anything_is_pulled(tmp_path, bad):
    g = FakeGuest(f"ubdq-0.prof\n{bad}\n")
    with pytest.raises(BenchError, match="unsafe names"):
        bench_main._pull_profile(g, tmp_path)
    assert g.pulled == [] and list(tmp_path.iterdir()) == []
