"""The Linux source of a Debian kernel: the `linux-source-X.Y` package, fetched from the bench's
Debian mirror and unpacked into the cache as src/linux-source-X.Y/ (the whole tree, read only).

The chain of trust is apt's: the suite's InRelease is checked with gpgv against the host's Debian
archive keyring, it gives the SHA-256 of the Packages index, and the index gives the .deb's."""
import fcntl
import functools
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError
from .mirror import debian_mirror
from .paths import cache_dir

ARCH = "amd64"   # the guest's architecture; arch-all packages are listed in its index too
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
FETCH_TIMEOUT = 120


@dataclass(frozen=True)
class SourcePackage:
    name: str        # linux-source-7.3
    version: str     # 7.3.4-1~bpo13+1
    suite: str
    filename: str    # pool/main/l/linux/linux-source-7.3_7.3.4-1~bpo13+1_all.deb
    sha256: str
    size: int

    @property
    def series(self) -> str:       # 7.3
        return self.name[len("linux-source-"):]

    @property
    def upstream(self) -> str:     # 7.3.4
        return upstream_of(self.version)


def src_dir() -> Path:
    return cache_dir() / "src"


def upstream_of(version: str) -> str:
    """The upstream kernel version of a Debian version or kernel release: 7.3.4-1~bpo13+1 and
    7.3.4+deb13-cloud-amd64 both give 7.3.4."""
    m = re.match(r"(\d+\.\d+(?:\.\d+)?)", version)
    if not m:
        raise SetupError(f"cannot read a kernel version out of {version!r}")
    return m.group(1)


def package_for(kernel_release: str) -> str:
    """linux-source-X.Y for a Debian kernel release such as 6.12.117+deb13-cloud-amd64."""
    return "linux-source-" + ".".join(upstream_of(kernel_release).split(".")[:2])


def version_key(version: str):
    """Orders Debian kernel versions: by upstream numbers, then the Debian revision's numbers."""
    up = upstream_of(version)
    rest = version[len(up):]
    return tuple(int(x) for x in up.split(".")), tuple(int(x) for x in re.findall(r"\d+", rest))


# --- the archive's indexes ----------------------------------------------------------------------
def parse_stanzas(text: str) -> list:
    """deb822 paragraphs (a Packages index, a Release file) as dicts; continuation lines appended."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            out.append(fields)
    return out


def source_packages(stanzas, suite: str) -> list:
    """Every linux-source-X.Y (not the unversioned metapackage) an index lists."""
    return [SourcePackage(name=s["Package"], version=s["Version"], suite=suite,
                          filename=s["Filename"], sha256=s["SHA256"], size=int(s["Size"]))
            for s in stanzas if re.fullmatch(r"linux-source-\d+\.\d+", s.get("Package", ""))]


def pick(candidates, name: str, upstream: str = None) -> SourcePackage:
    """The package called name whose upstream version is upstream (newest Debian revision first);
    without upstream, the newest of that name."""
    same = [p for p in candidates if p.name == name]
    if upstream:
        same = [p for p in same if p.upstream == upstream]
    if not same:
        raise LookupError(name + (f" {upstream}" if upstream else ""))
    return max(same, key=lambda p: version_key(p.version))


def newest(candidates) -> SourcePackage:
    if not candidates:
        raise LookupError("linux-source-*")
    return max(candidates, key=lambda p: version_key(p.version))


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as r:
            return r.read()
    except (urllib.error.URLError, OSError) as e:
        raise SetupError(f"cannot fetch {url}: {e}") from None


def _verified_release(mirror: str, suite: str) -> str:
    """The suite's InRelease text after gpgv accepted its signature."""
    signed = _get(f"{mirror}/dists/{suite}/InRelease")
    with tempfile.NamedTemporaryFile(suffix=".InRelease") as f:
        f.write(signed)
        f.flush()
        r = subprocess.run(["gpgv", "--keyring", str(KEYRING), "--output", "-", f.name],
                           capture_output=True)
    if r.returncode != 0:
        raise SetupError(f"{mirror}/dists/{suite}/InRelease: signature not accepted by {KEYRING}:\n"
                         + r.stderr.decode(errors="replace").strip())
    return r.stdout.decode(errors="replace")


@functools.lru_cache(maxsize=None)   # once per suite and command
def index(mirror: str, suite: str) -> list:
    """The linux-source-X.Y packages one suite's main/binary-ARCH index lists, verified."""
    rel_path = f"main/binary-{ARCH}/Packages.xz"
    release = _verified_release(mirror, suite)
    sums = parse_stanzas(release)[0].get("SHA256", "")
    want = next((line.split()[0] for line in sums.splitlines() if line.split()[-1:] == [rel_path]),
                None)
    if want is None:
        raise SetupError(f"{mirror}/dists/{suite}/InRelease lists no {rel_path}")
    data = _get(f"{mirror}/dists/{suite}/{rel_path}")
    if hashlib.sha256(data).hexdigest() != want:
        raise SetupError(f"{mirror}/dists/{suite}/{rel_path}: SHA-256 does not match InRelease")
    return source_packages(parse_stanzas(lzma.decompress(data).decode(errors="replace")), suite)


def find(suites, name: str, upstream: str = None, mirror: str = None) -> SourcePackage:
    """linux-source package `name` (at `upstream` if given) from the first suite that has it."""
    mirror = mirror or debian_mirror()
    cands = [p for s in suites for p in index(mirror, s)]
    try:
        return pick(cands, name, upstream)
    except LookupError:
        have = sorted({f"{p.name} {p.version}" for p in cands if p.name == name}) or ["none"]
        raise SetupError(f"{name} {upstream or ''} is not in {mirror} suites {', '.join(suites)} "
                         f"(found: {', '.join(have)})") from None


def newest_in(suites, mirror: str = None) -> SourcePackage:
    mirror = mirror or debian_mirror()
    try:
        return newest([p for s in suites for p in index(mirror, s)])
    except LookupError:
        raise SetupError(f"no linux-source-X.Y package in {mirror} suites {', '.join(suites)}") from None


# --- the unpacked tree --------------------------------------------------------------------------
def tree_version(tree: Path) -> str:
    """VERSION.PATCHLEVEL.SUBLEVEL from a tree's top Makefile, '' when unreadable."""
    try:
        head = (Path(tree) / "Makefile").read_text(errors="replace")[:2000]
    except OSError:
        return ""
    v = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL)\s*=\s*(\d+)", head, re.M))
    if "VERSION" not in v or "PATCHLEVEL" not in v:
        return ""
    return ".".join([v["VERSION"], v["PATCHLEVEL"]] + ([v["SUBLEVEL"]] if v.get("SUBLEVEL", "0") != "0"
                                                       else []))


def tree_path(series: str) -> Path:
    return src_dir() / f"linux-source-{series}"


def cached(series: str, upstream: str):
    """The unpacked tree of that version if the cache already holds it (a helper may have unpacked
    it by hand: the path and the Makefile's version are what count)."""
    t = tree_path(series)
    return t if tree_version(t) == upstream else None


def ensure(pkg: SourcePackage, log, mirror: str = None) -> Path:
    """Unpacks the package's tree into the cache (once; atomically under a lock) and returns it."""
    final = tree_path(pkg.series)
    if tree_version(final) == pkg.upstream:
        return final
    src_dir().mkdir(parents=True, exist_ok=True)
    with open(src_dir() / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tree_version(final) == pkg.upstream:
            return final
        _unpack(pkg, final, mirror or debian_mirror(), log)
    return final


def _unpack(pkg: SourcePackage, final: Path, mirror: str, log):
    work = src_dir() / f".unpack-{final.name}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        deb = work / Path(pkg.filename).name
        log(f"  source: fetching {pkg.name} {pkg.version} ({pkg.size >> 20} MiB) from {mirror}")
        h = hashlib.sha256()
        try:
            with urllib.request.urlopen(f"{mirror}/{pkg.filename}", timeout=FETCH_TIMEOUT) as r, \
                    open(deb, "wb") as f:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as e:
            raise SetupError(f"cannot fetch {mirror}/{pkg.filename}: {e}") from None
        if h.hexdigest() != pkg.sha256:
            raise SetupError(f"{mirror}/{pkg.filename}: SHA-256 does not match the Packages index")
        log(f"  source: unpacking {pkg.name} (about a minute)")
        inner = f"./usr/src/{pkg.name}.tar.xz"
        tree = work / "tree"
        tree.mkdir()
        # dpkg-deb gives the data tarball; the source tarball inside it unpacks into linux-source-X.Y/
        cmd = (f"dpkg-deb --fsys-tarfile {_q(deb)} | tar -xO {_q(inner)} | "
               f"tar -xJ --no-same-owner -C {_q(tree)} --strip-components=1")
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True)
        if r.returncode != 0 or tree_version(tree) != pkg.upstream:
            raise SetupError(f"unpacking {deb.name} failed (exit {r.returncode}): "
                             f"{r.stderr.strip()[-1500:] or 'unexpected tree version ' + tree_version(tree)}")
        if final.exists():   # an older revision of the same series: replaced as a whole
            old = work / "old"
            os.rename(final, old)
        os.rename(tree, final)
        log(f"  source: {final} ({pkg.upstream})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _q(p) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"
