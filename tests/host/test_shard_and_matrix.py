"""--shard I/N and the scenario x kernel table (no VM)."""
import json
from types import SimpleNamespace

import pytest

from vm.errors import BenchError
from vm.scenario import catalog, loader, matrix, shard


def _shipped_cases():
    return [c for p in catalog.shipped() for c in loader.load(p)]


def test_shards_cover_every_shipped_case_exactly_once():
    cases = _shipped_cases()
    assert len(cases) >= 8
    for n in (1, 2, 3, 5):
        picked = [c.id for i in range(1, n + 1) for c in shard.select(cases, (i, n))]
        assert sorted(picked) == sorted(c.id for c in cases), n


def test_a_new_case_moves_no_other_case_to_another_shard():
    cases = [SimpleNamespace(id=f"s{i}") for i in range(40)]
    before = {c.id: shard.shard_of(c.id, 4) for c in cases}
    grown = cases[:7] + [SimpleNamespace(id="brand_new")] + cases[7:]
    after = {c.id: i for i in range(1, 5) for c in shard.select(grown, (i, 4))}
    assert all(after[k] == v for k, v in before.items())
    assert len({shard.shard_of(c.id, 4) for c in cases}) == 4   # the hash spreads cases out


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1", "a/b", "1/0", ""])
def test_bad_shard_is_refused_with_the_form_expected(bad):
    with pytest.raises(BenchError, match="--shard"):
        shard.parse(bad)


def _run(tmp_path, name, flavour, release, verdicts, status):
    d = tmp_path / name
    d.mkdir()
    doc = {"flavour": flavour, "kernel": {"release": release, "debug": False}, "exit_status": status,
           "cases": [{"id": i, "kind": k} for i, k in verdicts.items()]}
    (d / "result.json").write_text(json.dumps(doc))
    return d


def test_merge_puts_shards_of_one_kernel_in_one_column(tmp_path, capsys):
    runs = [_run(tmp_path, "a", "cloud", "6.12.117", {"kill_daemon": "passed"}, 0),
            _run(tmp_path, "b", "cloud", "6.12.117", {"mq_loop": "kernel splat"}, 1),
            _run(tmp_path, "c", "backports", "7.3.4", {"kill_daemon": "passed", "mq_loop": "passed"}, 0)]
    assert matrix.merge(runs, tmp_path / "out") == 1
    text = (tmp_path / "out" / "table.txt").read_text()
    head, _, *rows = text.splitlines()
    assert "cloud 6.12.117" in head and "backports 7.3.4" in head
    row = {r.split()[0]: r.split()[1:] for r in rows}
    assert row["kill_daemon"] == ["PASS", "PASS"]
    assert row["mq_loop"] == ["KERNEL", "SPLAT", "PASS"]
    merged = json.loads((tmp_path / "out" / "result.json").read_text())
    assert len(merged["cases"]) == 4 and merged["exit_status"] == 1
    assert capsys.readouterr().out.strip() == text.strip()


def test_merge_of_a_file_that_is_no_result_names_it(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(BenchError, match="x.json"):
        matrix.merge([tmp_path / "x.json"], tmp_path / "out")
    with pytest.raises(BenchError, match="nope"):
        matrix.merge([tmp_path / "nope"], tmp_path / "out")


def test_run_all_shards_1_and_2_of_2_cover_its_cases_once_and_pytest_picks_the_same():
    import subprocess
    import sys

    from vm.paths import REPO
    from vm.scenario import cli

    def picked(*argv):
        return [c.id for c in cli.select_cases(cli.parser().parse_args(["run-all", *argv]))]
    everything, one, two = picked(), picked("--shard", "1/2"), picked("--shard", "2/2")
    assert one and two and sorted(one + two) == sorted(everything)
    r = subprocess.run([sys.executable, "-m", "pytest", "scenarios", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "--shard", "1/2"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    items = [line.split("::", 1)[1] for line in r.stdout.splitlines() if "::" in line]
    assert sorted(items) == sorted(one), r.stdout[-2000:]
