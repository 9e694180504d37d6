"""`secformer finetune`, `distill` and `eval` on a tiny BERT and the SST-2 rows in tests/data
(in process, through typer's runner): the checkpoints they write load, eval reports the
GLUE metric in each mode, and bad input gets one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secformer_compiler.cli import app

from conftest import make_checkpoint

DATA = Path(__file__).resolve().parents[1] / "data" / "glue"
runner = CliRunner()


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    shutil.copy(DATA / "SST-2" / "dev.tsv", root / "SST-2" / "dev.tsv")
    shutil.copy(DATA / "SST-2" / "dev.tsv", root / "SST-2" / "train.tsv")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, glue_dir):
    root = tmp_path_factory.mktemp("acc")
    base = make_checkpoint(root / "base")
    common = ["--data-dir", str(glue_dir), "--max-len", "16"]
    r = runner.invoke(app, ["finetune", "SST-2", *common, "-o", str(root / "teacher"), "--train-subsample", "0",
                            "--batch-size", "4", "--lr", "1e-3", "--model-path", str(base)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["distill", str(root / "teacher"), "--task", "SST-2", *common, "-o", str(root / "student"),
                            "--train-subsample", "8", "--batch-size", "4", "--lr", "1e-3"])
    assert r.exit_code == 0, r.output
    return root


def test_finetune_and_distill_write_checkpoints(trained):
    t = json.loads((trained / "teacher" / "secformer.json").read_text())
    s = json.loads((trained / "student" / "secformer.json").read_text())
    assert t["kind"] == "teacher" and t["train_rows"] == 12
    assert s["kind"] == "student" and s["preset"] == "secformer" and s["teacher"] == str(trained / "teacher")


@pytest.mark.parametrize("mode", ["float", "simulate"])
def test_eval_reports_the_metric(trained, glue_dir, mode):
    r = runner.invoke(app, ["eval", str(trained / "student"), "--task", "sst2", "--data-dir", str(glue_dir),
                            "--mode", mode, "-n", "8", "--batch-size", "4", "--max-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout[r.stdout.index("{"):])
    assert rec["task"] == "SST-2" and rec["mode"] == mode and rec["n_examples"] == 8
    assert rec["metric"] == "accuracy" and 0 <= rec["value"] <= 100


@pytest.mark.parametrize("args,message", [
    (["eval", "{ck}", "--task", "XNLI", "--data-dir", "{glue}"], "unknown GLUE task 'XNLI'"),
    (["eval", "{ck}", "--task", "SST-2", "--data-dir", "{glue}/nowhere"], "no such folder"),
    (["eval", "{glue}", "--task", "SST-2", "--data-dir", "{glue}"], "not a checkpoint"),
    (["eval", "{ck}", "--task", "SST-2", "--data-dir", "{glue}", "--mode", "simulate", "--preset", "nope"],
     "unknown preset 'nope'"),
    (["distill", "{glue}", "--task", "SST-2", "--data-dir", "{glue}", "-o", "{glue}/s"], "not a checkpoint"),
])
def test_bad_input_gets_one_clear_error(trained, glue_dir, args, message):
    args = [a.format(ck=trained / "student", glue=glue_dir) for a in args]
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert message in r.output and "Traceback" not in r.output
    assert not (glue_dir / "s").exists()
