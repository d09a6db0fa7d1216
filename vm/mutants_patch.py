"""A mutant: one patch to drivers/block/ublk_drv.c with a header saying what it breaks.

    Bug: what is wrong once the patch is applied
    Fix: 8741d0737921 ("ublk: make sure ubq->canceling is set when queue is frozen")
    Expect: kill_daemon, heavy_io_delete
    Why: how those scenarios should notice (a continuation line starts with a blank)

    --- a/drivers/block/ublk_drv.c
    +++ b/drivers/block/ublk_drv.c
    @@ ...

`Fix:` names the upstream fix the patch undoes; a mutant that reintroduces no particular fixed bug
says `Class:` instead (the bug class: missing cancel, double completion, ...). Bug, Expect and one of
Fix/Class are required. The name of a mutant is its file name without .patch, e.g. 01-canceling."""
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BenchError
from .kernel_tree import DRIVER_SOURCE

FIELDS = ("Bug", "Fix", "Class", "Expect", "Why")
REQUIRED = ("Bug", "Expect")
PATCH_CMD = ("patch", "-p1", "--batch", "--forward", "--fuzz=0", "--no-backup-if-mismatch",
             "--reject-file=-")


class MutantError(BenchError):
    """A mutant file that cannot be used: names the file and what is wrong (exit 2)."""

    def __init__(self, path, message):
        super().__init__(f"mutant {Path(path).name}: {message}")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: Path
    bug: str
    fix: str          # the upstream fix it undoes, or ""
    bug_class: str    # the bug class when it undoes no particular fix, or ""
    expect: tuple     # scenario names expected to kill it, most likely first
    why: str

    @property
    def origin(self) -> str:
        return f"reverts {self.fix}" if self.fix else f"class: {self.bug_class}"

    def to_json(self) -> dict:
        return {"name": self.name, "file": str(self.path), "bug": self.bug, "fix": self.fix,
                "class": self.bug_class, "expect": list(self.expect), "why": self.why}


def split(text: str):
    """(header lines, diff text): the diff starts at the first `diff ` or `--- ` line."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith(("diff ", "--- ")):
            return [ln.rstrip("\n") for ln in lines[:i]], "".join(lines[i:])
    return [ln.rstrip("\n") for ln in lines], ""


def parse_header(lines, path) -> dict:
    fields, key = {}, None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            key = None
            continue
        if line[0] in " \t":
            if key is None:
                raise MutantError(path, f"line {n}: a continuation line outside a field")
            fields[key] += " " + line.strip()
            continue
        m = re.match(r"([A-Za-z]+):\s*(.*)$", line)
        if not m or m.group(1) not in FIELDS:
            raise MutantError(path, f"line {n}: expected one of {', '.join(f + ':' for f in FIELDS)}"
                                    f" got {line[:60]!r}")
        key = m.group(1)
        if key in fields:
            raise MutantError(path, f"line {n}: {key}: given twice")
        fields[key] = m.group(2).strip()
    missing = [k for k in REQUIRED if not fields.get(k)]
    if missing:
        raise MutantError(path, f"the header lacks {', '.join(k + ':' for k in missing)}")
    if bool(fields.get("Fix")) == bool(fields.get("Class")):
        raise MutantError(path, "the header needs exactly one of Fix: (the upstream fix it undoes) "
                                "and Class: (the bug class)")
    return fields


def touched_files(diff: str) -> set:
    """Paths a unified diff changes, without the a/ b/ prefixes."""
    out = set()
    for line in diff.splitlines():
        m = re.match(r"(---|\+\+\+) (?:[ab]/)?(\S+)", line)
        if m and m.group(2) != "/dev/null":
            out.add(m.group(2))
    return out


def load(path) -> Mutant:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise MutantError(path, f"cannot read it: {e}") from None
    header, diff = split(text)
    fields = parse_header(header, path)
    if "\n@@ " not in "\n" + diff:
        raise MutantError(path, "no unified diff hunk (@@) after the header")
    files = touched_files(diff)
    if files != {DRIVER_SOURCE}:
        raise MutantError(path, f"a mutant changes {DRIVER_SOURCE} only; this one changes "
                                f"{', '.join(sorted(files)) or 'nothing'}")
    expect = tuple(s.strip() for s in fields["Expect"].split(",") if s.strip())
    return Mutant(name=path.stem, path=path.resolve(), bug=fields["Bug"], fix=fields.get("Fix", ""),
                  bug_class=fields.get("Class", ""), expect=expect, why=fields.get("Why", ""))


def load_dir(directory) -> list:
    directory = Path(directory)
    if not directory.is_dir():
        raise BenchError(f"--mutants {directory}: not a directory")
    paths = sorted(directory.glob("*.patch"))
    if not paths:
        raise BenchError(f"--mutants {directory}: no *.patch files in it")
    return [load(p) for p in paths]


def apply(mutant: Mutant, tree: Path, dest: Path):
    """Copies the tree's driver source to dest/drivers/block/ and applies the mutant to the copy.
    The tree is only read. MutantError (naming the mutant and patch's words) when it does not apply."""
    target = dest / DRIVER_SOURCE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tree) / DRIVER_SOURCE, target)
    r = subprocess.run([*PATCH_CMD, "-d", str(dest), "-i", str(mutant.path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        out = (r.stdout + r.stderr).strip().splitlines()
        raise MutantError(mutant.path, f"does not apply to {Path(tree) / DRIVER_SOURCE}: "
                                       + " / ".join(out[-4:]))


def check_applies(mutants, tree: Path):
    """Every mutant applies to the tree (each on its own copy, in a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="ubd-mutant-check-") as tmp:
        for m in mutants:
            apply(m, tree, Path(tmp) / m.name)
