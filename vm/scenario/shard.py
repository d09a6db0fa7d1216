"""`--shard I/N`: a deterministic share of the cases, so CI runners split a suite without talking.

A case belongs to shard (hash(case id) mod N) + 1: adding or removing a scenario moves no other case
to another shard, which list positions would."""
import hashlib

from ..errors import BenchError


def parse(text: str) -> tuple:
    """"2/4" -> (2, 4); BenchError (exit 2) naming the expected form otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BenchError(f"--shard {text}: expected I/N, e.g. 1/2") from None
    if not 1 <= i <= n:
        raise BenchError(f"--shard {text}: I must be between 1 and N")
    return i, n


def shard_of(case_id: str, n: int) -> int:
    digest = hashlib.sha256(case_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select(cases, shard) -> list:
    """The cases of shard (I, N); every case when shard is None."""
    if shard is None:
        return list(cases)
    i, n = shard
    return [c for c in cases if shard_of(c.id, n) == i]


def deselect(config, items) -> None:
    """pytest_collection_modifyitems: keeps the items of --shard I/N (a scenario by its case id, as
    `run-all --shard` does; any other test by its node id). Idempotent: both conftests call it."""
    picked = config.getoption("shard", None)
    if not picked:
        return
    i, n = picked
    keep, drop = [], []
    for item in items:
        key = getattr(getattr(item, "case", None), "id", None) or item.nodeid
        (keep if shard_of(key, n) == i else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
