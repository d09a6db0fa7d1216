"""Housekeeping of the image cache: which entries no current recipe uses, and removing them.

Kept out of image.py on purpose: image.py is part of the recipe hash, and editing housekeeping code
should not make every cached image stale."""
import fcntl
import shutil

from . import flavours
from .image import _entry_dir
from .paths import cache_dir


def stale_entries() -> list:
    """Cache entries no current recipe points at: images of an older recipe, unknown flavours, and
    build directories a killed build left behind."""
    images = cache_dir() / "images"
    if not images.is_dir():
        return []
    current = {_entry_dir(f, profile).name for f in flavours.load_all().values()
               for profile in (False, True)}
    return sorted(p for p in images.iterdir() if p.is_dir() and p.name not in current)


def prune(log) -> int:
    """Removes stale_entries(), under the build lock (a build in progress is not stale); returns
    the bytes freed."""
    images = cache_dir() / "images"
    images.mkdir(parents=True, exist_ok=True)
    freed = 0
    with open(images / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for d in stale_entries():
            size = sum(f.stat().st_blocks * 512 for f in d.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(d)
            freed += size
            log(f"removed {d} ({size / 2**20:.0f} MiB)")
    return freed
