"""The mutation runner (vm/mutants*.py): patch headers, bad input refused before anything is built,
the variant image, the score. The `nightly` test at the end runs the real thing on one mutant."""
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vm import kernel_tree, linux_source, mutants, mutants_build
from vm.errors import BenchError
from vm.image import Image
from vm.mutants_patch import MutantError, apply, check_applies, load, load_dir
from vm.paths import KERNEL_DIR, REPO
from vm.scenario import catalog
from vm.scenario.cli import load_cases

from .test_vm_image import _read_cpio

DRIVER = """static void ublk_abort_queue(void)
{
\tint i;

\tfor (i = 0; i < depth; i++)
\t\tfail(i);
}
"""
PATCH = """--- a/drivers/block/ublk_drv.c
+++ b/drivers/block/ublk_drv.c
@@ -3,5 +3,5 @@ static void ublk_abort_queue(void)
 \tint i;
 
 \tfor (i = 0; i < depth; i++)
-\t\tfail(i);
+\t\t;
 }
"""
HEADER = """Bug: the abort forgets the requests
Class: an abort that never ends a request
Expect: kill_daemon, heavy_io_delete
Why: a kill under IO hangs
  on the next delete
"""


def _tree(root: Path, driver=DRIVER) -> Path:
    (root / "drivers/block").mkdir(parents=True)
    (root / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\n")
    (root / "drivers/block/ublk_drv.c").write_text(driver)
    return root


def _mutant(d: Path, name="01-abort", header=HEADER, patch=PATCH) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.patch"
    p.write_text(header + "\n" + patch)
    return p


# --- the header -----------------------------------------------------------------------------------
def test_a_header_gives_the_bug_its_class_and_the_scenarios_expected_to_kill_it(tmp_path):
    m = load(_mutant(tmp_path))
    assert m.name == "01-abort"
    assert m.bug == "the abort forgets the requests"
    assert (m.fix, m.bug_class) == ("", "an abort that never ends a request")
    assert m.expect == ("kill_daemon", "heavy_io_delete")
    assert m.why == "a kill under IO hangs on the next delete"   # continuation joined
    assert m.origin == "class: an abort that never ends a request"


@pytest.mark.parametrize("header, complaint", [
    ("Class: x\nExpect: kill_daemon\n", "lacks Bug:"),
    ("Bug: x\nClass: y\n", "lacks Expect:"),
    ("Bug: x\nExpect: kill_daemon\n", "exactly one of Fix:"),
    ("Bug: x\nFix: abc (\"t\")\nClass: y\nExpect: kill_daemon\n", "exactly one of Fix:"),
    ("Bug: x\nClass: y\nExpect: kill_daemon\nSeverity: high\n", "line 4: expected one of"),
    ("Bug: x\nBug: again\nClass: y\nExpect: k\n", "line 2: Bug: given twice"),
    ("  dangling\nBug: x\nClass: y\nExpect: k\n", "line 1: a continuation line outside a field"),
])
def test_a_bad_header_is_refused_with_the_file_and_the_line(tmp_path, header, complaint):
    with pytest.raises(MutantError, match="01-abort.patch") as e:
        load(_mutant(tmp_path, header=header))
    assert complaint in str(e.value)


def test_a_mutant_must_change_the_driver_and_only_the_driver(tmp_path):
    other = PATCH.replace("drivers/block/ublk_drv.c", "drivers/block/loop.c")
    with pytest.raises(MutantError, match="changes drivers/block/ublk_drv.c only; this one changes "
                                          "drivers/block/loop.c"):
        load(_mutant(tmp_path, patch=other))
    with pytest.raises(MutantError, match="no unified diff hunk"):
        load(_mutant(tmp_path, patch=""))


def test_a_directory_without_patches_is_refused(tmp_path):
    with pytest.raises(BenchError, match="no \\*.patch files"):
        load_dir(tmp_path)
    with pytest.raises(BenchError, match="not a directory"):
        load_dir(tmp_path / "missing")


# --- applying ---------------------------------------------------------------------------------------
def test_a_mutant_is_applied_to_a_copy_and_the_tree_is_left_alone(tmp_path):
    tree = _tree(tmp_path / "tree")
    m = load(_mutant(tmp_path / "m"))
    apply(m, tree, tmp_path / "work")
    assert "fail(i)" not in (tmp_path / "work/drivers/block/ublk_drv.c").read_text()
    assert (tree / "drivers/block/ublk_drv.c").read_text() == DRIVER


def test_a_mutant_that_does_not_apply_names_itself_and_the_tree(tmp_path):
    tree = _tree(tmp_path / "tree", driver=DRIVER.replace("fail(i)", "end(i)"))
    m = load(_mutant(tmp_path / "m"))
    with pytest.raises(MutantError, match="mutant 01-abort.patch: does not apply to .*tree/drivers"):
        check_applies([m], tree)


def test_the_variant_source_is_the_driver_plus_the_in_tree_mark_and_a_kbuild(tmp_path):
    tree = _tree(tmp_path / "tree")
    folder = mutants_build.source(tree, None, tmp_path / "control")
    assert (folder / "Kbuild").read_text() == "obj-m := ublk_drv.o\n"
    text = (folder / "ublk_drv.c").read_text()
    assert text.startswith(DRIVER) and text.endswith('MODULE_INFO(intree, "Y");\n')


# --- the shipped mutants ------------------------------------------------------------------------------
def test_the_shipped_mutants_are_enough_and_say_what_they_undo():
    ms = load_dir(mutants.DEFAULT_MUTANTS)
    assert len(ms) >= 8
    reverts = [m for m in ms if m.fix]
    assert len(reverts) >= 4
    for m in reverts:   # a commit id and its title
        assert re.match(r"[0-9a-f]{12} \(\"ublk: .+\"\)", m.fix), m.fix
    shipped = {p.stem for p in catalog.shipped()}
    for m in ms:
        assert m.why, m.name
        assert m.expect[0] in shipped, f"{m.name}: expects {m.expect[0]}, not a shipped scenario"


def test_cases_of_the_expected_scenarios_run_first_in_their_order():
    cases = load_cases(["kill_daemon", "kill_daemon_recover", "mq_loop"])
    ordered = mutants.order_cases(cases, ("mq_loop", "kill_daemon_recover"))
    assert [c.scenario for c in ordered][:2] == ["mq_loop", "kill_daemon_recover"]
    assert {c.scenario for c in ordered[2:]} == {"kill_daemon"}


# --- the variant image --------------------------------------------------------------------------------
def test_a_variant_image_carries_the_new_module_and_shares_kernel_and_root(tmp_path):
    rel = "6.12.117"
    base = tmp_path / "tree-image"
    moddir = base / "modules/lib/modules" / rel
    (moddir / "kernel/drivers/block").mkdir(parents=True)
    (moddir / "kernel/drivers/block/ublk_drv.ko").write_bytes(b"OLD")
    (moddir / "modules.dep").write_text("kernel/drivers/block/ublk_drv.ko:\n")
    for name in ("vmlinuz", "rootfs.img", "id_ed25519", "ssh_host_ed25519_key.pub"):
        (base / name).write_text(name)
    (base / "busybox").write_bytes(b"\x7fELF busybox")
    ko = tmp_path / "ublk_drv.ko"
    shutil.copyfile("/bin/true", ko)   # any ELF file: strip --strip-debug must take it
    img = kernel_tree.with_driver_module(Image(dir=base, flavour="tree:x", kernel_release=rel), ko,
                                         tmp_path / "variant", "01-abort")
    files = _read_cpio(gzip.decompress(img.initrd.read_bytes()))
    packed = files[f"kmods/{rel}/kernel/drivers/block/ublk_drv.ko"][1]
    assert packed[:4] == b"\x7fELF" and packed != b"OLD"
    assert img.kernel.resolve() == (base / "vmlinuz").resolve()
    assert img.rootfs.resolve() == (base / "rootfs.img").resolve()
    assert (moddir / "kernel/drivers/block/ublk_drv.ko").read_bytes() == b"OLD"   # tree image kept


# --- the command: bad input, exit 2, nothing left behind ---------------------------------------------
def _run(args, tmp_path):
    env = {**os.environ, "UBD_RESULTS": str(tmp_path / "results"), "TMPDIR": str(tmp_path / "tmp")}
    env.pop("UBD_KERNEL_TREE", None)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "vm.mutants", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "results").exists(), "a refused run left a results folder"
    assert list((tmp_path / "tmp").iterdir()) == [], "a refused run left temporary files"
    return r


def test_a_tree_without_the_driver_is_refused(tmp_path):
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/Makefile").write_text("VERSION = 6\n")
    r = _run(["--kernel-tree", str(tmp_path / "tree")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "drivers/block/ublk_drv.c" in r.stderr and str(tmp_path / "tree") in r.stderr


def test_no_kernel_tree_is_refused(tmp_path):
    r = _run([], tmp_path)
    assert r.returncode == 2 and "--kernel-tree DIR is required" in r.stderr, r.stderr


def test_a_mutant_that_does_not_apply_stops_the_run_before_anything_is_built(tmp_path):
    tree = _tree(tmp_path / "tree", driver=DRIVER.replace("fail(i)", "end(i)"))
    _mutant(tmp_path / "m", name="07-stale")
    r = _run(["--kernel-tree", str(tree), "--mutants", str(tmp_path / "m")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "mutant 07-stale.patch: does not apply" in r.stderr


def test_an_unknown_scenario_is_refused_with_its_name(tmp_path):
    tree = _tree(tmp_path / "tree")
    _mutant(tmp_path / "m")
    r = _run(["--kernel-tree", str(tree), "--mutants", str(tmp_path / "m"),
              "--scenarios", "kill_daemon", "no_such_scenario"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "no_such_scenario" in r.stderr and "no such scenario" in r.stderr


def test_a_bad_mutant_header_is_refused_with_its_name(tmp_path):
    tree = _tree(tmp_path / "tree")
    _mutant(tmp_path / "m", name="03-nohdr", header="Bug: x\n")
    r = _run(["--kernel-tree", str(tree), "--mutants", str(tmp_path / "m")], tmp_path)
    assert r.returncode == 2 and "mutant 03-nohdr.patch: the header lacks Expect:" in r.stderr, r.stderr


# --- the score ---------------------------------------------------------------------------------------
def test_the_score_counts_killed_and_survived_but_not_the_ones_that_did_not_build(tmp_path):
    ms = [load(_mutant(tmp_path / "m", name=n)) for n in ("01-a", "02-b", "03-c", "04-d")]
    a = mutants.parser().parse_args(["--kernel-tree", str(_tree(tmp_path / "tree"))])
    run = mutants.MutationRun(a, ms, [], tmp_path / "run")
    (tmp_path / "run").mkdir()
    run.outcomes = [
        mutants.Outcome("01-a", mutants.KILLED, "kill_daemon[target=null]", "timeout", seconds=312),
        mutants.Outcome("02-b", mutants.SURVIVED, seconds=1500),
        mutants.Outcome("03-c", mutants.BUILD_FAILED, message="kernel build failed"),
        mutants.Outcome("04-d", mutants.KILLED, "mq_loop", "expectation failed", seconds=90)]
    assert run.score() == {"killed": 2, "counted": 3, "build_failed": 1, "percent": 66.7}
    table = run.table()
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["mutant", "result", "killed", "by", "verdict", "seconds"]
    assert rows[1] == ["01-a", "killed", "kill_daemon[target=null]", "timeout", "312"]
    assert rows[3] == ["03-c", "build", "failed", "-", "-", "0"]
    assert "score: 2/3 mutants killed (66.7%); 1 did not build (not counted)" in table
    run.write()
    doc = json.loads((tmp_path / "run/mutants.json").read_text())
    assert [m["status"] for m in doc["mutants"]] == ["killed", "survived", "build failed", "killed"]
    assert doc["mutants"][0]["mutant"]["expect"] == ["kill_daemon", "heavy_io_delete"]
    assert doc["score"]["killed"] == 2 and doc["control"] is None


# --- the real thing ----------------------------------------------------------------------------------
def _tree_for_nightly() -> Path:
    tree = os.environ.get("UBD_KERNEL_TREE") or str(linux_source.tree_path("6.12"))
    if not (Path(tree) / kernel_tree.DRIVER_SOURCE).is_file():
        pytest.fail(f"the nightly mutation test needs a Linux tree with the ublk driver: {tree} has "
                    "none (set UBD_KERNEL_TREE, or unpack Debian's linux-source-6.12 there)")
    return Path(tree)


@pytest.mark.nightly
@pytest.mark.guest
def test_a_real_mutation_run_kills_a_mutant_and_keeps_the_evidence(tmp_path):
    """Builds the tree (first time: ~15 min), the control and one mutant, boots both, runs one case."""
    tree = _tree_for_nightly()
    mdir = tmp_path / "mutants"
    mdir.mkdir()
    shutil.copy(KERNEL_DIR / "mutants/13-fetch-not-cancelable.patch", mdir)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "vm.mutants", "--kernel-tree", str(tree),
                        "--mutants", str(mdir), "--scenarios", "kill_daemon[target=null]",
                        "--results", str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=3 * 3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((out / "mutants.json").read_text())
    assert doc["control"]["status"] == "passed"
    (m,) = doc["mutants"]
    assert m["status"] == "killed" and m["killed_by"] == "kill_daemon[target=null]", m
    assert (out / m["evidence"] / "dmesg.txt").is_file()
    assert (out / "13-fetch-not-cancelable/result.json").is_file()
    assert "score: 1/1 mutants killed" in r.stdout
