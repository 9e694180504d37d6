"""GeLU's comparison range from the LayerNorm and linear layer before it (passes/bounds.py)."""

from __future__ import annotations

import math

import torch

import secformer_compiler as sc
from secformer_compiler.cost import program_cost
from secformer_compiler.passes.bounds import bound_gelu_inputs, layernorm_linear_bound
from secformer_compiler.runtime.protocols.nonlinear import gelu_cmp_from_params
from secformer_compiler.training import with_weights


def _gelus(graph):
    return [n for n in graph if n.op == "gelu"]


def test_the_bound_holds_for_any_input_and_is_what_the_weights_give(make_tiny_bert):
    model, x = make_tiny_bert()
    cm = sc.compile(model, x)
    gelus = _gelus(cm.graph)
    assert len(gelus) == 2
    for g in gelus:
        b = layernorm_linear_bound(cm.graph, g)
        assert b is not None and g.attrs["params"]["input_bound"] == math.ceil((b * (1 + 2 ** -6) + 2 ** -4) * 16) / 16
        assert g.attrs["params"]["input_bound"] < 1024
    # FFN1's outputs on inputs far from the calibration sample, even huge hidden states:
    # the LayerNorm before it normalizes them, so the bound holds whatever comes in
    torch.manual_seed(1)
    for scale in (1.0, 1e3):
        ids = torch.randint(0, 100, (4, 8))
        with torch.no_grad():
            emb = model.embeddings(ids) * scale
            for layer in model.encoder.layer:
                attn = layer.attention(emb)[0]
                ffn_in = layer.intermediate.dense(attn)
                emb = layer.output(layer.intermediate.intermediate_act_fn(ffn_in), attn)
                bound = max(g.attrs["params"]["input_bound"] for g in gelus)
                assert ffn_in.abs().max() <= bound


def test_tightened_bound_takes_a_round_off_each_gelu(make_tiny_bert):
    model, x = make_tiny_bert()
    cm = sc.compile(model, x)  # the default: carry trees (no lookup table)
    for g in _gelus(cm.graph):
        bits, drop = gelu_cmp_from_params(g.attrs["params"], 16)
        assert bits - drop - 1 == 8  # 8-bit carry trees (16 at the declared 1024)
    tight = program_cost(cm.graph)
    for g in _gelus(cm.graph):  # the declared bound, as before the pass
        g.attrs["params"] = dict(g.attrs["params"], input_bound=1024.0)
    wide = program_cost(cm.graph)
    assert tight.rounds == wide.rounds - 2  # one per layer
    assert tight.bytes_per_party < wide.bytes_per_party
    bound_gelu_inputs(cm.graph)
    assert program_cost(cm.graph).rounds == tight.rounds
    res = cm.run(**x)
    assert res.stats.rounds == tight.rounds and res.stats.bytes_sent[0] == tight.bytes_per_party
    assert (res.outputs[0] - cm.float(**x)[0]).abs().max() < 0.05


def test_tightened_bound_lets_gelu_use_a_lookup_table(make_tiny_bert):
    """With compile(gelu_lookup=True) a tight bound makes the segment tests one table lookup:
    GeLU in 2 rounds (against 4 with 8-bit carry trees, the default); at the declared 1024 the
    table would be too large and the carry trees stay. The 2PC run takes what the cost model
    says."""
    from secformer_compiler.runtime.protocols.nonlinear import gelu_table_from_params

    model, x = make_tiny_bert()
    cm = sc.compile(model, x, gelu_lookup=True)
    assert all(gelu_table_from_params(g.attrs["params"], 16) == (3, 8) for g in _gelus(cm.graph))  # |x| < 1
    table = program_cost(cm.graph)
    trees = sc.compile(model, x)  # the default: segment tests by carry trees
    assert all(gelu_table_from_params(g.attrs["params"], 16) is None for g in _gelus(trees.graph))
    for g, h in zip(_gelus(cm.graph), _gelus(trees.graph)):
        assert table.by_node[g.name].rounds == 2 and program_cost(trees.graph).by_node[h.name].rounds == 4
    res = cm.run(**x)
    assert res.stats.rounds == table.rounds and res.stats.bytes_sent[0] == table.bytes_per_party
    assert (res.outputs[0] - cm.float(**x)[0]).abs().max() < 0.05
    for g in _gelus(cm.graph):
        g.attrs["params"] = dict(g.attrs["params"], input_bound=1024.0)
        assert gelu_table_from_params(g.attrs["params"], 16) is None


def test_other_inputs_keep_the_declared_bound_and_new_weights_move_it(make_tiny_bert):
    model, x = make_tiny_bert()
    cm = sc.compile(model, x)
    g = cm.graph
    # new weights (a trained student) get their own bound: FFN1 x 10 -> about 10x
    sd = {k: (v * 10 if "intermediate.dense" in k else v) for k, v in model.state_dict().items()}
    g2 = with_weights(g, sd)
    for a, b in zip(_gelus(g), _gelus(g2)):
        assert b.attrs["params"]["input_bound"] > 9 * a.attrs["params"]["input_bound"]
    # a GeLU not fed by LayerNorm -> linear keeps the declared bound

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.gelu(self.lin(x))

    cm2 = sc.compile(M(), (torch.randn(2, 8),))
    (gelu,) = _gelus(cm2.graph)
    assert gelu.attrs["params"]["input_bound"] == 1024.0
