"""`-j N`: the planned cases spread over N workers, each a Runner of its own (its guest, overlay,
forwarded port and guests/ folder); one result list in plan order.

Workers are threads: a run is IO-bound on the host (QEMU does the work), and a QEMU dies with the
thread that started it (PR_SET_PDEATHSIG), so each worker starts and stops its own guests. Ctrl-C
reaches the main thread, which stops every worker's guest at once; the workers then see the stop
and return."""
import queue
import threading

from .errors import SETUP


class Workers:
    def __init__(self, make_runner, jobs: int):
        self.make_runner, self.jobs = make_runner, jobs
        self.runners = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.done = []

    def run(self, planned, on_result=None) -> list:
        """planned: [(case, repeat)]; returns [(index, result)] sorted by index. A setup error
        before any step (the guest cannot start) stops the other workers too."""
        todo = queue.Queue()
        for item in enumerate(planned):
            todo.put(item)
        done = self.done = []   # read after an interrupt: the cases that finished
        threads = [threading.Thread(target=self._work, args=(k, todo, done, len(planned), on_result),
                                    name=f"worker-{k}", daemon=True) for k in range(1, self.jobs + 1)]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            self.interrupt()
            for t in threads:
                t.join(60)
            raise
        return sorted(done, key=lambda x: x[0])

    def interrupt(self):
        """Stops every worker's guest now (from any thread)."""
        self.stop.set()
        with self._lock:
            runners = list(self.runners)
        for r in runners:
            r.close()

    def _work(self, k, todo, done, total, on_result):
        runner = self.make_runner(k)
        with self._lock:
            self.runners.append(runner)
        try:
            while not self.stop.is_set():
                try:
                    i, (case, rep) = todo.get_nowait()
                except queue.Empty:
                    return
                res = runner.run_case(case, i + 1, total, rep)
                with self._lock:
                    done.append((i, res))
                if on_result:
                    on_result(res)
                if getattr(runner, "stop_requested", False) or (res.kind == SETUP and not res.steps):
                    self.stop.set()
        finally:
            runner.close()

