"""One table from several runs: a row per case, a column per kernel. Used by `run-matrix` (one run
per flavour) and by `merge` (the nightly workflow's shards, each a result.json of its own)."""
import json
from pathlib import Path

from ..errors import BenchError
from .errors import PASSED


def kernel_label(meta: dict) -> str:
    """What a column is called: the flavour or tree, then the release the guest ran."""
    k = meta.get("kernel") or {}
    source = k.get("tree_describe") or meta.get("kernel_tree") or meta.get("flavour") or "?"
    label = f"{source} {k.get('release', '')}".strip()
    return label + (" debug" if k.get("debug") else "")


def load(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "result.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise BenchError(f"{path}: no such result file") from None
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: not a result.json ({e})") from None
    if not isinstance(doc.get("cases"), list):
        raise BenchError(f"{path}: not a result.json (no `cases` list)")
    doc["_path"] = str(path)
    return doc


def cell(case: dict) -> str:
    return case.get("verdict") or ("PASS" if case.get("kind") == PASSED else case.get("kind", "?").upper())


def table(runs: list) -> str:
    """runs: result.json documents. Cases of runs with the same kernel share a column (shards)."""
    columns, grid = [], {}
    for doc in runs:
        col = kernel_label(doc)
        if col not in columns:
            columns.append(col)
        for c in doc["cases"]:
            grid[(c["id"], col)] = cell(c)
    rows = sorted({case_id for case_id, _ in grid})
    width = max([len(r) for r in rows] + [4])
    widths = [max(len(c), 18) for c in columns]
    out = ["  ".join([f"{'case':<{width}}"] + [f"{c:<{w}}" for c, w in zip(columns, widths)]),
           "  ".join(["-" * width] + ["-" * w for w in widths])]
    for r in rows:
        out.append("  ".join([f"{r:<{width}}"] +
                             [f"{grid.get((r, c), '-'):<{w}}" for c, w in zip(columns, widths)]))
    return "\n".join(out)


def exit_status(runs: list) -> int:
    return max((int(doc.get("exit_status", 0)) for doc in runs), default=0)


def merge(paths, out_dir: Path) -> int:
    """Reads the runs' result.json files, writes one result.json and table.txt to out_dir, prints the
    table; returns the worst exit status of the runs."""
    runs = [load(p) for p in paths]
    if not runs:
        raise BenchError("merge: no result files given")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    (out_dir / "table.txt").write_text(text + "\n")
    merged = {"merged_from": [d["_path"] for d in runs], "exit_status": exit_status(runs),
              "cases": [dict(c, kernel=kernel_label(d), run=d["_path"]) for d in runs for c in d["cases"]]}
    (out_dir / "result.json").write_text(json.dumps(merged, indent=2) + "\n")
    print(text)
    return merged["exit_status"]


def main(argv=None) -> int:
    """`just merge RESULT.json|DIR... [--results DIR]`: needs no guest and nothing beyond python3."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="just merge", description="one scenario x kernel table from runs")
    p.add_argument("runs", nargs="+", metavar="RESULT", help="result.json files or run folders")
    p.add_argument("--results", default="results/merged", metavar="DIR", help="where the merge goes")
    a = p.parse_args(argv)
    try:
        return merge(a.runs, Path(a.results))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    raise SystemExit(main())
