"""benchmarks/split_dev.py: a dev.tsv split into disjoint train / held-out files, byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from secformer_compiler import glue

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "glue"


def test_split_is_disjoint_and_byte_exact(tmp_path, bench):
    rec = bench("split_dev").split_dev(DATA, "QNLI", 4, tmp_path)
    src = (DATA / "QNLI" / "dev.tsv").read_bytes().rstrip(b"\n").split(b"\n")
    dev = (tmp_path / "QNLI" / "dev.tsv").read_bytes().rstrip(b"\n").split(b"\n")
    train = (tmp_path / "QNLI" / "train.tsv").read_bytes().rstrip(b"\n").split(b"\n")
    assert dev[0] == train[0] == src[0]  # both keep the header
    assert dev[1:] == src[1:5] and train[1:] == src[5:]  # disjoint, in order, nothing lost
    assert rec["n_dev"] == 4 and rec["n_train"] == len(src) - 5
    # the GLUE reader reads both as QNLI
    assert len(glue.load_split(tmp_path, "QNLI", "dev")) == 4
    assert len(glue.load_split(tmp_path, "QNLI", "train")) == len(src) - 5
    assert not list((tmp_path / "QNLI").glob("*.tmp"))


@pytest.mark.parametrize("holdout", [0, 13, 100])
def test_bad_holdout_is_refused(tmp_path, holdout, bench):
    with pytest.raises(SystemExit, match="--holdout must be between 1 and 12"):
        bench("split_dev").split_dev(DATA, "QNLI", holdout, tmp_path)
    assert not (tmp_path / "QNLI" / "train.tsv").exists()


def test_missing_dev_is_named(tmp_path, bench):
    with pytest.raises(SystemExit, match="not found"):
        bench("split_dev").split_dev(tmp_path, "QNLI", 4, tmp_path / "out")
