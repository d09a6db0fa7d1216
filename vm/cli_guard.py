"""What every host command does around its work: SIGTERM and SIGHUP unwind like Ctrl-C (so each
QEMU is stopped on the way out), and a BenchError becomes one line and its exit status."""
import signal
import sys


def raise_interrupt(signum, frame):
    """A signal handler that unwinds like Ctrl-C."""
    raise KeyboardInterrupt(f"signal {signum}")


def guarded(body, prefix="") -> int:
    from .errors import BenchError

    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGHUP, raise_interrupt)
    try:
        return body()
    except BenchError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        return e.exit_status
    except KeyboardInterrupt:
        print(f"{prefix}interrupted; guest stopped", file=sys.stderr, flush=True)
        return 130
