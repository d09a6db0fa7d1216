"""Runs Cases in guests: deadlines, background work, health checks, evidence, verdicts.

One guest at a time. It is reused by the next case while cases pass and leave the kernel clean
(no splat, no new taint, nothing left behind); any failure or taint gets a fresh guest next."""
import shutil
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from ..console import console_tail
from ..device import find_splats
from ..errors import BenchError, GuestLost, KernelPanic, SetupError
from ..guest import Guest, GuestOptions
from . import health, steps
from .errors import EXPECTATION, GUEST_LOST, PANIC, PASSED, SETUP, SKIPPED, SPLAT, TIMEOUT, StepFailure
from .model import WORK_DIR, Case
from .progress import Progress
from .result import CaseResult
from .session import AgentClient, AgentStuck
from .target import NotApplicable

# When a case has several problems, the verdict names the most serious.
SEVERITY = (PANIC, GUEST_LOST, SPLAT, TIMEOUT, EXPECTATION, SETUP)
# Every boot of a case (a power_cut or reboot step boots again) runs BOOT_SETUP; the first also
# RESET. (Not `SETUP`: that name is the verdict kind from .errors.)
RESET = f"rm -rf {WORK_DIR} && rm -f /var/log/ubdsrv/* && "
BOOT_SETUP = (f"mkdir -p {WORK_DIR}/fio && modprobe ublk_drv && echo 1 > /proc/sys/kernel/sysrq && "
              # a hung ublk request shows up in dmesg as a hung task well before a case deadline
              "{ sysctl -qw kernel.hung_task_timeout_secs=60 2>/dev/null; true; }")
EVIDENCE = (f"cd {WORK_DIR} && {{ tail -v -n +1 /var/log/ubdsrv/*.log > server.log 2>/dev/null || "
            "echo '(no server log)' > server.log; }; tar czf /var/tmp/ubd-evidence.tgz server.log fio")


@dataclass
class RunOptions:
    guest: dict = field(default_factory=dict)   # GuestOptions fields from the front end (vm/options.py)
    keep: bool = False        # on failure keep the guest up and print how to log in
    boot_deadline: float = 120.0
    server_dir: Path = None   # push this ubdsrv tree instead of the repo's (tests of broken servers)
    guest_prefix: str = ""    # "w2-": parallel runners (-j, xdist) in one run folder name guests apart
    target: object = None     # a target.RemoteMachine: run there instead of booting guests (--target)


class GuestPool:
    """At most one live guest and its agent; booted on demand."""

    def __init__(self, opts: RunOptions, run_dir: Path, note):
        self.opts, self.run_dir, self.note = opts, Path(run_dir), note
        self.guest = self.agent = None
        self.booted = 0
        self.last_dir = None
        self.accel_used = None
        self.kernel_release = None   # `uname -r` of the guests' kernel (their image says it)
        self.starting = None   # the guest being booted: discard() from another thread stops it (-j)

    def acquire(self):
        """(guest, agent, fresh). Boot problems propagate (KernelPanic, BootTimeout, SetupError).
        Every guest has the data disk (vm/guest.py DATA_DIR; about a second at boot): a case that
        cuts the power can then run on the guest the case before left."""
        if self.guest is not None and self.guest.is_alive():
            return self.guest, self.agent, False
        self.discard()
        self.booted += 1
        name = f"{self.opts.guest_prefix}guest-{self.booted}"
        o = self.opts
        self.last_dir = None if o.target else self.run_dir / "guests" / name
        g = o.target or Guest(GuestOptions(**o.guest, run_dir=self.last_dir, data_disk=True,
                                           server_dir=o.server_dir, boot_deadline=o.boot_deadline,
                                           log=self.note))
        self.starting = g
        try:
            g.start()
            agent = AgentClient(g)
            agent.start()
        except BaseException:
            g.stop()
            raise
        finally:
            self.starting = None
        g.name = name
        self.accel_used = g.accel
        self.kernel_release = g.machine.image.kernel_release
        self.guest, self.agent = g, agent
        self.note(f"{g.name}: up in {g.boot_seconds:.1f} s ({g.accel})")
        return g, agent, True

    def not_applicable(self, case) -> str:
        """Why the case cannot run where this pool runs cases ("": it can; a guest runs them all)."""
        return self.opts.target.not_applicable(case) if self.opts.target else ""

    def discard(self):
        if self.starting is not None:   # Ctrl-C under -j: a worker's guest still booting
            self.starting.stop()
        if self.agent is not None:
            self.agent.close()
        if self.guest is not None:
            self.guest.stop()
        self.guest = self.agent = None

    def close(self):
        self.discard()
        if self.opts.target:   # connected before the first case, even if none ran there
            self.opts.target.stop()


class Runner:
    def __init__(self, opts: RunOptions, run_dir: Path, progress: Progress = None):
        self.opts = opts
        self.run_dir = Path(run_dir)
        self.progress = progress or Progress()
        self.pool = GuestPool(opts, self.run_dir, self.progress.note)
        self.stop_requested = False   # set when the user ends the run while a guest is kept

    def close(self):
        self.pool.close()

    def run_case(self, case: Case, n=1, total=1, repeat=None) -> CaseResult:
        cid = case.id + (f"#{repeat}" if repeat else "")
        res = CaseResult(id=cid, scenario=case.scenario, variant=dict(case.variant),
                         description=case.description)
        safe = case.safe_id + (f"-{repeat}" if repeat else "")
        case_dir = self.run_dir / safe
        case_dir.mkdir(parents=True, exist_ok=True)
        res.dir = safe
        self.progress.case_started(cid, n, total)
        t0 = time.monotonic()
        try:
            keep = self._run(case, res, case_dir)
            if self.opts.target:
                self.opts.target.case_done(res)
        finally:
            res.duration = time.monotonic() - t0
            self.progress.case_done(res)
        if keep:   # after the verdict is printed: the user reads why, then logs in
            self._keep(self.pool.guest)
            self.pool.discard()
        return res

    # --- one case --------------------------------------------------------------------------------
    def _run(self, case, res, case_dir) -> bool:
        """Runs the case into res; True when the failed guest is to be kept up (--keep)."""
        self.progress.phase("getting a guest")
        try:
            why = self.pool.not_applicable(case)
            if why:
                raise NotApplicable(why)
            guest, agent, fresh = self.pool.acquire()
        except NotApplicable as e:
            res.kind, res.message = SKIPPED, str(e)
            return False
        except BenchError as e:
            kind = PANIC if isinstance(e, KernelPanic) else SETUP
            self._verdict(res, kind, f"could not start a guest: {e}",
                          console_tail=getattr(e, "console_tail", ""))
            boot_log = self.pool.last_dir and self.pool.last_dir / "console.log"
            if boot_log and boot_log.exists():
                shutil.copyfile(boot_log, case_dir / "console.log")
            return False
        res.guest = f"{guest.name} ({'fresh' if fresh else 'reused'})"
        console_from = _size(guest.console_log)
        failure, usable = None, True
        ctx = steps.Context(case=case, agent=agent, new_boot=self._new_boot)
        res.fio, res.comparisons = ctx.fio, ctx.comparisons   # kept even if a step fails
        try:
            self._begin(ctx, RESET + BOOT_SETUP)
            self._steps(case, ctx, res)
        except StepFailure as f:
            failure = f
        except AgentStuck as e:
            usable = False
            failure = StepFailure(TIMEOUT, str(e), evidence=["dmesg.txt", "console.log"])
        except KernelPanic as e:
            usable = False
            failure = StepFailure(PANIC, "the guest kernel panicked", evidence=["console.log"])
            res.console_tail = e.console_tail
        except GuestLost as e:
            usable = False
            failure = StepFailure(GUEST_LOST, str(e), evidence=["console.log"])
            res.console_tail = e.console_tail
        except BenchError as e:
            usable = False
            failure = StepFailure(SETUP, str(e))
        except Exception as e:  # an engine bug: say so plainly, keep going with a fresh guest
            usable = False
            failure = StepFailure(SETUP, f"engine error: {e!r}\n{traceback.format_exc()}")
        if failure is not None:
            res.kind, res.message = failure.kind, failure.message
            res.expected, res.seen, res.evidence = failure.expected, failure.seen, failure.evidence
        # a guest booted again by a step is as fresh as a new one (its root replayed its journal)
        reusable = usable and failure is None
        self.pool.agent = ctx.agent
        for name, text in ctx.evidence.items():
            (case_dir / name).write_text(text)
        if usable:
            try:
                reusable = self._after(case, res, ctx, guest, case_dir, failure) and reusable
            except (BenchError, AgentStuck, KeyError) as e:
                if isinstance(e, KernelPanic):
                    self._add_problem(res, PANIC, "kernel panic during the health check")
                    res.console_tail = e.console_tail
                else:
                    self._add_problem(res, GUEST_LOST if isinstance(e, GuestLost) else TIMEOUT,
                                      f"health check could not complete: {e}")
                reusable = False
        elif guest.is_alive():
            self._evidence_by_exec(guest, case_dir)
        (case_dir / "console.log").write_bytes(_read_from(guest.console_log, console_from))
        if not res.console_tail and res.kind in (PANIC, GUEST_LOST, TIMEOUT):
            res.console_tail = console_tail(
                _read_from(guest.console_log, console_from).decode(errors="replace"))
        if not res.passed and self.opts.keep and guest.is_alive():
            return True
        if not reusable or not guest.is_alive():
            self.pool.discard()
        return False

    def _begin(self, ctx, cmd):
        """Prepares the guest for the case (or a new boot of it): its dmesg and taint from here on."""
        begin = ctx.agent.call("run", timeout=60, cmd=cmd)
        if begin.get("status") != 0:
            raise SetupError(f"preparing the guest failed: {begin.get('stderr', '').strip()}")
        ctx.kmsg_mark = ctx.agent.call("kmsg_mark", timeout=30)["seq"]
        ctx.taint0 = ctx.agent.call("snapshot", timeout=30)["tainted"]

    def _new_boot(self, ctx):
        """Called by power_cut and reboot once the guest is up again: a new agent, set up as at
        the start of the case (its files on the root from before are kept)."""
        agent = AgentClient(ctx.guest)
        agent.start()
        ctx.agent = self.pool.agent = agent
        self.progress.note(f"{ctx.guest.name}: booted again ({ctx.boots + 1} boots in this case)")
        self._begin(ctx, BOOT_SETUP)

    def _steps(self, case, ctx, res):
        deadline = time.monotonic() + case.timeout
        n = len(case.steps)
        for loop in range(case.loops):
            ctx.loop = loop
            for step in case.steps:
                where = (f"loop {loop + 1}/{case.loops}, " if case.loops > 1 else "") + \
                        f"step {step.index + 1}/{n} ({step.describe()})"
                self.progress.step(loop + 1, case.loops, step.index + 1, n, step.describe())
                t = time.monotonic()
                try:
                    timeout = self._budget(case, deadline, step.timeout, where)
                    note = steps.RUN[step.kind](ctx, step, timeout)
                except BaseException as e:   # StepFailure, or the guest lost under the step
                    res.where = where
                    self._log(res, loop, step, t, False, getattr(e, "message", None) or str(e))
                    raise
                self._log(res, loop, step, t, True, note)
            for job in list(ctx.running):   # background work not waited for: reap it now
                where = f"loop {loop + 1}/{case.loops}, end of loop (reaping fio {job})"
                res.where = where
                steps.reap(ctx, job, self._budget(case, deadline, 600.0, where))
            res.where = ""

    @staticmethod
    def _budget(case, deadline, step_timeout, where) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepFailure(TIMEOUT, f"the scenario deadline ({case.timeout:g} s) passed",
                              expected=f"all steps within {case.timeout:g} s",
                              seen=f"still at {where}")
        return min(step_timeout, left)

    @staticmethod
    def _log(res, loop, step, t, ok, note):
        res.steps.append({"loop": loop + 1, "step": step.index + 1, "do": step.kind,
                          "what": step.describe(), "ok": ok, "seconds": round(time.monotonic() - t, 2),
                          "note": note})

    # --- after the steps -------------------------------------------------------------------------
    def _after(self, case, res, ctx, guest, case_dir, failure) -> bool:
        """Health check and evidence; returns whether the guest is fit for the next case."""
        self.progress.phase("health check")
        agent = ctx.agent
        if failure is not None and failure.kind == TIMEOUT:
            agent.call("run", timeout=20, cmd="echo w > /proc/sysrq-trigger")  # blocked tasks
        h = health.check(agent, ctx.kmsg_mark, ctx.taint0, steps_passed=failure is None)
        dmesg = ctx.earlier_dmesg + ([f"--- boot {ctx.boots + 1} of the case ---"] if ctx.boots
                                     else []) + h.dmesg
        (case_dir / "dmesg.txt").write_text("\n".join(dmesg) + "\n")
        # splats of the boots before a power cut or reboot count as much as this boot's
        earlier = find_splats(ctx.earlier_dmesg)
        if earlier:
            kinds = ", ".join(sorted({k for k, _ in earlier}))
            h.problems.append((SPLAT, f"kernel splat in dmesg before the cut ({kinds}): "
                                      f"{earlier[0][1]}"))
            h.splat_lines = [line for _, line in earlier] + h.splat_lines
        for kind, message in h.problems:
            self._add_problem(res, kind, message)
        if h.splat_lines:
            res.evidence = res.evidence or ["dmesg.txt"]
            res.seen = res.seen or "\n".join(h.splat_lines[:5])
        self._evidence(agent, guest, case_dir)
        return h.clean_after and not h.problems

    def _add_problem(self, res, kind, message):
        if res.kind == PASSED:
            res.kind, res.message = kind, message
            res.evidence = ["dmesg.txt"] if kind == SPLAT else ["dmesg.txt", "server.log"]
            res.where = res.where or "health check after the steps"
            return
        res.problems.append(f"{kind}: {message}")
        if SEVERITY.index(kind) < SEVERITY.index(res.kind):   # e.g. a splat behind a timeout
            res.problems.insert(0, f"{res.kind}: {res.where}: {res.message}")
            res.kind, res.message = kind, message

    def _evidence(self, agent, guest, case_dir):
        agent.call("run", timeout=60, cmd=EVIDENCE)
        self._pull_bundle(guest, case_dir)

    def _evidence_by_exec(self, guest, case_dir):
        """The agent is wedged: a separate exec gets what it can, with short deadlines."""
        try:
            guest.exec("echo w > /proc/sysrq-trigger", timeout=15)
            r = guest.exec("dmesg", timeout=30)
            (case_dir / "dmesg.txt").write_text(r.stdout)
            guest.exec(EVIDENCE, timeout=30)
            self._pull_bundle(guest, case_dir)
        except (BenchError, OSError) as e:
            (case_dir / "evidence-error.txt").write_text(f"collecting evidence failed: {e}\n")

    @staticmethod
    def _pull_bundle(guest, case_dir):
        local = case_dir / ".evidence.tgz"
        guest.pull("/var/tmp/ubd-evidence.tgz", local)
        with tarfile.open(local) as tar:
            tar.extractall(case_dir, filter="data")
        local.unlink()

    def _keep(self, guest):
        self.progress.note(f"guest kept up for inspection; log in with:\n  {guest.ssh_command()}\n"
                           "press Enter to tear it down and go on (Ctrl-C stops the run)")
        try:
            try:
                input()
            except EOFError:   # no terminal: hold the guest until interrupted
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            self.stop_requested = True

    @staticmethod
    def _verdict(res, kind, message, console_tail=""):
        res.kind, res.message, res.console_tail = kind, message, console_tail
        res.evidence = ["console.log"]


def _size(path) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def _read_from(path, offset) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return b""
