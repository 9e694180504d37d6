"""GLUE TSV loading (a few dev rows of each task in tests/data/glue) and the task metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from secformer_compiler import glue

DATA = Path(__file__).resolve().parents[1] / "data" / "glue"


@pytest.mark.parametrize("task,rows,first_label", [
    ("SST-2", 12, 1), ("MRPC", 12, 1), ("RTE", 12, 1), ("STS-B", 12, 5.0), ("CoLA", 13, 1), ("QNLI", 13, 0),
])
def test_every_task_loads(task, rows, first_label):
    ex = glue.load_split(DATA, task)
    assert len(ex) == rows
    assert ex[0].label == first_label
    spec = glue.task_spec(task)
    assert (ex[0].text_b is None) == (spec.text_b is None)
    assert all(e.text_a and (spec.text_b is None or e.text_b) for e in ex)


def test_format_quirks():
    mrpc = glue.load_split(DATA, "mrpc")  # BOM in the header; aliases
    assert mrpc[0].text_a.startswith("He said the foodservice pie")
    assert mrpc[0].text_b.startswith('" The foodservice')  # quotes are literal text
    cola = glue.load_split(DATA, "CoLA")  # no header, no final newline
    assert cola[0].text_a == "The sailors rode the breeze clear of the rocks."
    assert cola[-1].text_a and isinstance(cola[-1].label, int)
    qnli = glue.load_split(DATA, "QNLI")  # a sentence that starts with a stray quote
    assert qnli[-1].text_b.startswith('" This term describes')
    assert {e.label for e in glue.load_split(DATA, "RTE")} == {0, 1}  # entailment = 0
    assert glue.load_split(DATA, "STS-B")[3].label == pytest.approx(2.4)
    with pytest.raises(KeyError, match="unknown GLUE task"):
        glue.task_spec("MNLI")
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        glue.load_split(DATA, "SST-2", "train")


def test_bad_rows_name_the_line(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\ngood\t1\nno label column\n")
    with pytest.raises(ValueError, match=r"dev.tsv:3"):
        glue.load_split(tmp_path, "SST-2")


def test_metrics_by_hand():
    pred, gold = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert glue.accuracy(pred, gold) == pytest.approx(0.6)
    assert glue.f1(pred, gold) == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1
    # tp 2, tn 1, fp 1, fn 1: (2 - 1) / sqrt(3 * 3 * 2 * 2)
    assert glue.matthews(pred, gold) == pytest.approx(1 / 6)
    assert glue.matthews([1, 1], [1, 0]) == 0.0  # empty marginal
    assert glue.f1([0, 0], [1, 0]) == 0.0
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5]
    assert glue.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert glue.spearman(x, [10, 20, 30, 40]) == pytest.approx(1.0)
    # ties get average ranks: ranks [1.5, 1.5, 3] vs [1, 2, 3]
    assert glue.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])


def test_metrics_agree_with_scipy_and_sklearn():
    stats = pytest.importorskip("scipy.stats")
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    p, g = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert glue.f1(p, g) == pytest.approx(skm.f1_score(g, p))
    assert glue.matthews(p, g) == pytest.approx(skm.matthews_corrcoef(g, p))
    a, b = rng.normal(size=100).round(1), rng.normal(size=100).round(1)  # rounding makes ties
    assert glue.pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0])
    assert glue.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])


def test_compute_metrics_and_predictions():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    pred = glue.predictions("SST-2", logits)
    assert pred.tolist() == [1, 0, 1]
    m = glue.compute_metrics("MRPC", pred, [1, 0, 0])
    assert list(m) == ["f1", "accuracy"] and m["accuracy"] == pytest.approx(200 / 3)
    reg = glue.predictions("STS-B", np.array([[4.5], [1.0], [3.0]]))
    m = glue.compute_metrics("STS-B", reg, [5.0, 0.5, 2.0])
    assert m["pearson"] > 90 and math.isclose(m["spearman"], 100.0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_correlations_refuse_non_finite_predictions(bad):
    """A diverged approximation's NaN must not turn into a silent 0.00 score."""
    with pytest.raises(ValueError, match="inf or NaN"):
        glue.pearson([1.0, bad, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="inf or NaN"):
        glue.spearman([1.0, bad, 3.0], [1.0, 2.0, 3.0])


def test_non_finite_rows_are_scored_as_zero_and_counted():
    from secformer_compiler.distill import _zero_nonfinite

    logits = np.array([[0.5, 1.0], [np.nan, 2.0], [np.inf, -np.inf], [3.0, 1.0]])
    assert _zero_nonfinite(logits) == 2
    assert np.array_equal(logits, [[0.5, 1.0], [0.0, 0.0], [0.0, 0.0], [3.0, 1.0]])
    assert _zero_nonfinite(logits) == 0
