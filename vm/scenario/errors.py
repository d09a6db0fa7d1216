"""What can go wrong in a scenario run, and how each failure is classified."""
from ..errors import BenchError

# Verdict kinds, as they appear in result.json, junit.xml and the summary table.
PASSED = "passed"
SKIPPED = "skipped"           # the test itself says it does not apply (a kselftest's exit 4)
EXPECTATION = "expectation failed"
TIMEOUT = "timeout"
SPLAT = "kernel splat"
PANIC = "kernel panic"
GUEST_LOST = "guest lost"
SETUP = "setup error"
KINDS = (PASSED, SKIPPED, EXPECTATION, TIMEOUT, SPLAT, PANIC, GUEST_LOST, SETUP)


class ScenarioError(BenchError):
    """A scenario file is malformed: names the file, the key path and what was expected (exit 2)."""

    def __init__(self, file, key, message):
        self.file = str(file)
        self.key = key
        self.detail = message
        where = f"{self.file}: {key}" if key else self.file
        super().__init__(f"{where}: {message}")


class StepFailure(Exception):
    """A step (or a health check) did not do what the scenario expects.

    kind is one of KINDS; expected/seen are short, human-readable; evidence names the files in the
    case's result folder (or guest paths) that show what happened."""

    def __init__(self, kind, message, expected="", seen="", evidence=()):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.expected = expected
        self.seen = seen
        self.evidence = list(evidence)
