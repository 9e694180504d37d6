"""Deferred truncations (secformer_compiler/deferral.py) in a real BERT, through 2PC.

The scores' matmul (with BERT's 1/sqrt(16) = 2^-2 scale folded in) and the linear layers
before each LayerNorm and GeLU leave their truncation to the consumer's first round, and
2Quad hands its unnormalized first round to the matmul by V, which normalizes after the
product, and a LayerNorm read only by linear layers and residual adds leaves its output
untruncated (raw) for them, or with fewer_rounds computes their products itself with its
row scaling moved after them: 2PC must still agree with the simulator, the static cost must
equal what the run counts, and each layer must take seven rounds fewer than without the
deferral, plus one per raw LayerNorm (and one more per commuting one).
"""

import pytest
import torch
from transformers import BertConfig, BertModel

import secformer_compiler as sc
from secformer_compiler import deferral, mpc_interp
from secformer_compiler.cost import program_cost
from secformer_compiler.passes.rounds import commute_layernorm_scaling

ULP = 2.0 ** -16


@pytest.fixture(scope="module")
def bert():
    return _tiny_bert()


@pytest.fixture(scope="module")
def bert_goldschmidt():
    """The same model with Goldschmidt divisions only (no table seeds)."""
    return _tiny_bert(table_seeds=False)


def _tiny_bert(**kw):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    x = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}
    cal = [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}]
    return sc.compile(model, x, calibration=cal, **kw), x


def test_plan_marks_scores_and_layernorm_inputs(bert):
    cm, _ = bert
    producers = [cm.graph[p] for p in deferral.plan_deferred(cm.graph)]
    assert sorted(p.op for p in producers) == ["linear"] * 6 + ["matmul"] * 2
    for p in producers:
        if p.meta.get("defer_raw"):  # before a residual add with a raw LayerNorm: no truncation
            assert "defer" not in p.meta
            continue
        assert p.meta["defer"] == (2 if p.op == "matmul" else 0)  # 1/sqrt(16) = 2^-2 folds in
    folded = [n for n in cm.graph if n.meta.get("folded")]
    assert len(folded) == 2 and all(n.op == "scale" for n in folded)
    consumers = [n for n in cm.graph if n.op in ("softmax", "layernorm", "gelu")
                 and "pending_shift" in n.meta]
    assert len(consumers) == 8  # the embeddings' LayerNorm has no product before it
    unnormalized = [n for n in cm.graph if n.meta.get("unnormalized")]
    assert [n.op for n in unnormalized] == ["softmax"] * 2
    normalizes = [n for n in cm.graph if n.meta.get("normalizes")]
    assert [n.op for n in normalizes] == ["matmul"] * 2
    assert all(n.inputs[0] == s.name for n, s in zip(normalizes, unnormalized))
    # raw LayerNorms: the embeddings' and every one but the last (a graph output)
    raw = [n for n in cm.graph if n.meta.get("raw")]
    assert len(raw) == 4 and all(n.op == "layernorm" for n in raw)
    assert cm.graph.outputs[0] not in {n.name for n in raw}
    raw_in = [n for n in cm.graph if n.meta.get("raw_in")]
    assert sorted(n.module_path.split(".")[-1] for n in raw_in) == ["dense"] * 2 + ["self"] * 2  # query, key and value fused (passes/fuse.py)
    assert len([n for n in cm.graph if n.meta.get("defer_raw")]) == 4  # O and FFN2 of both layers
    assert len([n for n in cm.graph if n.meta.get("raw_add")]) == 4


def test_raw_layernorms_need_f_16_or_less(bert):
    cm, _ = bert
    deferral.plan_deferred(cm.graph, 18)
    assert not any(n.meta.get("raw") for n in cm.graph)
    mpc_interp.plan_fixed(cm.graph, 16)
    assert any(n.meta.get("raw") for n in cm.graph)


def test_2pc_agrees_and_cost_model_counts_it(bert):
    cm, x = bert
    res = cm.run(**x)
    sim = cm.simulate(**x)[0]
    # exact truncation rounds down or not at random (1 ulp), which LayerNorm amplifies
    assert (res.outputs[0] - sim).abs().max() <= 128 * ULP
    assert (res.outputs[0] - cm.float(**x)[0]).abs().max() < 0.05
    static = program_cost(cm.graph)
    assert static.rounds == res.stats.rounds
    assert static.bytes_per_party == res.stats.bytes_sent[0] == res.stats.bytes_sent[1]


def test_seven_rounds_fewer_per_layer_and_one_per_raw_layernorm(bert, monkeypatch):
    cm, _ = bert
    with_deferral = program_cost(cm.graph).rounds

    def nothing_deferred(graph, frac_bits=16):
        for n in graph:
            for k in deferral._KEYS:
                n.meta.pop(k, None)
        return []

    monkeypatch.setattr(mpc_interp, "plan_deferred", nothing_deferred)
    without = program_cost(cm.graph).rounds
    # per layer: the scores (2: the scale and the truncation), 2 LayerNorms, GeLU and the
    # attention's normalization after its product (2: the matmul beside the reciprocal, and
    # its truncation in the scaling's round); and the 4 raw LayerNorms' last rounds
    assert with_deferral == without - 7 * 2 - 4


def test_fewer_rounds_leaves_table_seeded_layernorms_alone(bert):
    """A table-seeded LayerNorm's 1/sqrt takes 2 rounds: with a gain, Z W could not open
    before it ends, so the commute mark alone changes nothing there (compile(fewer_rounds=
    True) folds the gain first: tests/compiler/test_fold.py)."""
    cm, _ = bert
    lns = [n for n in cm.graph if n.op == "layernorm"]
    assert lns and all(n.attrs["params"]["table_bits"] for n in lns)
    before = program_cost(cm.graph)
    commute_layernorm_scaling(cm.graph)
    try:
        mpc_interp.plan_fixed(cm.graph, 16)
        assert not any(n.meta.get("commute_into") for n in cm.graph)
        assert program_cost(cm.graph).rounds == before.rounds
    finally:
        for n in lns:
            n.attrs.pop("commute", None)
        mpc_interp.plan_fixed(cm.graph, 16)


def test_fewer_rounds_layernorms_compute_the_linears_after_them(bert_goldschmidt):
    cm, x = bert_goldschmidt
    without = program_cost(cm.graph)
    assert not any(n.meta.get("commute_into") or n.meta.get("commuted") for n in cm.graph)
    res_without = cm.run(**x)
    commute_layernorm_scaling(cm.graph)  # what compile(fewer_rounds=True) runs last
    try:
        mpc_interp.plan_fixed(cm.graph, 16)
        commuting = [n for n in cm.graph if n.meta.get("commute_into")]
        assert len(commuting) == 4  # every raw LayerNorm: its rsqrt takes 3 or more iterations
        for n in commuting:
            assert n.meta.get("raw") and len(n.meta["commute_into"]) == 1  # Q/K/V fused, or FFN1
            (lin,) = n.meta["commute_into"]
            assert cm.graph[lin].op == "linear" and cm.graph[lin].meta["commuted"]
        with_commute = program_cost(cm.graph)
        assert with_commute.rounds == without.rounds - 4  # each linear's round
        # it opens Z W (the linear's output width) instead of LN(x): more bytes
        assert with_commute.bytes_per_party > without.bytes_per_party
        res = cm.run(**x)
        assert res.stats.rounds == with_commute.rounds
        assert res.stats.bytes_sent[0] == res.stats.bytes_sent[1] == with_commute.bytes_per_party
        assert (res.outputs[0] - cm.float(**x)[0]).abs().max() < 0.05
        # the same ring values but for the truncations' 1-ulp randomness, which LayerNorm amplifies
        assert (res.outputs[0] - res_without.outputs[0]).abs().max() <= 256 * ULP
        assert (res.outputs[0] - cm.simulate(**x)[0]).abs().max() <= 128 * ULP
    finally:
        for n in cm.graph:
            n.attrs.pop("commute", None)
        mpc_interp.plan_fixed(cm.graph, 16)
