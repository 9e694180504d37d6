"""compile() end to end: simulator vs float, 2PC vs simulator, static cost vs counted cost."""

import pytest
import torch
from transformers import BertConfig, BertModel

import secformer_compiler as sc
from secformer_compiler.cost import missing_cost_rules, program_cost
from secformer_compiler.mpc_interp import RULES
from secformer_compiler.ir import OPS


@pytest.fixture(scope="module")
def tiny_bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    x = {"input_ids": ids, "attention_mask": mask}
    cal = [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask} for _ in range(3)]
    return model, x, cal


def test_every_mpc_op_has_a_2pc_rule_and_a_cost_rule():
    mpc_ops = [op for op, d in OPS.items() if d.level == "mpc"]
    assert [op for op in mpc_ops if op not in RULES] == []
    assert missing_cost_rules() == []


def test_exact_simulator_matches_float_model(tiny_bert):
    model, x, _ = tiny_bert
    cm = sc.compile(model, x, preset="exact", frac_bits=24)
    got = cm.simulate(**x)[0]
    want = model(**x).last_hidden_state
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("preset", ["secformer", "secformer-exact-softmax"])
def test_2pc_equals_simulator_and_cost_model_equals_counts(tiny_bert, preset):
    model, x, cal = tiny_bert
    cm = sc.compile(model, x, preset=preset, calibration=cal)
    sim = cm.simulate(**x)[0]
    res = cm.run(**x)
    # same fixed-point program; only exact truncation's random 1-ulp carries differ
    assert (res.outputs[0] - sim).abs().max() < 5e-3
    # close to the float model (2Quad differs from softmax, so loosely for secformer)
    tol = 0.3 if preset == "secformer" else 0.05
    assert (sim - model(**x).last_hidden_state).abs().max() < tol
    static = program_cost(cm.graph)
    counted = cm.last_simulation_counter
    assert static.rounds == counted.rounds == res.stats.rounds
    assert static.bytes_per_party == counted.bytes_sent == res.stats.bytes_sent[0] == res.stats.bytes_sent[1]
    for name, c in static.by_node.items():
        row = res.stats.by_tag.get(name, {"bytes_sent": 0, "rounds": 0})
        assert (row["bytes_sent"], row["rounds"]) == (c.bytes, c.rounds), name


def test_a_session_keeps_only_the_weight_shares_it_reads(tiny_bert):
    """Linear weights live on only as their fixed operands (as limbs once split); biases,
    LayerNorm gains and the embedding tables stay as shares. Two inferences stay right."""
    model, x, cal = tiny_bert
    cm = sc.compile(model, x, preset="secformer", calibration=cal)
    sim = cm.simulate(**x)[0]
    with cm.session() as sess:
        for _ in range(2):
            assert (sess.infer(**x).outputs[0] - sim).abs().max() < 5e-3
        for role in sess.cluster.roles[:2]:
            kept = role.ctx.state["weights"]
            dropped = {k for k, v in kept.items() if v.device.type == "meta"}
            assert dropped and all(k.endswith("weight") and "LayerNorm" not in k and "embeddings" not in k
                                   for k in dropped), dropped
            assert "encoder.layer.0.attention.self.{query,key,value}.weight" in dropped  # fused (passes/fuse.py)
            assert kept["encoder.layer.0.attention.self.{query,key,value}.bias"].device.type == "cpu"
            assert kept["embeddings.word_embeddings.weight"].device.type == "cpu"


def test_a_session_loads_in_groups_with_the_rounds_and_bytes_of_one_load(tiny_bert, monkeypatch):
    """Groups of ~2,000 values (several per model here): the same rounds and bytes as
    one load_program run with the same round size, every weight kept, same outputs."""
    from secformer_compiler import mpc_interp
    from secformer_compiler.compiled import split_shares
    from secformer_compiler.runtime.local import LocalCluster

    model, x, cal = tiny_bert
    cm = sc.compile(model, x, preset="secformer", calibration=cal)
    monkeypatch.setattr(mpc_interp, "LOAD_ROUND_VALUES", 2000)
    groups = mpc_interp.load_groups(cm.graph)
    assert len(groups) > 3
    sim = cm.simulate(**x)[0]
    with cm.session() as sess:
        grouped = sess.load_stats
        assert (sess.infer(**x).outputs[0] - sim).abs().max() < 5e-3
        kept = [r.ctx.state["weights"] for r in sess.cluster.roles[:2]]
    assert set(kept[0]) == set(kept[1]) == set(cm.graph.weights)
    whole = LocalCluster(cm.fxp, cm.trunc)
    w0, w1 = split_shares(cm._ring_weights)
    *_, once = whole.run(mpc_interp.load_program, (sess.graph, w0), (sess.graph, w1))
    assert grouped.rounds == once.rounds == len(groups)
    assert grouped.bytes_sent == once.bytes_sent
    # the dealer's stream closes each program with an empty blob (an 8-byte length header)
    assert grouped.dealer_bytes == once.dealer_bytes + 8 * (len(groups) - 1)
    assert grouped.by_tag == once.by_tag


def test_load_groups_cover_every_fixed_operand_once_with_a_weights_keys_together(tiny_bert):
    from secformer_compiler.mpc_interp import load_groups, plan_fixed

    model, x, cal = tiny_bert
    cm = sc.compile(model, x, preset="secformer", calibration=cal)
    plan = plan_fixed(cm.graph)
    for limit in (1, 1000, 5000, 10 ** 9):
        groups = load_groups(cm.graph, round_values=limit)
        assert sorted(k for g in groups for k in g) == sorted(plan)
        where = {}
        for i, g in enumerate(groups):
            for k in g:
                assert where.setdefault(plan[k][0], i) == i  # a weight's keys share a group
        sizes = [sum(cm.graph.weights[plan[k][0]].numel() for k in g) for g in groups]
        assert all(s >= limit for s in sizes[:-1])
    assert len(load_groups(cm.graph, round_values=10 ** 9)) == 1


def test_load_program_refuses_a_key_it_does_not_have(tiny_bert):
    from secformer_compiler.mpc_interp import load_program
    from secformer_compiler.runtime.local import LocalCluster

    model, x, cal = tiny_bert
    cm = sc.compile(model, x, preset="secformer", calibration=cal)
    with pytest.raises(Exception, match="no fixed operand 'nope:t'"):
        LocalCluster(cm.fxp, cm.trunc, timeout=10).run(load_program, (cm.graph, {}, ["nope:t"]))


def test_combine_stats_adds_costs_and_keeps_the_largest_peak():
    from secformer_compiler.runtime.local import RunStats, combine_stats

    a = RunStats({0: 10, 1: 10}, 1, 5, {"w": {"bytes_sent": 10, "rounds": 1}}, online_s={0: 1.0, 1: 2.0},
                 sent_to={0: {1: 10}, 2: {1: 5}}, peak_rss_mib={0: 100.0, 1: 50.0, 2: None})
    b = RunStats({0: 4, 1: 4}, 1, 3, {"w": {"bytes_sent": 4, "rounds": 1}, "v": {"bytes_sent": 1, "rounds": 0}},
                 online_s={0: 0.5, 1: 0.5}, sent_to={0: {1: 4}, 2: {1: 3}}, peak_rss_mib={0: 90.0, 1: 70.0})
    c = combine_stats([a, b])
    assert (c.bytes_sent, c.rounds, c.dealer_bytes) == ({0: 14, 1: 14}, 2, 8)
    assert c.by_tag == {"w": {"bytes_sent": 14, "rounds": 2}, "v": {"bytes_sent": 1, "rounds": 0}}
    assert c.sent_to == {0: {1: 14}, 2: {1: 8}} and c.online_s == {0: 1.5, 1: 2.5}
    assert c.peak_rss_mib == {0: 100.0, 1: 70.0}
    assert a.by_tag == {"w": {"bytes_sent": 10, "rounds": 1}}  # the inputs are not changed
    with pytest.raises(ValueError):
        combine_stats([])


def test_report_lists_approximations(tiny_bert):
    model, x, cal = tiny_bert
    cm = sc.compile(model, x, calibration=cal)
    text = cm.report()
    assert "gelu.secformer" in text and "softmax.2quad" in text and "layernorm.secformer" in text
    assert "linear" in str(cm.program)


@pytest.mark.parametrize("preset", ["secformer", "mpcformer", "puma", "crypten", "secformer-exact-softmax"])
def test_every_preset_compiles_and_its_static_cost_equals_the_count(preset):
    from transformers import BertForSequenceClassification
    torch.manual_seed(1)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    model = BertForSequenceClassification(cfg).eval()
    x = {"input_ids": torch.randint(0, 100, (1, 8)), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    cm = sc.compile(model, x, preset=preset, calibration=[x])
    got = cm.simulate(**x)[0]
    assert (got - model(**x).logits).abs().max() < 0.05  # random weights: small logits
    static, counted = program_cost(cm.graph), cm.last_simulation_counter
    assert (static.rounds, static.bytes_per_party) == (counted.rounds, counted.bytes_sent)


def test_layernorm_of_a_large_variance_subtracts_the_mean_first():
    """var + eps beyond what the one-pass LayerNorm can scale (3 2^27 / n^2; Quad GeLU's FFN
    outputs in MiniLM reach it): the rule switches to center_first, and the 2PC run, the
    simulator, the float program and the cost model still agree."""
    from secformer_compiler.runtime.protocols.nonlinear import layernorm_needs_center_first
    from secformer_compiler.training import float_approx

    torch.manual_seed(0)
    n = 384
    model = torch.nn.Sequential(torch.nn.Linear(8, n), torch.nn.LayerNorm(n)).eval()
    with torch.no_grad():
        model[0].weight.mul_(300.0)  # var ~ 300^2 8 / 3 / 8 ~ 3e4 >> 3 2^27 / 384^2 ~ 2730
    x = torch.randn(4, 8)
    cm = sc.compile(model, (x,), preset="secformer", calibration=[(torch.randn(4, 8),) for _ in range(3)])
    ln = next(n_ for n_ in cm.graph if n_.op == "layernorm")
    assert layernorm_needs_center_first(n, float(ln.attrs["params"]["prescale"]))
    want = float_approx(cm, x)[0]
    sim = cm.simulate(x)[0]
    assert (sim - want).abs().max() < 0.02
    assert (sim - model(x)).abs().max() < 0.02
    res = cm.run(x)
    assert (res.outputs[0] - sim).abs().max() < 5e-3
    assert program_cost(cm.graph).rounds == res.stats.rounds
    assert program_cost(cm.graph).bytes_per_party == res.stats.bytes_sent[0]
