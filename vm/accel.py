"""Which accelerator QEMU can really use here. /dev/kvm existing proves nothing: only a real start does."""
import os
import subprocess
import tempfile
import time
from pathlib import Path

_probed = {}
PROBE_SECONDS = 4.0


def kvm_works(qemu: str, kernel: Path) -> bool:
    """Boots the guest kernel under KVM for a moment: it must start printing without QEMU dying."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    key = (qemu, str(kernel))
    if key not in _probed:
        _probed[key] = _probe(qemu, kernel)
    return _probed[key]


def _probe(qemu, kernel) -> bool:
    with tempfile.TemporaryDirectory(prefix="ubd-kvm-probe-") as tmp:
        console = Path(tmp) / "console"
        proc = subprocess.Popen(
            [qemu, "-accel", "kvm", "-cpu", "host", "-M", "pc", "-m", "256", "-nodefaults",
             "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kernel),
             "-append", "console=ttyS0 panic=-1 earlyprintk=ttyS0", "-serial", f"file:{console}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + PROBE_SECONDS
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False  # e.g. "failed to set MSR" aborts QEMU at once
                if console.exists() and b"Linux version" in console.read_bytes():
                    return True
                time.sleep(0.1)
            return False  # "KVM internal error" leaves QEMU alive but the guest stuck
        finally:
            proc.kill()
            proc.wait()
