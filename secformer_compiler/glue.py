"""GLUE tasks: TSV loading (the GLUE distribution's layout) and the task metrics.

Files are `<data_dir>/<TASK>/{train,dev}.tsv` as GLUE's download script writes them. They are
split on tabs with no CSV quoting (double quotes are literal text in these files); MRPC's
header starts with a UTF-8 BOM; CoLA has no header. Columns per task (0-based):

| task  | header | text a       | text b       | label                     | metric (first = main)    |
| SST-2 | yes    | 0 sentence   | -            | 1 (0/1)                   | accuracy                 |
| MRPC  | yes    | 3 #1 String  | 4 #2 String  | 0 Quality (0/1)           | f1, accuracy             |
| RTE   | yes    | 1 sentence1  | 2 sentence2  | 3 entailment/not_ent.     | accuracy                 |
| STS-B | yes    | 7 sentence1  | 8 sentence2  | 9 score in [0, 5] (float) | pearson, spearman        |
| CoLA  | no     | 3 sentence   | -            | 1 (0/1)                   | matthews, accuracy       |
| QNLI  | yes    | 1 question   | 2 sentence   | 3 entailment/not_ent.     | accuracy                 |

Metrics are plain NumPy (GLUE's definitions: binary F1 of the positive class 1, Pearson r,
Spearman rho with average ranks for ties, Matthews correlation), scaled to [0, 100] in
`compute_metrics` the way GLUE tables report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """Columns and metric of one GLUE task (see the module docstring's table)."""

    name: str
    header: bool
    text_a: int
    text_b: int | None
    label: int
    labels: tuple[str, ...] | None  # class names in label-id order; None: regression
    metrics: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def metric(self) -> str:
        """The main metric."""
        return self.metrics[0]


TASKS: dict[str, TaskSpec] = {
    "SST-2": TaskSpec("SST-2", True, 0, None, 1, ("0", "1"), ("accuracy",)),
    "MRPC": TaskSpec("MRPC", True, 3, 4, 0, ("0", "1"), ("f1", "accuracy")),
    "RTE": TaskSpec("RTE", True, 1, 2, 3, ("entailment", "not_entailment"), ("accuracy",)),
    "STS-B": TaskSpec("STS-B", True, 7, 8, 9, None, ("pearson", "spearman")),
    "CoLA": TaskSpec("CoLA", False, 3, None, 1, ("0", "1"), ("matthews", "accuracy")),
    "QNLI": TaskSpec("QNLI", True, 1, 2, 3, ("entailment", "not_entailment"), ("accuracy",)),
}
ALIASES = {k.lower().replace("-", ""): k for k in TASKS}


def task_spec(task: str) -> TaskSpec:
    """The spec of `task` ("SST-2", "sst2", "sts-b", ...)."""
    key = ALIASES.get(task.lower().replace("-", "").replace("_", ""))
    if key is None:
        raise KeyError(f"unknown GLUE task {task!r}; tasks: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float | int


def read_tsv(path: str | Path, task: str) -> list[Example]:
    """Examples of one GLUE TSV file (split on tabs, no quoting, BOM and missing final newline
    tolerated). Rows with too few columns raise ValueError naming the line."""
    spec = task_spec(task)
    text = Path(path).read_text(encoding="utf-8-sig")
    lines = text.split("\n")
    if spec.header:
        lines = lines[1:]
    need = max(c for c in (spec.text_a, spec.text_b, spec.label) if c is not None) + 1
    out = []
    for i, line in enumerate(lines, start=2 if spec.header else 1):
        line = line.rstrip("\r")
        if not line:
            continue
        cols = line.split("\t")
        if len(cols) < need:
            raise ValueError(f"{path}:{i}: {len(cols)} columns, {spec.name} needs {need}")
        raw = cols[spec.label].strip()
        if spec.labels is None:
            label: float | int = float(raw)
        else:
            if raw not in spec.labels:
                raise ValueError(f"{path}:{i}: label {raw!r} not in {spec.labels}")
            label = spec.labels.index(raw)
        out.append(Example(cols[spec.text_a], None if spec.text_b is None else cols[spec.text_b], label))
    return out


def load_split(data_dir: str | Path, task: str, split: str = "dev") -> list[Example]:
    """`<data_dir>/<TASK>/<split>.tsv`."""
    spec = task_spec(task)
    path = Path(data_dir) / spec.name / f"{split}.tsv"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (GLUE layout: <data_dir>/{spec.name}/{split}.tsv)")
    return read_tsv(path, spec.name)


# -- metrics -----------------------------------------------------------------------------------

def accuracy(pred: Sequence, gold: Sequence) -> float:
    p, g = np.asarray(pred), np.asarray(gold)
    return float((p == g).mean()) if len(g) else float("nan")


def f1(pred: Sequence, gold: Sequence, positive: int = 1) -> float:
    """Binary F1 of class `positive` (0 when there are no true positives)."""
    p, g = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float((p & g).sum())
    if tp == 0:
        return 0.0
    precision, recall = tp / p.sum(), tp / g.sum()
    return float(2 * precision * recall / (precision + recall))


def _finite(name: str, x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 arrays; inf/NaN is refused (ranks or a mean of NaN would hide it)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"{name}: the predictions contain inf or NaN (score them first: "
                         "distill.evaluate sets such rows to 0 and counts them)")
    return a, b


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = _finite("pearson", x, y)
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def _ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank."""
    order = np.argsort(v, kind="mergesort")
    sv = v[order]
    ranks = np.empty(len(v), dtype=np.float64)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = _finite("spearman", x, y)
    return pearson(_ranks(a), _ranks(b))


def matthews(pred: Sequence, gold: Sequence) -> float:
    """Matthews correlation of binary predictions (0 when a marginal is empty)."""
    p, g = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp, tn = float((p & g).sum()), float((~p & ~g).sum())
    fp, fn = float((p & ~g).sum()), float((~p & g).sum())
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / den) if den > 0 else 0.0


METRICS = {"accuracy": accuracy, "f1": f1, "pearson": pearson, "spearman": spearman, "matthews": matthews}


def predictions(task: str, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) for classification, the score for regression (STS-B)."""
    logits = np.asarray(logits)
    if task_spec(task).is_regression:
        return logits.reshape(len(logits), -1)[:, 0]
    return logits.argmax(-1)


def compute_metrics(task: str, pred: Sequence, gold: Sequence) -> dict[str, float]:
    """Every metric of the task, in percent (GLUE tables), main metric first."""
    spec = task_spec(task)
    return {m: 100.0 * METRICS[m](pred, gold) for m in spec.metrics}


__all__ = [
    "Example", "TASKS", "TaskSpec", "accuracy", "compute_metrics", "f1", "load_split", "matthews",
    "pearson", "predictions", "read_tsv", "spearman", "task_spec",
]
