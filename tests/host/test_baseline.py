"""Per-kernel baselines: expected failures, unexpected passes, regressions, --update-baseline."""
from types import SimpleNamespace

import pytest

from vm.errors import BenchError
from vm.scenario import baseline


def _res(case_id, passed, kind="expectation failed", message="boom"):
    return SimpleNamespace(id=case_id, passed=passed, kind="passed" if passed else kind, message=message)


@pytest.fixture
def baselines(tmp_path):
    (tmp_path / "old.toml").write_text('[[known]]\ncase = "recover[mode=fail_io]"\n'
                                       'reason = "FAIL_IO needs 6.13"\n')
    return tmp_path


def test_a_known_failure_is_expected_on_its_kernel_and_a_regression_on_another(baselines):
    for name, want in (("old", baseline.EXPECTED), ("new", baseline.REGRESSION)):
        results = [_res("recover[mode=fail_io]", False), _res("kill_daemon", True)]
        baseline.apply(results, baseline.load(name, baselines))
        assert [r.verdict for r in results] == [want, baseline.PASS]
        assert bool(baseline.regressions(results)) == (name == "new")


def test_a_listed_case_that_passes_is_reported_as_unexpectedly_passed(baselines):
    results = [_res("recover[mode=fail_io]#2", True)]
    baseline.apply(results, baseline.load("old", baselines))
    assert results[0].verdict == baseline.UNEXPECTED_PASS
    assert not baseline.regressions(results)


def test_update_writes_the_failures_and_keeps_reasons_written_by_hand(baselines):
    b = baseline.load("old", baselines)
    results = [_res("recover[mode=fail_io]", False), _res("io_errors", False, "timeout", "fio hung"),
               _res("kill_daemon", True)]
    baseline.write(results, b)
    again = baseline.load("old", baselines)
    assert again.known == {"recover[mode=fail_io]": "FAIL_IO needs 6.13",
                           "io_errors": "timeout: fio hung"}


@pytest.mark.parametrize("text, what", [
    ("[[known]]\ncase = \"x\"\n", "exactly the keys"),
    ("[[known]]\ncase = \"x\"\nreason = \"\"\n", "non-empty"),
    ("[other]\n", "unknown key"),
    ("[[known]\n", "not valid TOML"),
])
def test_a_malformed_baseline_names_the_file_and_what_was_expected(tmp_path, text, what):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(BenchError, match=what) as e:
        baseline.load("bad", tmp_path)
    assert "bad.toml" in str(e.value)


def test_the_shipped_baselines_load_and_name_shipped_cases():
    from vm import flavours
    from vm.scenario import catalog, loader
    ids = {c.id for p in catalog.shipped() for c in loader.load(p)}
    for name in flavours.load_all():
        b = baseline.load(name)
        assert set(b.known) <= ids, f"{b.path}: lists cases that do not exist"
