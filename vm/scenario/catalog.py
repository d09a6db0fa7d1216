"""Finding scenarios by the names users type, and listing the shipped ones."""
import difflib
import tomllib
from pathlib import Path

from ..paths import REPO
from .errors import ScenarioError

SCENARIOS_DIR = REPO / "scenarios"
# `just run scenario/kill_daemon` is what the issue promises; the directory is `scenarios/`.
PREFIXES = ("scenario/", "scenarios/", "./scenarios/")


def shipped() -> list:
    return sorted(SCENARIOS_DIR.glob("*.toml"))


def resolve(name: str):
    """(path, variant filter or None). Accepts kill_daemon, scenario/kill_daemon,
    scenarios/kill_daemon.toml, any path to a .toml file, and a trailing [variant] selector."""
    variant = None
    if name.endswith("]") and "[" in name:
        name, variant = name[:-1].split("[", 1)
    as_path = Path(name)
    if name.endswith(".toml") and as_path.is_file():
        return as_path.resolve(), variant
    stem = name
    for p in PREFIXES:
        if stem.startswith(p):
            stem = stem[len(p):]
            break
    stem = stem.removesuffix(".toml")
    path = SCENARIOS_DIR / f"{stem}.toml"
    if "/" in stem or not path.is_file():
        names = [p.stem for p in shipped()]
        close = difflib.get_close_matches(stem, names, n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ScenarioError(name, "", f"no such scenario{hint}; shipped: {', '.join(names)}")
    return path, variant


def describe(path: Path) -> str:
    """The description line, without validating the whole file (listing must not fail on one)."""
    try:
        return str(tomllib.loads(path.read_text()).get("description", "")).strip()
    except (OSError, tomllib.TOMLDecodeError) as e:
        return f"(unreadable: {e})"
