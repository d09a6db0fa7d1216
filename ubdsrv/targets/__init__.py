"""Target registry: adding a target is one module plus one line here."""
from .base import QUEUED, TGT_IO, Target, TargetError
from .fault import FaultTarget
from .loop import LoopTarget
from .mem import MemTarget
from .null import NullTarget

TARGETS = {t.name: t for t in (NullTarget, LoopTarget, FaultTarget, MemTarget)}


def get(name):
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"-t {name}: unknown target (known: {', '.join(sorted(TARGETS))})") from None


def from_spec(spec):
    return get(spec["name"])(spec)


__all__ = ["QUEUED", "TGT_IO", "TARGETS", "Target", "TargetError", "get", "from_spec"]
