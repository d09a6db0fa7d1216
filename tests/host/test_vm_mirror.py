"""The Debian mirror comes from the host's apt configuration or the environment, never from the code."""
import pytest

from vm import mirror
from vm.errors import SetupError


def _apt(tmp_path, monkeypatch, files):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    monkeypatch.setattr(mirror, "APT_DIRS", (tmp_path / "sources.list", d))
    monkeypatch.delenv(mirror.ENV, raising=False)


def test_deb822_sources_skip_security_and_third_parties(tmp_path, monkeypatch):
    _apt(tmp_path, monkeypatch, {
        "a-vendor.sources": "Types: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\n",
        "debian.sources": "Types: deb\nURIs: http://mirror.example/debian-security\n"
                          "Suites: bookworm-security\n\n"
                          "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n",
    })
    assert mirror.debian_mirror() == "http://mirror.example/debian"


def test_one_line_format(tmp_path, monkeypatch):
    _apt(tmp_path, monkeypatch, {"x.list": "# comment\ndeb [arch=amd64] http://m.example/debian/ bookworm main\n"})
    assert mirror.debian_mirror() == "http://m.example/debian"


def test_environment_overrides(tmp_path, monkeypatch):
    _apt(tmp_path, monkeypatch, {})
    monkeypatch.setenv(mirror.ENV, "http://local.example/debian/")
    assert mirror.debian_mirror() == "http://local.example/debian"


def test_no_mirror_names_the_variable(tmp_path, monkeypatch):
    _apt(tmp_path, monkeypatch, {"x.list": "deb https://vendor.example/apt stable main\n"})
    with pytest.raises(SetupError, match=mirror.ENV):
        mirror.debian_mirror()
