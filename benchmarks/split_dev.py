"""Make a train/held-out pair from a GLUE task's dev.tsv, for a task whose train split is missing.

The GLUE data this project is given has no QNLI train.tsv (only its 5,463-row dev.tsv), so
the QNLI teacher cannot be fine-tuned the GLUE way. This script writes

    <out>/<TASK>/dev.tsv    the header and dev rows 1..holdout (the evaluation rows)
    <out>/<TASK>/train.tsv  the header and dev rows holdout+1..end (the training rows)

copying lines byte for byte (the GLUE loaders split on tabs; nothing is re-encoded), so
`benchmarks/accuracy.py --data-dir <out> --tasks QNLI ...` trains and evaluates on disjoint
rows. This is NOT the GLUE protocol (the dev set is split, the teacher sees 4,463 rows
instead of 105k): ACCURACY.md says so beside every such row.

    python benchmarks/split_dev.py --data-dir ../shared/data/glue --task QNLI --holdout 1000 \
        --out benchmarks/data/glue-qnli-split
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def split_dev(data_dir: Path, task: str, holdout: int, out: Path) -> dict:
    """Write the pair (see the module docstring); returns a provenance record."""
    src = data_dir / task / "dev.tsv"
    if not src.is_file():
        raise SystemExit(f"error: {src} not found (GLUE layout: <data-dir>/{task}/dev.tsv)")
    data = src.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    header, rows = lines[0], lines[1:]
    if not 0 < holdout < len(rows):
        raise SystemExit(f"error: --holdout must be between 1 and {len(rows) - 1} (dev has {len(rows)} rows)")
    dest = out / task
    dest.mkdir(parents=True, exist_ok=True)
    parts = {"dev.tsv": rows[:holdout], "train.tsv": rows[holdout:]}
    for name, part in parts.items():
        tmp = dest / (name + ".tmp")
        tmp.write_bytes(b"\n".join([header, *part]) + b"\n")
        tmp.replace(dest / name)  # never a half-written split
    record = {"task": task, "source": str(src), "source_sha256": hashlib.sha256(data).hexdigest(),
              "holdout": holdout, "dev_rows": f"1..{holdout}", "train_rows": f"{holdout + 1}..{len(rows)}",
              "n_dev": holdout, "n_train": len(rows) - holdout}
    (dest / "SPLIT.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True, help="GLUE folder: <dir>/<TASK>/dev.tsv")
    ap.add_argument("--task", default="QNLI")
    ap.add_argument("--holdout", type=int, default=1000, help="first dev rows kept for evaluation")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    print(json.dumps(split_dev(args.data_dir, args.task, args.holdout, args.out), indent=1))


if __name__ == "__main__":
    main()
