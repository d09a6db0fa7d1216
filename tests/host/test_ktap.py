"""The KTAP reader against the shapes the kernel's runner and selftests print."""
from pathlib import Path

from vm import ktap

DATA = Path(__file__).resolve().parent.parent / "data" / "ktap"


def test_real_pass_from_the_runner():
    doc = ktap.parse((DATA / "null_01-pass.log").read_text())
    assert doc.version == "TAP version 13" and doc.plan == 1 and doc.missing == 0
    [t] = doc.tests
    assert (t.number, t.name, t.outcome, t.directive) == \
        (1, "selftests: ublk: test_null_01.sh", ktap.PASS, "")
    # the test's own lines, without the runner's "# " prefix, in order
    assert t.log[0] == "overriding timeout to 900"
    assert t.log[-1] == "null_01 : [PASS]"
    assert doc.trailing == ["Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0"]


def test_real_skip_from_the_runner():
    doc = ktap.parse((DATA / "generic_03-skip.log").read_text())
    [t] = doc.tests
    assert t.outcome == ktap.SKIP and t.directive == "SKIP"
    assert "generic_03 : [SKIP]" in t.log


RUN = """\
TAP version 13
1..4
# timeout set to 150
# selftests: ublk: test_loop_01.sh
# loop_01 : [FAIL]
not ok 1 selftests: ublk: test_loop_01.sh # exit=255
# selftests: ublk: test_stress_02.sh
not ok 2 selftests: ublk: test_stress_02.sh # TIMEOUT 150 seconds
# selftests: ublk: test_x.sh
not ok 3 selftests: ublk: test_x.sh # SKIP needs a newer kernel
ok 4 - selftests: ublk: test_y.sh # XFAIL known
"""


def test_fail_timeout_skip_and_xfail():
    doc = ktap.parse(RUN)
    assert [(t.number, t.outcome) for t in doc.tests] == \
        [(1, ktap.FAIL), (2, ktap.TIMEOUT), (3, ktap.SKIP), (4, ktap.XFAIL)]
    fail, timeout, skip, xfail = doc.tests
    assert fail.directive == "exit=255" and fail.log == ["timeout set to 150",
                                                          "selftests: ublk: test_loop_01.sh",
                                                          "loop_01 : [FAIL]"]
    assert timeout.directive == "TIMEOUT 150 seconds"
    assert skip.directive == "SKIP needs a newer kernel"   # "not ok ... # SKIP" is a skip too
    assert xfail.name == "selftests: ublk: test_y.sh"       # the optional " - " is not the name


def test_xfail_on_a_failed_line_is_a_failure():
    [t] = ktap.parse("KTAP version 1\n1..1\nnot ok 1 t # XFAIL\n").tests
    assert t.outcome == ktap.FAIL


def test_ktap_nested_by_indentation():
    text = """\
KTAP version 1
1..2
  KTAP version 1
  1..2
  ok 1 sub_a
  not ok 2 sub_b
not ok 1 parent
ok 2 other
"""
    doc = ktap.parse(text)
    assert [t.name for t in doc.tests] == ["parent", "other"]
    parent = doc.tests[0]
    assert parent.outcome == ktap.FAIL
    assert [(s.name, s.outcome) for s in parent.subtests] == [("sub_a", ktap.PASS), ("sub_b", ktap.FAIL)]
    assert doc.tests[1].subtests == []


def test_tap13_subtests_four_spaces_deep_twice():
    text = """\
TAP version 13
1..1
    1..1
        1..1
        ok 1 leaf # SKIP no device
    ok 1 middle
ok 1 top
"""
    [top] = ktap.parse(text).tests
    [middle] = top.subtests
    [leaf] = middle.subtests
    assert (middle.name, leaf.name, leaf.outcome) == ("middle", "leaf", ktap.SKIP)


def test_c_selftest_ktap_behind_the_runner_prefix():
    text = """\
TAP version 13
1..1
# selftests: ublk: some_c_test
# TAP version 13
# 1..2
# ok 1 feature_a
# ok 2 feature_b # SKIP not supported
# # Totals: pass:1 fail:0 xfail:0 xpass:0 skip:1 error:0
ok 1 selftests: ublk: some_c_test
"""
    [t] = ktap.parse(text).tests
    assert t.outcome == ktap.PASS
    assert [(s.name, s.outcome) for s in t.subtests] == \
        [("feature_a", ktap.PASS), ("feature_b", ktap.SKIP)]


def test_plain_test_output_has_no_subtests():
    [t] = ktap.parse((DATA / "null_01-pass.log").read_text()).tests
    assert t.subtests == []


def test_cut_off_run_reports_the_missing_tests_and_what_it_printed():
    text = "TAP version 13\n1..3\nok 1 a\n# selftests: ublk: b\n# starting b\n"
    doc = ktap.parse(text)
    assert doc.plan == 3 and len(doc.tests) == 1 and doc.missing == 2
    assert doc.trailing == ["selftests: ublk: b", "starting b"]


def test_bail_out_stops_reading():
    doc = ktap.parse("KTAP version 1\n1..2\nok 1 a\nBail out! no ublk-control\nok 2 b\n")
    assert doc.bail_out == "no ublk-control" and [t.name for t in doc.tests] == ["a"]


def test_no_document_at_all():
    doc = ktap.parse("bash: ./run_kselftest.sh: No such file or directory\n")
    assert doc.version == "" and doc.tests == [] and doc.plan is None
    assert doc.trailing == ["bash: ./run_kselftest.sh: No such file or directory"]
