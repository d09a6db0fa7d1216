"""The run folder's result.json and junit.xml, and the summary table printed at the end."""
import json
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

from . import kernel_info
from .baseline import EXPECTED
from .errors import GUEST_LOST, KINDS, PANIC, SETUP, SKIPPED


def expected(r) -> bool:
    """A failure the kernel's baseline lists (kernel/baselines/): reported, not failing the run."""
    return getattr(r, "verdict", "") == EXPECTED


def exit_status(results) -> int:
    """0 all passed (or failed as the baseline expects), 1 a regression, 2 a setup error stopped
    the run."""
    if any(r.kind == SETUP and not expected(r) for r in results):
        return 2
    return 1 if any(r.failed and not expected(r) for r in results) else 0


def verdict(r) -> str:
    return r.verdict or ("PASS" if r.passed else "SKIP" if r.kind == SKIPPED else r.kind.upper())


def write_json(run_dir, results, meta: dict):
    counts = {k: sum(r.kind == k for r in results) for k in KINDS}
    doc = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **meta,
           "counts": {k: v for k, v in counts.items() if v}, "exit_status": exit_status(results),
           "cases": [r.to_json() for r in results]}
    (run_dir / "result.json").write_text(json.dumps(doc, indent=2) + "\n")


def failure_text(r, base=None) -> str:
    """The few lines a user needs: where, expected, seen, evidence (shared with pytest)."""
    lines = [f"{r.id}: {r.kind}: {r.message}"]
    if r.where:
        lines.append(f"  at:       {r.where}")
    if r.expected:
        lines.append(f"  expected: {r.expected}")
    if r.seen:
        seen = r.seen.strip().splitlines()
        lines.append(f"  seen:     {seen[0]}")
        lines += [f"            {s}" for s in seen[1:12]]
    for p in r.problems:
        lines.append(f"  also:     {p}")
    if r.console_tail and r.kind in (PANIC, GUEST_LOST, SETUP):
        lines.append("  console:")
        lines += ["    " + s for s in console_excerpt(r.console_tail)]
    if r.evidence:
        folder = f"{base}/{r.dir}" if base else r.dir
        lines.append(f"  evidence: {', '.join(f'{folder}/{e}' for e in r.evidence)}")
    return "\n".join(lines)


PANIC_START = ("Kernel panic", "sysrq: Trigger a crash", "BUG:", "Oops", "general protection")


def console_excerpt(tail: str, n=14) -> list:
    """From the first line that says what went wrong (not the end of a long stack dump)."""
    lines = tail.splitlines()
    for i, line in enumerate(lines):
        if any(m in line for m in PANIC_START):
            return lines[i:i + n]
    return lines[-n:]


def write_junit(run_dir, results, suite="ubd-scenarios", kernel: dict = None):
    """kernel: kernel_info.describe(), as the suite's <properties> (kernel_release, ...)."""
    failures = sum(r.failed and r.kind != SETUP and not expected(r) for r in results)
    errors = sum(r.kind == SETUP and not expected(r) for r in results)
    skipped = sum(r.kind == SKIPPED or expected(r) for r in results)
    ts = ET.Element("testsuite", name=suite, tests=str(len(results)), failures=str(failures),
                    errors=str(errors), skipped=str(skipped),
                    time=f"{sum(r.duration for r in results):.1f}")
    if kernel:
        props = ET.SubElement(ts, "properties")
        for key, value in kernel.items():
            ET.SubElement(props, "property", name=f"kernel_{key}", value=str(value))
    for r in results:
        tc = ET.SubElement(ts, "testcase", classname=f"scenarios.{r.scenario}", name=r.id,
                           time=f"{r.duration:.1f}")
        if r.kind == SKIPPED:
            ET.SubElement(tc, "skipped", message=r.message[:500])
        elif expected(r):   # as pytest reports an xfail
            ET.SubElement(tc, "skipped", type="pytest.xfail",
                          message=f"expected failure ({r.kind}: {r.message})"[:500])
        elif r.failed:
            tag = "error" if r.kind == SETUP else "failure"
            el = ET.SubElement(tc, tag, message=f"{r.kind}: {r.message}"[:500], type=r.kind)
            el.text = failure_text(r)
        ET.SubElement(tc, "system-out").text = step_log(r)
    ET.indent(ts)
    ET.ElementTree(ts).write(run_dir / "junit.xml", encoding="utf-8", xml_declaration=True)


def step_log(r) -> str:
    out = [f"case folder: {r.dir}   guest: {r.guest}"]
    for s in r.steps:
        mark = "ok  " if s["ok"] else "FAIL"
        out.append(f"{mark} loop {s['loop']} step {s['step']:>2} {s['seconds']:6.1f}s  "
                   f"{s['what']}  {s['note'] or ''}".rstrip())
    for c in r.comparisons:
        out.append(f"compare loop {c['loop']}: {c['a']} {c['iops_a']:.0f} IOPS, "
                   f"{c['b']} {c['iops_b']:.0f} IOPS, ratio {c['ratio']:.2f}")
    return "\n".join(out)


def summary(results, run_dir, kernel: dict = None, known: dict = None) -> str:
    """A plain table: one row per case, then the failure details and comparisons. kernel: what
    ran them (kernel_info.describe()); known: the baseline's reasons by case id."""
    width = max([len(r.id) for r in results] + [4])
    rows = [kernel_info.line(kernel)] if kernel else []
    rows += [f"{'case':<{width}}  {'verdict':<19}  {'time':>7}",
             f"{'-' * width}  {'-' * 19}  {'-' * 7}"]
    for r in results:
        why = (known or {}).get(r.id.split("#", 1)[0]) if r.verdict else None
        rows.append(f"{r.id:<{width}}  {verdict(r):<19}  {r.duration:6.1f}s" +
                    (f"  ({why})" if why else ""))
    for r in results:
        for c in r.comparisons:
            rows.append(f"\n{r.id}: {c['a']} {c['iops_a']:.0f} IOPS vs {c['b']} "
                        f"{c['iops_b']:.0f} IOPS (ratio {c['ratio']:.2f}, loop {c['loop']})")
    failed = [r for r in results if r.failed and not expected(r)]
    for r in failed:
        rows.append("\n" + failure_text(r, run_dir))
    passed, skipped = sum(r.passed for r in results), sum(r.kind == SKIPPED for r in results)
    xfailed = sum(expected(r) for r in results)
    rows.append(f"\n{passed} passed, " + (f"{skipped} skipped, " if skipped else "") +
                (f"{xfailed} expected failure(s), " if xfailed else "") +
                f"{len(failed)} failed; results in {run_dir}")
    return "\n".join(rows)
