"""Progress of a run. On a terminal, rich draws the running case live (its steps as a bar, the time
it has taken, what runs now) under the lines that stay: notes and verdicts. Elsewhere (pytest, CI
logs) every event is one plain line, without control characters."""
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress as LiveDisplay, SpinnerColumn, TextColumn, TimeElapsedColumn


class Progress:
    def __init__(self, stream=None, live=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.case = ""
        self.t0 = None
        self._display = None   # the live display of the running case
        self._task = None

    # --- events from the runner ------------------------------------------------------------------
    def case_started(self, case_id, n, total):
        self.case, self.t0 = f"[{n}/{total}] {case_id}", time.monotonic()
        if not self.live:
            self._line(f"{self.case}: started")
            return
        self._display = LiveDisplay(
            SpinnerColumn(), TextColumn("{task.description}", markup=False), BarColumn(bar_width=16),
            TimeElapsedColumn(), TextColumn("{task.fields[status]}", markup=False),
            console=Console(file=self.stream, force_terminal=True, highlight=False),
            transient=True, refresh_per_second=4)
        self._task = self._display.add_task(self.case, total=None, status="starting")
        self._display.start()

    def step(self, loop, loops, index, nsteps, describe):
        where = f"loop {loop}/{loops} " if loops > 1 else ""
        status = f"{where}step {index}/{nsteps} {describe}"
        if self._display:
            self._display.update(self._task, status=status, total=loops * nsteps,
                                 completed=(loop - 1) * nsteps + index - 1)
        else:
            self._line(f"{self.case} {self._elapsed()} {status}")

    def phase(self, text):
        """Between steps: booting, health check, evidence."""
        if self._display:
            self._display.update(self._task, status=text)
        else:
            self._line(f"{self.case} {self._elapsed()} {text}")

    def note(self, message):
        """A line that stays (boot, guest kept, warnings)."""
        if self._display:
            self._display.console.print(message, markup=False, soft_wrap=True)
        else:
            self._line(message)

    def case_done(self, result):
        if self._display:
            self._display.stop()
            self._display = None
        verdict = "PASS" if result.passed else "SKIP" if not result.failed else f"FAIL ({result.kind})"
        line = f"{self.case}: {verdict} in {result.duration:.1f} s"
        if not result.passed:
            line += f"\n    {result.where}: {result.message}" if result.where else \
                f"\n    {result.message}"
        self.note(line)

    # --- plain lines -----------------------------------------------------------------------------
    def _elapsed(self):
        return f"{time.monotonic() - self.t0:6.1f}s" if self.t0 else ""

    def _line(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()
