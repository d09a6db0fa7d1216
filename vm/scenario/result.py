"""The verdict on one case, with everything the report needs."""
from dataclasses import asdict, dataclass, field

from .errors import PASSED, SKIPPED


@dataclass
class CaseResult:
    id: str                       # kill_daemon[target=null], "#2" appended for --repeat runs
    scenario: str
    variant: dict
    description: str
    kind: str = PASSED            # one of errors.KINDS
    message: str = ""
    where: str = ""               # "loop 2/3, step 5/8: wait ubd DEAD within 30s"
    expected: str = ""
    seen: str = ""
    evidence: list = field(default_factory=list)
    problems: list = field(default_factory=list)   # further findings, e.g. health after a failure
    duration: float = 0.0
    dir: str = ""                 # the case's folder, relative to the run folder
    steps: list = field(default_factory=list)      # step log: one dict per executed step
    fio: list = field(default_factory=list)
    comparisons: list = field(default_factory=list)
    guest: str = ""               # which guest ran it (guest-1, ...), "fresh" or "reused"
    console_tail: str = ""
    verdict: str = ""             # against the kernel's baseline (baseline.py): PASS, REGRESSION, ...

    @property
    def passed(self):
        return self.kind == PASSED

    @property
    def failed(self):
        """Neither passed nor skipped: what fails a run."""
        return self.kind not in (PASSED, SKIPPED)

    def to_json(self):
        return asdict(self)
