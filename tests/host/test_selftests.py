"""`just selftests` without a guest: which source for which kernel, the build's cache key, the verdict
of one test from the runner's KTAP output, the report of skips, and bad input (exit 2, nothing run)."""
import hashlib
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vm import buildroot, flavours, linux_source, selftests, selftests_build as build
from vm.errors import SetupError
from vm.scenario import report
from vm.scenario.errors import EXPECTATION, PASSED, SETUP, SKIPPED, SPLAT, TIMEOUT
from vm.scenario.result import CaseResult

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "ktap"

PACKAGES = """\
Package: linux-source
Version: 7.3.4-1~bpo13+1
Filename: pool/main/l/linux/linux-source_7.3.4-1~bpo13+1_all.deb
Size: 1104
SHA256: aa

Package: linux-source-7.2
Version: 7.2.12-1~bpo13+1
Filename: pool/main/l/linux/linux-source-7.2_7.2.12-1~bpo13+1_all.deb
Size: 164741456
SHA256: bb

Package: linux-source-7.3
Version: 7.3.4-1~bpo13+1
Filename: pool/main/l/linux/linux-source-7.3_7.3.4-1~bpo13+1_all.deb
Size: 166780612
SHA256: cc
Description: Linux kernel source for version 7.3 with Debian patches
 This package provides source code for the Linux kernel version 7.3.

Package: linux-source-7.3
Version: 7.3.2-1~bpo13+1
Filename: pool/main/l/linux/linux-source-7.3_7.3.2-1~bpo13+1_all.deb
Size: 166000000
SHA256: dd
"""


# --- which package ------------------------------------------------------------------------------
@pytest.mark.parametrize("release, package, upstream", [
    ("6.12.117+deb13-cloud-amd64", "linux-source-6.12", "6.12.117"),
    ("7.3.4+deb13-cloud-amd64", "linux-source-7.3", "7.3.4"),
    ("7.4.0-rc1", "linux-source-7.4", "7.4.0"),
])
def test_package_for_a_kernel_release(release, package, upstream):
    assert linux_source.package_for(release) == package
    assert linux_source.upstream_of(release) == upstream


def test_version_order_is_numeric():
    key = linux_source.version_key
    assert key("6.12.117-1") > key("6.12.94-1")
    assert key("7.3.4-1~bpo13+1") > key("7.2.12-1~bpo13+1") > key("6.12.117-1")
    assert key("7.3.4-2~bpo13+1") > key("7.3.4-1~bpo13+1")


def test_index_lists_versioned_source_packages_only():
    pkgs = linux_source.source_packages(linux_source.parse_stanzas(PACKAGES), "trixie-backports")
    assert sorted((p.name, p.version) for p in pkgs) == [
        ("linux-source-7.2", "7.2.12-1~bpo13+1"), ("linux-source-7.3", "7.3.2-1~bpo13+1"),
        ("linux-source-7.3", "7.3.4-1~bpo13+1")]
    exact = linux_source.pick(pkgs, "linux-source-7.3", "7.3.2")
    assert (exact.version, exact.sha256, exact.size, exact.series) == ("7.3.2-1~bpo13+1", "dd", 166000000, "7.3")
    assert linux_source.pick(pkgs, "linux-source-7.3").version == "7.3.4-1~bpo13+1"
    assert linux_source.newest(pkgs).name == "linux-source-7.3"
    with pytest.raises(LookupError):
        linux_source.pick(pkgs, "linux-source-6.12", "6.12.117")


def test_index_is_checked_against_the_signed_release(monkeypatch):
    data = lzma.compress(PACKAGES.encode())
    good = hashlib.sha256(data).hexdigest()
    release = ("Origin: Debian\nSHA256:\n 0000 1 main/binary-arm64/Packages.xz\n"
               f" {good} {len(data)} main/binary-amd64/Packages.xz\n")
    monkeypatch.setattr(linux_source, "_verified_release", lambda mirror, suite: release)
    monkeypatch.setattr(linux_source, "_get", lambda url: data)
    linux_source.index.cache_clear()
    assert len(linux_source.index("http://m.example/debian", "trixie-backports")) == 3
    monkeypatch.setattr(linux_source, "_get", lambda url: data + b"x")
    linux_source.index.cache_clear()
    with pytest.raises(SetupError, match="SHA-256 does not match InRelease"):
        linux_source.index("http://m.example/debian", "trixie-backports")


def test_tree_version_reads_the_top_makefile(tmp_path):
    (tmp_path / "Makefile").write_text("# SPDX\nVERSION = 7\nPATCHLEVEL = 3\nSUBLEVEL = 4\nEXTRAVERSION =\n")
    assert linux_source.tree_version(tmp_path) == "7.3.4"
    (tmp_path / "Makefile").write_text("VERSION = 7\nPATCHLEVEL = 4\nSUBLEVEL = 0\nEXTRAVERSION = -rc1\n")
    assert linux_source.tree_version(tmp_path) == "7.4"
    assert linux_source.tree_version(tmp_path / "nothing") == ""


def _tree(root: Path, version="6.12.117", suite=True) -> Path:
    major, minor, sub = version.split(".")
    root.mkdir(parents=True)
    (root / "Makefile").write_text(f"VERSION = {major}\nPATCHLEVEL = {minor}\nSUBLEVEL = {sub}\n")
    d = root / build.SUITE_DIR
    d.mkdir(parents=True)
    (d / "test_stripe_04.sh").write_text("#!/bin/bash\n")
    if suite:
        for f in build.SUITE_FILES:
            (d / f).write_text(f"{f}\n")
    return root


class FakeArchive:
    """linux_source's network side: which trees are unpacked, which packages the suites list."""

    def __init__(self, monkeypatch, tmp_path, trees, packages):
        self.trees, self.packages, self.found = trees, packages, []
        monkeypatch.setattr(linux_source, "cached", lambda series, up: self.trees.get(f"{series} {up}"))
        monkeypatch.setattr(linux_source, "find", self.find)
        monkeypatch.setattr(linux_source, "newest_in", lambda suites: linux_source.newest(self.packages))
        monkeypatch.setattr(linux_source, "ensure", lambda pkg, log: self.trees[f"{pkg.series} {pkg.upstream}"])

    def find(self, suites, name, upstream):
        self.found.append((tuple(suites), name, upstream))
        return linux_source.pick(self.packages, name, upstream)


def _pkg(name, version, suite):
    return linux_source.SourcePackage(name, version, suite, f"pool/{name}_{version}.deb", "00", 1)


def test_each_flavour_gets_its_kernels_own_source_package(tmp_path, monkeypatch):
    """cloud boots 6.12 from trixie; backports boots 7.3 from trixie-backports: the package is the
    guest kernel's X.Y at its upstream version, looked up in that flavour's suites."""
    arch = FakeArchive(monkeypatch, tmp_path, {
        "6.12 6.12.117": _tree(tmp_path / "s612", "6.12.117"),
        "7.3 7.3.4": _tree(tmp_path / "s73", "7.3.4")},
        [_pkg("linux-source-6.12", "6.12.117-1", "trixie"),
         _pkg("linux-source-7.3", "7.3.4-1~bpo13+1", "trixie-backports")])
    arch.trees = {}   # nothing unpacked yet: both go through the archive
    trees = {"6.12 6.12.117": tmp_path / "s612", "7.3 7.3.4": tmp_path / "s73"}
    monkeypatch.setattr(linux_source, "ensure", lambda pkg, log: trees[f"{pkg.series} {pkg.upstream}"])
    cloud = build.source_for_flavour("cloud", "6.12.117+deb13-cloud-amd64", print)
    bp = build.source_for_flavour("backports", "7.3.4+deb13-cloud-amd64", print)
    assert (cloud.tree, cloud.label, cloud.note) == (tmp_path / "s612", "linux-source-6.12 6.12.117-1", "")
    assert (bp.tree, bp.label, bp.note) == (tmp_path / "s73", "linux-source-7.3 7.3.4-1~bpo13+1", "")
    f = flavours.load_all()
    assert arch.found == [
        ((f["cloud"].suite,) + f["cloud"].extra_suites, "linux-source-6.12", "6.12.117"),
        ((f["backports"].suite,) + f["backports"].extra_suites, "linux-source-7.3", "7.3.4")]


def test_a_source_without_the_suite_falls_back_to_the_newest_and_says_so(tmp_path, monkeypatch):
    FakeArchive(monkeypatch, tmp_path, {
        "6.12 6.12.117": _tree(tmp_path / "s612", "6.12.117", suite=False),   # Debian's 6.12 as it is
        "7.3 7.3.4": _tree(tmp_path / "s73", "7.3.4")},
        [_pkg("linux-source-6.12", "6.12.117-1", "trixie"),
         _pkg("linux-source-7.3", "7.3.4-1~bpo13+1", "trixie-backports")])
    src = build.source_for_flavour("cloud", "6.12.117+deb13-cloud-amd64", print)
    assert src.tree == tmp_path / "s73" and src.label == "linux-source-7.3 7.3.4-1~bpo13+1"
    assert "linux-source-6.12 6.12.117 (the kernel's own source) has no ublk selftests" in src.note
    assert "Makefile, kublk.c, test_common.sh" in src.note


def test_no_newer_source_is_a_setup_error(tmp_path, monkeypatch):
    FakeArchive(monkeypatch, tmp_path, {"6.12 6.12.117": _tree(tmp_path / "s612", suite=False)},
                [_pkg("linux-source-6.12", "6.12.117-1", "trixie")])
    with pytest.raises(SetupError, match="no newer linux-source package"):
        build.source_for_flavour("cloud", "6.12.117+deb13-cloud-amd64", print)


def test_a_tree_without_the_selftests_is_refused_naming_the_directory(tmp_path):
    tree = _tree(tmp_path / "linux", suite=False)
    with pytest.raises(SetupError) as e:
        build.source_for_tree(tree)
    assert f"{tree}: no ublk selftests (expected tools/testing/selftests/ublk/ with Makefile" in str(e.value)
    assert build.source_for_tree(_tree(tmp_path / "good")).label == f"tree {tmp_path / 'good'}"


# --- the build's cache key ----------------------------------------------------------------------
def test_source_hash_follows_what_the_build_reads(tmp_path):
    tree = _tree(tmp_path / "t")
    (tree / "include/uapi/linux").mkdir(parents=True)
    (tree / "include/uapi/linux/ublk_cmd.h").write_text("#define UBLK_F_X 1\n")
    (tree / "drivers").mkdir()
    (tree / "drivers/x.c").write_text("int x;\n")
    h0 = build.source_hash(tree)
    (tree / "drivers/x.c").write_text("int y;\n")            # the kernel, not the selftests
    assert build.source_hash(tree) == h0
    (tree / "include/uapi/linux/ublk_cmd.h").write_text("#define UBLK_F_X 2\n")
    h1 = build.source_hash(tree)
    assert h1 != h0
    (tree / build.SUITE_DIR / "kublk.c").write_text("changed\n")
    assert build.source_hash(tree) not in (h0, h1)


def test_buildroot_recipe_hash_depends_on_the_release():
    assert buildroot.recipe_hash("trixie") == buildroot.recipe_hash("trixie")
    assert buildroot.recipe_hash("trixie") != buildroot.recipe_hash("forky")
    assert buildroot.root_dir("trixie").name == f"trixie-{buildroot.recipe_hash('trixie')}"


def test_test_selection():
    tests = ["test_generic_02.sh", "test_null_01.sh", "test_stress_01.sh", "test_stress_02.sh",
             "test_stress_12.sh"]
    assert build.select(tests, []) == tests
    assert build.select(tests, ["stress"]) == tests[2:]
    assert build.select(tests, ["stress_0[12]", "null"]) == tests[1:4]
    assert build.select(tests, ["nothing"]) == []


def test_listed_tests_come_from_the_kernels_list(tmp_path):
    (tmp_path / "kselftest-list.txt").write_text("ublk:test_null_01.sh\nublk:test_loop_01.sh\nnet:x.sh\n")
    assert build.listed_tests(tmp_path) == ["test_null_01.sh", "test_loop_01.sh"]


# --- one test's verdict -------------------------------------------------------------------------
def test_verdicts_from_real_runner_output():
    ok = selftests.verdict("test_null_01.sh", (DATA / "null_01-pass.log").read_text(), 900)
    assert ok["kind"] == PASSED
    skip = selftests.verdict("test_generic_03.sh", (DATA / "generic_03-skip.log").read_text(), 900)
    assert skip["kind"] == SKIPPED and skip["message"].endswith("generic_03 : [SKIP]")


def test_verdict_of_a_failure_a_timeout_and_no_result():
    out = ("TAP version 13\n1..1\n# selftests: ublk: test_loop_01.sh\n# fio: verify failed\n"
           "# loop_01 : [FAIL]\nnot ok 1 selftests: ublk: test_loop_01.sh # exit=255\n")
    v = selftests.verdict("test_loop_01.sh", out, 900)
    assert v["kind"] == EXPECTATION and "exit=255" in v["message"]
    assert v["seen"] == "fio: verify failed\nloop_01 : [FAIL]" and "test.log" in v["evidence"]
    out = "TAP version 13\n1..1\nnot ok 1 selftests: ublk: test_stress_01.sh # TIMEOUT 30 seconds\n"
    assert selftests.verdict("test_stress_01.sh", out, 30)["kind"] == TIMEOUT
    # another test's result is not this test's
    v = selftests.verdict("test_loop_02.sh", "TAP version 13\n1..1\nok 1 selftests: ublk: test_loop_01.sh\n", 9)
    assert v["kind"] == SETUP and "no KTAP result for test_loop_02.sh" in v["message"]


def test_a_splat_after_a_skip_fails_the_test_and_keeps_the_skip():
    r = CaseResult(id="ublk:t.sh", scenario="selftests", variant={}, description="",
                   kind=SKIPPED, message="skipped by the test itself (exit 4)")
    selftests.add_problem(r, SPLAT, "kernel splat in dmesg (WARNING): x")
    assert r.kind == SPLAT and r.failed and r.problems == ["skipped: skipped by the test itself (exit 4)"]
    selftests.add_problem(r, EXPECTATION, "health: kublk daemons left: 123 kublk")
    assert r.kind == SPLAT and r.problems[-1].startswith("expectation failed: health")


def test_the_report_shows_skips_and_they_do_not_fail_the_run(tmp_path):
    res = [CaseResult(id="ublk:a.sh", scenario="selftests", variant={}, description="", duration=1.0),
           CaseResult(id="ublk:b.sh", scenario="selftests", variant={}, description="",
                      kind=SKIPPED, message="skipped by the test itself (exit 4)")]
    assert report.exit_status(res) == 0
    report.write_json(tmp_path, res, {"suite": "ublk selftests"})
    report.write_junit(tmp_path, res, suite="ublk-selftests")
    doc = json.loads((tmp_path / "result.json").read_text())
    assert doc["counts"] == {"passed": 1, "skipped": 1} and doc["exit_status"] == 0
    junit = (tmp_path / "junit.xml").read_text()
    assert 'skipped="1"' in junit and '<skipped message="skipped by the test itself (exit 4)"' in junit
    assert 'failures="0"' in junit
    text = report.summary(res, tmp_path)
    assert "ublk:b.sh" in text and "SKIP" in text and "1 passed, 1 skipped, 0 failed" in text
    res[0].kind = EXPECTATION
    assert report.exit_status(res) == 1


def test_the_guest_command_runs_one_test_under_the_kernels_runner():
    cmd = selftests.runner_command("test_null_01.sh", 300)
    assert "./run_kselftest.sh -o 300 -t ublk:test_null_01.sh" in cmd
    # appended to a file, then shown: see runner_command's docstring
    assert ">> /opt/kselftest/output/test_null_01.sh.log 2>&1; cat /opt/kselftest/output/test_null_01.sh.log" in cmd


# --- bad input: exit 2, named, nothing started --------------------------------------------------
def _cli(*args, tmp_path):
    env = {**os.environ, "UBD_CACHE": str(tmp_path / "cache"), "UBD_RESULTS": str(tmp_path / "res")}
    env.pop("UBD_KERNEL_TREE", None)
    r = subprocess.run([sys.executable, "-m", "vm.selftests", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
    assert not (tmp_path / "res").exists() and not (tmp_path / "cache").exists(), "something started"
    return r


def test_cli_unknown_flavour(tmp_path):
    r = _cli("--flavour", "nosuch", tmp_path=tmp_path)
    assert r.returncode == 2 and "unknown kernel flavour 'nosuch'" in r.stderr and "flavours.toml" in r.stderr


def test_cli_tree_without_the_selftests(tmp_path):
    tree = _tree(tmp_path / "linux", suite=False)
    (tree / "drivers/block").mkdir(parents=True)
    (tree / "drivers/block/ublk_drv.c").write_text("")
    r = _cli("--kernel-tree", str(tree), tmp_path=tmp_path)
    assert r.returncode == 2
    assert f"{tree}: no ublk selftests (expected tools/testing/selftests/ublk/" in r.stderr


def test_cli_not_a_kernel_tree(tmp_path):
    r = _cli("--kernel-tree", str(tmp_path), tmp_path=tmp_path)
    assert r.returncode == 2 and "not a Linux source tree" in r.stderr


def test_cli_bad_timeout(tmp_path):
    tree = _tree(tmp_path / "linux")
    (tree / "drivers/block").mkdir(parents=True)
    (tree / "drivers/block/ublk_drv.c").write_text("")
    r = _cli("--kernel-tree", str(tree), "--timeout", "0", tmp_path=tmp_path)
    assert r.returncode == 2 and "--timeout must be a positive number" in r.stderr


# --- baselines: kernel/baselines/selftests/<flavour>.toml ---------------------------------------
def test_a_listed_selftest_failure_is_expected_on_its_flavour_only(tmp_path):
    from vm.scenario import baseline
    (tmp_path / "cloud.toml").write_text('[[known]]\ncase = "ublk:test_loop_08.sh"\n'
                                         'reason = "--io_desc_size is newer than 6.12"\n')

    def results():
        return [CaseResult(id="ublk:test_loop_08.sh", scenario="selftests", variant={}, description="",
                           kind=EXPECTATION, message="the test failed (exit=255)"),
                CaseResult(id="ublk:test_null_02.sh", scenario="selftests", variant={}, description="",
                           kind=SKIPPED)]
    on_cloud, on_backports = results(), results()
    baseline.apply(on_cloud, baseline.load("cloud", tmp_path))
    baseline.apply(on_backports, baseline.load("backports", tmp_path))
    assert [r.verdict for r in on_cloud] == [baseline.EXPECTED, baseline.SKIP]
    assert report.exit_status(on_cloud) == 0
    assert [r.verdict for r in on_backports] == [baseline.REGRESSION, baseline.SKIP]
    assert report.exit_status(on_backports) == 1


def test_the_shipped_selftests_baselines_load_and_name_selftests():
    import re
    from vm.scenario import baseline
    for name in flavours.load_all():
        b = baseline.load(name, selftests.BASELINE_DIR)
        bad = [c for c in b.known if not re.fullmatch(r"ublk:test_\w+\.sh", c)]
        assert not bad, f"{b.path}: not ublk selftest ids: {bad}"


# --- the health check after a test ---------------------------------------------------------------
class FileLeavingGuest:
    """An agent whose test left regular files where its devices were (fio opened /dev/ublkbN after the
    device was deleted), and nothing else."""
    def __init__(self):
        self.files = {"/dev/ublkb0", "/dev/ublkb1"}

    def call(self, verb, timeout, cmd="", **kw):
        if verb == "run" and cmd == selftests.NOT_NODES:
            return {"status": 0, "stdout": "\n".join(sorted(self.files))}
        if verb == "run" and cmd.startswith("rm -f "):
            self.files -= set(cmd.split()[2:])
        if verb == "snapshot":   # the agent lists /dev/ublk[bc]* paths, whatever they are
            return {"mounts": [], "devices": sorted(self.files), "loops": [], "servers": [], "tainted": 0}
        if verb == "kmsg_since":
            return {"lines": []}
        return {"status": 0, "stdout": ""}


def test_files_a_test_left_at_device_paths_are_noted_not_counted_as_devices_left(tmp_path):
    agent = FileLeavingGuest()
    res = CaseResult(id="ublk:test_stress_01.sh", scenario="selftests", variant={}, description="",
                     kind=PASSED)
    runner = type("R", (), {"progress": type("P", (), {"phase": lambda self, what: None})()})()
    reusable = selftests.SelftestRunner._health(runner, res, agent, tmp_path, 0, 0)
    assert res.kind == PASSED and reusable and not agent.files
    assert res.problems == ["not device nodes but regular files: /dev/ublkb0 /dev/ublkb1 (a writer, "
                            "e.g. fio, opened the path after the device was deleted)"]
