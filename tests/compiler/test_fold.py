"""compile(fewer_rounds=True) with table seeds: fold_layernorm_affine (passes/rounds.py) moves
each LayerNorm's gain and shift into the linear layers after it, so the table-seeded
LayerNorm can compute their products itself (Z needs no product, only a truncation in round
2) and each such linear's output is ready one round sooner. The folded program must compute
the same function in float, agree in 2PC with its simulator and float model, count exactly
the rounds and bytes its static cost says, and keep its folded weights right when weights
are replaced (training.with_weights)."""

import pytest
import torch
from transformers import BertConfig, BertModel

import secformer_compiler as sc
from secformer_compiler.cost import program_cost
from secformer_compiler.passes.rounds import FOLD_PREFIX, LN_FOLDS, fold_layernorm_affine
from secformer_compiler.training import with_weights


@pytest.fixture(scope="module")
def pair():
    """The same tiny BERT compiled with GeLU lookups, without and with fewer_rounds."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=64, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # gains and shifts away from 1 and 0, so a wrong fold shows
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.rand_like(p) * 0.8 + 0.6 if name.endswith("weight") else torch.randn_like(p) * 0.2)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    x = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}
    cal = [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}]
    base = sc.compile(model, x, calibration=cal, gelu_lookup=True)
    fewer = sc.compile(model, x, calibration=cal, fewer_rounds=True)
    return model, x, base, fewer


def test_fold_rewrites_every_layernorm_read_by_a_linear(pair):
    model, x, base, fewer = pair
    g = fewer.graph
    lns = [n for n in g if n.op == "layernorm"]
    plain = [n for n in lns if len(n.inputs) == 1]
    assert len(plain) == 4 and len(lns) == 5  # the last, a graph output, keeps its own
    for n in plain:
        assert n.meta["commute_into"] and all(g[u].inputs[0] == n.name for u in n.meta["commute_into"])
        for u in n.meta["commute_into"]:
            assert g[u].meta["commuted"] and all(g[i].attrs["name"].startswith(FOLD_PREFIX)
                                                 for i in g[u].inputs[1:])
    folds = g.meta[LN_FOLDS]
    assert len(folds) == 8 and set(folds) == {k for k in g.weights if k.startswith(FOLD_PREFIX)}
    # the same function, before any fixed point
    for a, b in zip(fewer.float(**x), base.float(**x)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        want = model(**x).last_hidden_state
    assert (fewer.float(**x)[0] - want).abs().max() < 0.05


def test_fold_is_a_no_op_without_linears_after_layernorms():
    g = sc.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)), (torch.randn(2, 8),)).graph
    assert fold_layernorm_affine(g) is g


def test_fewer_rounds_saves_a_round_per_layernorm_before_a_linear_in_2pc(pair):
    _, x, base, fewer = pair
    c0, c = program_cost(base.graph), program_cost(fewer.graph)
    assert c.rounds == c0.rounds - 4  # 2 layers x (Q/K/V and FFN1)
    assert c.bytes_per_party > c0.bytes_per_party  # r (Z W) opens the linears' output widths
    res = fewer.run(**x)
    assert res.stats.rounds == c.rounds
    assert res.stats.bytes_sent[0] == res.stats.bytes_sent[1] == c.bytes_per_party
    assert (res.outputs[0] - fewer.float(**x)[0]).abs().max() < 0.05
    assert (res.outputs[0] - fewer.simulate(**x)[0]).abs().max() <= 64 * 2.0 ** -16
    assert (res.outputs[0] - base.run(**x).outputs[0]).abs().max() < 0.01


def test_with_weights_refolds_from_the_model_state_dict(pair):
    model, x, base, fewer = pair
    torch.manual_seed(1)
    sd = {k: v * (1 + 0.1 * torch.rand_like(v)) for k, v in model.state_dict().items()
          if v.dtype.is_floating_point}
    g0, g = with_weights(base.graph, sd), with_weights(fewer.graph, sd)
    a = sc.CompiledModel(g, fewer.fxp, fewer.trunc, fewer.preset).float(**x)[0]
    b = sc.CompiledModel(g0, base.fxp, base.trunc, base.preset).float(**x)[0]
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(a, fewer.float(**x)[0], atol=1e-3)  # the new weights took effect


def test_with_weights_refuses_a_new_gain_without_its_linears(pair):
    _, _, _, fewer = pair
    gain = next(r["gain"] for r in fewer.graph.meta[LN_FOLDS].values() if r["kind"] == "weight")
    with pytest.raises(ValueError, match="folded from them at compile time"):
        with_weights(fewer.graph, {gain: fewer.graph.weights[gain] * 2})
    with_weights(fewer.graph, {gain: fewer.graph.weights[gain].clone()})  # unchanged: fine
