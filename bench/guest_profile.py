"""Pushed into the guest as `sitecustomize.py` by `python -m bench --profile`: profiles every process
of the Python server with cProfile without the server's help. Python imports sitecustomize at start;
when UBDSRV_PROFILE is set, the process profiles itself, every forked child (daemon, queue processes)
starts a fresh profiler, and each dumps `$UBDSRV_PROFILE.<comm>.<pid>` on its way out (atexit, or
os._exit, which the server's queue processes use). The clock is CPU time (UBDSRV_PROFILE_CLOCK=cpu,
the default: time blocked in io_uring_enter does not hide the hot path) or wall time (=wall).
Standard library only (it runs in the guest)."""
import atexit
import os

_PATH = os.environ.get("UBDSRV_PROFILE")
_prof = None


def _comm():
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip().replace("/", "_") or "python"
    except OSError:
        return "python"


def _start():
    global _prof
    import cProfile
    if _prof is not None:
        _prof.disable()   # the parent's profiler, copied by fork
    if os.environ.get("UBDSRV_PROFILE_CLOCK", "cpu") == "wall":
        _prof = cProfile.Profile()
    else:
        import time
        _prof = cProfile.Profile(time.process_time)
    _prof.enable()


def _dump():
    global _prof
    p, _prof = _prof, None
    if p is None:
        return
    try:
        p.disable()
        p.dump_stats(f"{_PATH}.{_comm()}.{os.getpid()}")
    except Exception:
        pass


if _PATH:
    _real_exit = os._exit

    def _exit(code):
        _dump()
        _real_exit(code)

    os._exit = _exit
    os.register_at_fork(after_in_child=_start)
    atexit.register(_dump)
    _start()
