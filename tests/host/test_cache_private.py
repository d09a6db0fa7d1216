"""The image cache holds the guests' SSH keys: it is private to its owner whatever the umask."""
import os
import stat

from vm import paths


def test_cache_folder_is_created_and_kept_0700(tmp_path, monkeypatch):
    monkeypatch.setenv("UBD_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        d = paths.cache_dir()
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o755)                        # a cache made before this rule, or by hand
    assert stat.S_IMODE(paths.cache_dir().stat().st_mode) == 0o700
