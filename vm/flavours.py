"""Kernel flavours from kernel/flavours.toml."""
import tomllib
from dataclasses import dataclass, field

from .errors import BenchError
from .paths import KERNEL_DIR

FLAVOURS_FILE = KERNEL_DIR / "flavours.toml"
DEFAULT = "cloud"


@dataclass(frozen=True)
class Flavour:
    name: str
    description: str
    suite: str
    kernel_package: str
    extra_suites: tuple = field(default=())


def load_all() -> dict:
    with open(FLAVOURS_FILE, "rb") as f:
        raw = tomllib.load(f)
    out = {}
    for name, entry in raw.items():
        out[name] = Flavour(name=name, description=entry["description"], suite=entry["suite"],
                            kernel_package=entry["kernel_package"],
                            extra_suites=tuple(entry.get("extra_suites", ())))
    return out


def get(name: str) -> Flavour:
    flavours = load_all()
    if name not in flavours:
        known = ", ".join(sorted(flavours))
        raise BenchError(f"unknown kernel flavour {name!r} (known: {known}; defined in {FLAVOURS_FILE})")
    return flavours[name]


if __name__ == "__main__":   # `python3 -m vm.flavours`: the names, as JSON (the nightly workflow's matrix)
    import json
    print(json.dumps(sorted(load_all())))
