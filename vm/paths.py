"""Where the bench keeps things on the host."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_DIR = REPO / "kernel"
UBDSRV_DIR = REPO / "ubdsrv"
GUESTFS_DIR = Path(__file__).resolve().parent / "guestfs"


def cache_dir() -> Path:
    """Image cache; UBD_CACHE overrides the default under ~/.cache."""
    override = os.environ.get("UBD_CACHE")
    base = Path(override) if override else Path.home() / ".cache" / "ubd-bench"
    # private: the images hold the guests' SSH host and client keys
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    if base.stat().st_mode & 0o077 and base.stat().st_uid == os.getuid():
        base.chmod(0o700)
    return base


def results_dir() -> Path:
    return Path(os.environ.get("UBD_RESULTS", REPO / "results"))
