"""Progress: one live line on a terminal (case, loop, step n/N, elapsed), plain lines otherwise."""
import sys
import threading
import time


class Progress:
    def __init__(self, stream=None, live=None):
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.case = ""
        self.status = ""
        self.t0 = None
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = None

    # --- events from the runner ------------------------------------------------------------------
    def case_started(self, case_id, n, total):
        self.case, self.t0 = f"[{n}/{total}] {case_id}", time.monotonic()
        self.status = "starting"
        if self.live:
            self._start_ticker()
        else:
            self._line(f"{self.case}: started")

    def step(self, loop, loops, index, nsteps, describe):
        where = f"loop {loop}/{loops} " if loops > 1 else ""
        self.status = f"{where}step {index}/{nsteps} {describe}"
        if not self.live:
            self._line(f"{self.case} {self._elapsed()} {self.status}")
        else:
            self._redraw()

    def phase(self, text):
        """Between steps: booting, health check, evidence."""
        self.status = text
        if self.live:
            self._redraw()
        else:
            self._line(f"{self.case} {self._elapsed()} {text}")

    def note(self, message):
        """A line that stays (boot, guest kept, warnings)."""
        with self.lock:
            if self.live:
                self.stream.write("\r\033[K")
            self.stream.write(message + "\n")
            self.stream.flush()
        if self.live and self._ticker:
            self._redraw()

    def case_done(self, result):
        self._stop_ticker()
        verdict = "PASS" if result.passed else f"FAIL ({result.kind})"
        line = f"{self.case}: {verdict} in {result.duration:.1f} s"
        if not result.passed:
            line += f"\n    {result.where}: {result.message}" if result.where else \
                f"\n    {result.message}"
        self.note(line)

    # --- drawing ---------------------------------------------------------------------------------
    def _elapsed(self):
        return f"{time.monotonic() - self.t0:6.1f}s" if self.t0 else ""

    def _line(self, text):
        with self.lock:
            self.stream.write(text + "\n")
            self.stream.flush()

    def _redraw(self):
        text = f"{self.case} {self._elapsed()} {self.status}"
        width = 160
        with self.lock:
            self.stream.write("\r\033[K" + text[:width])
            self.stream.flush()

    def _start_ticker(self):
        self._stop_ticker()
        self._stop.clear()

        def tick():
            while not self._stop.wait(0.5):
                self._redraw()
        self._ticker = threading.Thread(target=tick, daemon=True)
        self._ticker.start()

    def _stop_ticker(self):
        if self._ticker:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
            with self.lock:
                self.stream.write("\r\033[K")
                self.stream.flush()
