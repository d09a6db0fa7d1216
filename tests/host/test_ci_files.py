"""The workflows (read with PyYAML) and the Vagrantfile: they parse, and what they run exists."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vm.paths import REPO

WORKFLOWS = REPO / ".github" / "workflows"
JUST = shutil.which("just") or str(REPO / ".venv" / "bin" / "just")
JUST_CALL = re.compile(r"\bjust\s+([a-z][a-z0-9-]*)([^\n|;&>]*)")


def _load(name) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))   # YAML 1.1 reads the key `on` as true
    return doc


def _runs(doc) -> list:
    return [s["run"] for job in doc["jobs"].values() for s in job.get("steps", []) if "run" in s]


def _recipes() -> set:
    out = subprocess.run([JUST, "--summary"], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_both_workflows_parse_and_run_on_their_triggers():
    ci, nightly = _load("ci.yml"), _load("nightly.yml")
    assert "push" in ci["on"] and any(".ci/run" in r for r in _runs(ci))
    assert "schedule" in nightly["on"] and "workflow_dispatch" in nightly["on"]
    matrix = nightly["jobs"]["scenarios"]["strategy"]["matrix"]
    assert set(matrix) == {"flavour", "shard"}
    assert nightly["jobs"]["summary"]["needs"] == "scenarios"
    uploads = [s for job in nightly["jobs"].values() for s in job["steps"]
               if s.get("uses", "").startswith("actions/upload-artifact")]
    assert {u["with"]["path"] for u in uploads} >= {"results/run", "results/bench", "results/summary"}


@pytest.mark.parametrize("name", ["ci.yml", "nightly.yml"])
def test_every_just_command_in_a_workflow_is_a_recipe_that_takes_its_options(name):
    recipes = _recipes()
    calls = [m.groups() for run in _runs(_load(name)) for m in JUST_CALL.finditer(run)]
    for recipe, args in calls:
        assert recipe in recipes, f"{name}: `just {recipe}` is no recipe (have: {sorted(recipes)})"
        options = re.findall(r"(--[a-z][a-z0-9-]*)", args)
        if options:
            helptext = subprocess.run([JUST, recipe, "--help"], cwd=REPO, capture_output=True,
                                      text=True, timeout=120).stdout
            for opt in options:
                assert opt in helptext, f"{name}: `just {recipe}` does not take {opt}"


def test_the_nightly_flavour_list_is_the_flavour_table():
    out = subprocess.run(["python3", "-m", "vm.flavours"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    from vm import flavours
    assert yaml.safe_load(out) == sorted(flavours.load_all())


def test_vagrantfile_validates_and_a_broken_one_does_not(tmp_path):
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is missing: vm/setup.sh installs Debian's vagrant package"
    text = (REPO / "Vagrantfile").read_text()
    assert "trixie" in text
    for name, content, valid in (("good", text, True),
                                 ("broken", text.replace("config.vm.box =", "config.vm.bx ="), False)):
        d = tmp_path / name   # a copy: validate leaves a .vagrant folder behind
        d.mkdir()
        (d / "Vagrantfile").write_text(content)
        r = subprocess.run([vagrant, "validate"], cwd=d, capture_output=True, text=True, timeout=120)
        assert (r.returncode == 0) == valid, f"{name}: {r.stdout}{r.stderr}"
