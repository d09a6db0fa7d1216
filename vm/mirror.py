"""The Debian mirror to build guests from: the host's own apt configuration, or UBD_DEBIAN_MIRROR."""
import os
import re
from pathlib import Path

from .errors import SetupError

ENV = "UBD_DEBIAN_MIRROR"
APT_DIRS = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))


def _source_files():
    for p in APT_DIRS:
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from sorted(q for q in p.iterdir() if q.suffix in (".list", ".sources"))


def _candidates(path: Path):
    """(uri, suites) pairs of the plain Debian archive entries in one apt source file."""
    text = path.read_text(errors="replace")
    if path.suffix == ".sources":  # deb822 stanzas
        for stanza in re.split(r"\n\s*\n", text):
            fields = {}
            for line in stanza.splitlines():
                m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
                if m:
                    fields[m.group(1).lower()] = m.group(2).split()
            if "deb" in fields.get("types", []) and fields.get("uris"):
                for uri in fields["uris"]:
                    yield uri, fields.get("suites", [])
    else:
        for line in text.splitlines():
            m = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m:
                yield m.group(1), [m.group(2)]


def debian_mirror() -> str:
    override = os.environ.get(ENV)
    if override:
        return override.rstrip("/")
    for path in _source_files():
        for uri, suites in _candidates(path):
            # The main archive carries the release suites themselves (not -security, not third parties).
            if any(re.fullmatch(r"[a-z]+(-updates|-backports)?", s) for s in suites) and "debian" in uri:
                if "security" not in uri:
                    return uri.rstrip("/")
    raise SetupError(
        "no Debian mirror found in the host's apt configuration (/etc/apt/sources.list*); "
        f"set {ENV}=<mirror URL> to name one")
