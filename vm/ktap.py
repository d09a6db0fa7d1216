"""A KTAP (and TAP 13) reader for the output of the kernel's selftest runner (run_kselftest.sh).

    TAP version 13                      version line (KTAP version 1 / TAP version 13/14)
    1..2                                the plan
    # timeout set to 150                diagnostics: "# " lines, kept as the next test's log
    # selftests: ublk: test_null_01.sh
    # null_01 : [PASS]
    ok 1 selftests: ublk: test_null_01.sh
    not ok 2 selftests: ublk: test_loop_01.sh # TIMEOUT 150 seconds

A result line may carry a directive after " # ": SKIP, XFAIL, TODO, TIMEOUT or the runner's
`exit=N`. Subtests come before their parent's result line, either indented (KTAP) or behind the
runner's "# " prefix (a C selftest's own KTAP inside the shell runner's log); both are read as
children of the test whose result follows them."""
import re
from dataclasses import dataclass, field

PASS, FAIL, SKIP, XFAIL, TIMEOUT = "pass", "fail", "skip", "xfail", "timeout"

_VERSION = re.compile(r"^(KTAP version \d+|TAP version \d+)\s*$")
_PLAN = re.compile(r"^1\.\.(\d+)")
_RESULT = re.compile(r"^(not ok|ok)\s+(\d+)(?:\s+-)?\s*(.*)$")
_BAIL = re.compile(r"^Bail out!\s*(.*)$")
_INDENT = re.compile(r"^(\s+)")


@dataclass
class Test:
    number: int
    name: str
    outcome: str             # PASS, FAIL, SKIP, XFAIL or TIMEOUT
    directive: str = ""      # what followed " # " on the result line: "SKIP ...", "exit=1", ...
    log: list = field(default_factory=list)        # the lines before the result, prefix removed
    subtests: list = field(default_factory=list)


@dataclass
class Document:
    version: str = ""
    plan: int = None
    tests: list = field(default_factory=list)
    bail_out: str = None
    trailing: list = field(default_factory=list)   # lines after the last result (a cut-off run)

    @property
    def missing(self) -> int:
        """Planned tests that never reported (the runner died, the guest was lost)."""
        return max(0, (self.plan or 0) - len(self.tests))


def outcome_of(ok: bool, directive: str) -> str:
    word = directive.split()[0].upper() if directive.split() else ""
    if word == "SKIP":
        return SKIP                      # "not ok N x # SKIP" is a skip as well
    if word == "TIMEOUT":
        return TIMEOUT
    if word == "XFAIL" and ok:
        return XFAIL
    return PASS if ok else FAIL


def _split_directive(rest: str):
    """'name # SKIP why' -> ('name', 'SKIP why'); a '#' inside the name without spaces stays."""
    name, sep, directive = rest.partition(" # ")
    if not sep and rest.startswith("# "):
        return "", rest[2:].strip()
    return name.strip(), directive.strip()


def _strip_prefix(line: str):
    """The runner's '# ' prefix removed; None when the line has none."""
    if line.startswith("# "):
        return line[2:]
    if line == "#":
        return ""
    return None


def parse(text: str) -> Document:
    return _parse(text.splitlines())


def _parse(lines) -> Document:
    doc = Document()
    pending = []               # log lines of the test to come
    indented, prefixed = [], []   # its subtests' lines: indented, or behind the "# " prefix
    for raw in lines:
        line = raw.rstrip("\r\n")
        if doc.version and _INDENT.match(line) and line.strip():
            indented.append(line)
            pending.append(line.strip())
            continue
        stripped = line.strip()
        if not doc.version and _VERSION.match(stripped):
            doc.version = stripped
            continue
        if doc.plan is None and not doc.tests and _PLAN.match(stripped):
            doc.plan = int(_PLAN.match(stripped).group(1))
            continue
        r = _RESULT.match(stripped)
        if r:
            name, directive = _split_directive(r.group(3))
            doc.tests.append(Test(number=int(r.group(2)), name=name,
                                  outcome=outcome_of(r.group(1) == "ok", directive),
                                  directive=directive, log=pending,
                                  subtests=_subtests(_dedent(indented) if indented else prefixed)))
            pending, indented, prefixed = [], [], []
            continue
        b = _BAIL.match(stripped)
        if b:
            doc.bail_out = b.group(1)
            break
        inner = _strip_prefix(line)
        pending.append(line if inner is None else inner)
        if inner is not None:
            prefixed.append(inner)
    doc.trailing = pending
    return doc


def _dedent(lines) -> list:
    """One level of nesting removed: the first line's indentation (2 in KTAP, 4 in TAP 13)."""
    unit = len(_INDENT.match(lines[0]).group(1))
    return [l[unit:] if l[:unit].isspace() else l.lstrip() for l in lines]


def _subtests(lines) -> list:
    """The results of a nested (K)TAP document in a test's lines; empty when there is none."""
    if not any(_RESULT.match(l.strip()) for l in lines):
        return []
    has_version = any(_VERSION.match(l.strip()) for l in lines)
    return _parse(lines if has_version else ["KTAP version 1"] + lines).tests
