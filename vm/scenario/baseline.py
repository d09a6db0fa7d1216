"""Per-kernel baselines (kernel/baselines/<flavour>.toml): the cases known to fail, or not to apply,
on that kernel, each with its reason (kdevops' expunge lists are the model).

    [[known]]
    case = "kill_daemon_recover[mode=fail_io]"
    reason = "UBLK_F_USER_RECOVERY_FAIL_IO needs 6.13"

A listed case that fails is an `expected failure` and does not fail the run; a listed case that
passes is `unexpectedly passed` (reported, so the entry can go); any other failure is a regression."""
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..errors import BenchError
from ..paths import KERNEL_DIR
from .errors import SKIPPED

BASELINE_DIR = KERNEL_DIR / "baselines"
PASS, REGRESSION = "PASS", "REGRESSION"
EXPECTED, UNEXPECTED_PASS = "expected failure", "unexpectedly passed"


@dataclass(frozen=True)
class Baseline:
    path: Path
    known: dict            # case id -> reason

    def verdict(self, case_id: str, passed: bool) -> str:
        listed = case_id in self.known
        if passed:
            return UNEXPECTED_PASS if listed else PASS
        return EXPECTED if listed else REGRESSION


def path_for(name: str, base_dir: Path = None) -> Path:
    return (base_dir or BASELINE_DIR) / f"{name}.toml"


def load(name: str, base_dir: Path = None) -> Baseline:
    """The baseline of a flavour (or any name); an absent file is an empty baseline."""
    path = path_for(name, base_dir)
    if not path.exists():
        return Baseline(path, {})
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"{path}: not valid TOML: {e}") from None
    known = {}
    for i, entry in enumerate(doc.get("known", [])):
        where = f"{path}: known[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"case", "reason"}:
            raise BenchError(f"{where}: expected exactly the keys `case` and `reason`")
        if not all(isinstance(entry[k], str) and entry[k].strip() for k in ("case", "reason")):
            raise BenchError(f"{where}: `case` and `reason` must be non-empty strings")
        known[entry["case"]] = entry["reason"]
    extra = set(doc) - {"known"}
    if extra:
        raise BenchError(f"{path}: unknown key(s) {', '.join(sorted(extra))}; expected [[known]] tables")
    return Baseline(path, known)


def base_case_id(case_id: str) -> str:
    """--repeat appends "#2" to an id; the baseline speaks of the case."""
    return case_id.split("#", 1)[0]


SKIP = "SKIP"


def apply(results, baseline: Baseline) -> None:
    """Sets each result's `verdict` from its outcome and the baseline (a skip stays a skip)."""
    for r in results:
        r.verdict = SKIP if r.kind == SKIPPED else baseline.verdict(base_case_id(r.id), r.passed)


def regressions(results) -> list:
    """The results that fail the run (after apply): an expected failure does not."""
    return [r for r in results if r.verdict == REGRESSION]


def write(results, baseline: Baseline, reasons: dict = None) -> Path:
    """--update-baseline: the failing cases of this run become the list; reasons already written
    are kept, a new entry gets the failure's kind and message as its reason."""
    lines = [f"# Cases known to fail or not to apply on this kernel; written by --update-baseline,",
             "# reasons may be edited by hand (they are kept on the next update).", ""]
    for r in sorted((r for r in results if not r.passed and r.kind != SKIPPED), key=lambda r: r.id):
        case = base_case_id(r.id)
        reason = baseline.known.get(case) or (reasons or {}).get(case) or f"{r.kind}: {r.message}"[:200]
        lines += ["[[known]]", f"case = {_toml_str(case)}", f"reason = {_toml_str(reason)}", ""]
    baseline.path.parent.mkdir(parents=True, exist_ok=True)
    baseline.path.write_text("\n".join(lines))
    return baseline.path


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
