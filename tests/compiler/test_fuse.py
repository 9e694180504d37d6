"""fuse_sibling_linears: one opening for linear layers that read the same secret input."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import secformer_compiler as sc
from secformer_compiler import float_interp, passes
from secformer_compiler.cost import program_cost
from secformer_compiler.frontend import build_ir
from secformer_compiler.passes import DEFAULT_PIPELINE
from secformer_compiler.passes.fuse import _fused_name, fuse_sibling_linears
from secformer_compiler.training import approximated_module, fused_parts, with_weights

UNFUSED = [p for p in DEFAULT_PIPELINE if p != "fuse_sibling_linears"]


class Heads(nn.Module):
    """Four linears on x: two with bias and weights of their own (they fuse), one without a
    bias, and one whose layer is applied to y as well (its weight has two readers); one
    more on a computed input."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 4), nn.Linear(8, 6)
        self.nb = nn.Linear(8, 4, bias=False)
        self.shared = nn.Linear(8, 4)
        self.other = nn.Linear(4, 4)

    def forward(self, x, y):
        q, k, nb = self.q(x), self.k(x), self.nb(x)
        return q * 2 + self.other(q), k, nb, self.shared(x) + self.shared(y)


def test_fused_name_groups_the_differing_middle():
    names = ["a.b.query.weight", "a.b.key.weight", "a.b.value.weight"]
    assert _fused_name(names) == "a.b.{query,key,value}.weight"
    assert _fused_name(["w", "v"]) == "{w,v}"
    assert _fused_name(["a.w", "a.w.x"]) == "a.w+a.w.x"  # no middle for one of them


def test_only_siblings_with_private_weights_and_the_same_bias_form_fuse():
    torch.manual_seed(0)
    m = Heads().eval()
    x, y = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    g = build_ir(m, (x, y), pipeline=UNFUSED)
    f = fuse_sibling_linears(g.copy())
    f.verify("mpc")
    linears = [n for n in f if n.op == "linear"]
    fused = [n for n in linears if n.name.endswith("_fused")]
    assert len(fused) == 1 and fused[0].shape == (2, 3, 10)  # q (4) and k (6)
    assert len(linears) == len([n for n in g if n.op == "linear"]) - 1
    assert fused_parts(f) == {"{q,k}.weight": [("q.weight", 4), ("k.weight", 6)],
                              "{q,k}.bias": [("q.bias", 4), ("k.bias", 6)]}
    assert "q.weight" not in f.weights and "{q,k}.weight" in f.weights
    # the same function, output by output
    for a, b in zip(float_interp.run(g, (x, y)), float_interp.run(f, (x, y))):
        assert torch.equal(a, b)


def test_a_graph_without_siblings_is_returned_as_is():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    g = build_ir(m, (torch.randn(1, 4),), pipeline=UNFUSED)
    assert fuse_sibling_linears(g) is g


@pytest.fixture(scope="module")
def tiny(make_tiny_bert):
    return make_tiny_bert(layers=2)


def test_bert_attention_opens_its_input_once_per_layer_with_the_same_result(tiny, monkeypatch):
    model, x = tiny
    # calibrated: the documented defaults are far off this random-init model's ranges
    fused = sc.compile(model, x)
    monkeypatch.setattr(passes, "DEFAULT_PIPELINE", tuple(UNFUSED))
    plain = sc.compile(model, x)
    assert sum(n.name.endswith("_fused") for n in fused.graph) == 2  # query, key and value per layer
    cf, cp = program_cost(fused.graph), program_cost(plain.graph)
    assert cf.rounds == cp.rounds
    # two fewer openings of the (1 x 8 x 32) LayerNorm output per layer, 8 bytes a value
    assert cp.bytes_per_party - cf.bytes_per_party == 2 * 2 * 8 * 32 * 8
    sim_f, sim_p = fused.simulate(**x)[0], plain.simulate(**x)[0]
    assert torch.equal(sim_f, sim_p)  # the same ring values: fusing changes no arithmetic
    res = fused.run(**x)
    assert (res.outputs[0] - sim_f).abs().max() < 5e-3
    assert res.stats.bytes_sent[0] == cf.bytes_per_party and res.stats.rounds == cf.rounds


def test_the_training_view_trains_the_models_own_weights(tiny):
    model, x = tiny
    g = build_ir(model, x)
    view = approximated_module(g)
    trained = view.trained_state_dict()
    assert "encoder.layer.0.attention.self.query.weight" in trained
    assert not any("{" in k for k in trained) and set(trained) <= set(model.state_dict())
    name = "encoder.layer.0.attention.self.{query,key,value}.weight"
    assert torch.equal(view.weight(name).detach(), g.weights[name])
    # a state dict by the model's names rebuilds the fused weight
    sd = {k: v + 1 for k, v in model.state_dict().items()}
    g2 = with_weights(g, sd)
    assert torch.equal(g2.weights[name], torch.cat([sd[f"encoder.layer.0.attention.self.{p}.weight"]
                                                    for p in ("query", "key", "value")]))
