"""Training view: the IR in float with each nonlinearity's approximation, differentiable.

For a tiny BERT (2 layers) and every preset: the view with exact nonlinearities matches the
HF model (<= 1e-4), the approximated view matches the fixed-point simulator within the
fixed-point error (2e-2 max abs) where the simulator implements the preset, gradients reach
every trainable weight, and trained weights written back give a program whose simulation
matches the view.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from secformer_compiler.compiled import CompiledModel, compile
from secformer_compiler.mpc_interp import NONLINEAR
from secformer_compiler.training import approximated_module, float_approx, fused_parts, training_module, with_weights

PRESETS = ("exact", "secformer", "mpcformer", "puma", "crypten", "secformer-exact-softmax")
SIM_TOL = 2e-2
EXACT_TOL = 1e-4


class MeanPool(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, n: int = 2):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, n)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def tiny_model() -> torch.nn.Module:
    # initializer_range 0.2: attention scores and activations large enough that the
    # approximations visibly differ from the exact functions.
    cfg = T.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16, initializer_range=0.2)
    enc = T.BertModel(cfg, add_pooling_layer=False).eval()
    enc.config._attn_implementation = "eager"
    return MeanPool(enc).eval()


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 60, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def simulator_supports(cm: CompiledModel) -> str | None:
    for n in cm.graph:
        m = n.attrs.get("method")
        if m and (n.op, m) not in NONLINEAR:
            return f"{n.op} {m}"
    return None


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(7)
    return tiny_model(), inputs()


@pytest.mark.parametrize("preset", PRESETS)
def test_view_matches_simulator_and_model(case, preset):
    model, x = case
    cm = compile(model, x, preset=preset, calibration=[x])
    view = approximated_module(cm.graph, dtype=torch.float64)
    with torch.no_grad():
        got = view(x)[0]
        want = model(**x)
    exact = approximated_module(cm.graph, exact=True, dtype=torch.float64)
    with torch.no_grad():
        assert (exact(x)[0].float() - want).abs().max().item() <= EXACT_TOL
    if preset == "exact":
        assert (got.float() - want).abs().max().item() <= EXACT_TOL
    missing = simulator_supports(cm)
    if missing:
        pytest.skip(f"the simulator has no protocol for {missing} yet")
    sim = cm.simulate(x)[0]
    assert (sim - got.float()).abs().max().item() <= SIM_TOL
    assert torch.allclose(float_approx(cm, x)[0], got.float())


def test_replacements_change_the_function(case):
    """2Quad and Quad are replacements: the view must not silently compute the exact model."""
    model, x = case
    with torch.no_grad():
        want = model(**x)
        for preset in ("secformer", "mpcformer"):
            got = float_approx(compile(model, x, preset=preset), x)[0]
            assert (got - want).abs().max().item() > 1e-3


def test_gradients_and_intermediates(case):
    model, x = case
    cm = compile(model, x, preset="secformer")
    view = training_module(cm)
    res = view.forward_with_intermediates(x, softmax_inputs=True)
    assert len(res["attentions"]) == 2 and len(res["scores"]) == 2
    assert res["attentions"][0].shape == (2, 2, 8, 8)
    assert len(res["hidden_states"]) == 3  # embeddings + 2 layers
    # masked keys get probability 0; each valid row sums to 1 (up to Goldschmidt's error)
    a = res["attentions"][0].detach()
    assert a[1, :, :, 5:].abs().max() == 0
    assert torch.allclose(a[0].sum(-1), torch.ones(2, 8), atol=1e-4)
    loss = res["outputs"][0].pow(2).sum() + sum(h.pow(2).mean() for h in res["hidden_states"])
    loss.backward()
    # the model's own weights: a fused one (attention's query, key and value) by its parts
    parts = fused_parts(cm.graph)
    assert parts
    names = [p for n in cm.graph.weights if not n.startswith("folded.")
             for p in ([q for q, _ in parts[n]] if n in parts else [n])]
    assert names and all(view.weight(n).grad is not None and view.weight(n).grad.abs().sum() > 0 for n in names)
    trained = view.trained_state_dict()
    assert set(trained) == set(names) and set(trained) <= set(model.state_dict())


def test_trained_weights_compile_to_the_same_function(case):
    model, x = case
    cm = compile(model, x, preset="secformer", calibration=[x])
    view = approximated_module(cm.graph, dtype=torch.float64)
    opt = torch.optim.SGD(view.params.values(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        view(x)[0].sum().backward()
        opt.step()
    # back into the model by name, recompiled from the module ...
    trained = type(model)(model.encoder).eval()
    trained.load_state_dict({**model.state_dict(), **view.trained_state_dict()})
    with torch.no_grad():
        want = view(x)[0].float()
    sim = compile(trained, x, preset="secformer", calibration=[x]).simulate(x)[0]
    assert (sim - want).abs().max().item() <= SIM_TOL
    # ... or straight into the program
    cm2 = CompiledModel(with_weights(cm.graph, view), cm.fxp, cm.trunc, cm.preset)
    assert (cm2.simulate(x)[0] - want).abs().max().item() <= SIM_TOL


def test_views_share_parameters_across_shapes(case):
    model, x = case
    g8 = compile(model, x, preset="secformer").graph
    x4 = {k: v[:, :4].contiguous() for k, v in x.items()}
    g4 = compile(model, x4, preset="secformer").graph
    v8 = approximated_module(g8)
    v4 = approximated_module(g4, params=v8.params)
    assert v4.params is v8.params
    (v8(x)[0].sum() + v4(x4)[0].sum()).backward()
    assert all(p.grad is not None for p in v8.params.values())


def test_pooler_tanh_classifier(seed):
    """BERT's own classification head: the pooler's tanh uses its preset method too."""
    cfg = T.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16, initializer_range=0.2, num_labels=3)
    model = T.BertForSequenceClassification(cfg).eval()
    x = inputs()
    cm = compile(model, x, preset="secformer", calibration=[x])
    methods = {n.attrs.get("method") for n in cm.graph if n.op == "tanh"}
    assert methods and None not in methods
    with torch.no_grad():
        want = model(**x).logits
        exact = approximated_module(cm.graph, exact=True, dtype=torch.float64)(x)[0]
    assert (exact.float() - want).abs().max().item() <= EXACT_TOL
    missing = simulator_supports(cm)
    if missing:
        pytest.skip(f"the simulator has no protocol for {missing} yet")
    got = float_approx(cm, x)[0]
    assert (cm.simulate(x)[0] - got).abs().max().item() <= SIM_TOL


def test_exact_goldschmidt_view_matches_the_calibrated_program(case):
    """goldschmidt="exact" (what distillation trains) is what the calibrated program computes."""
    model, x = case
    cm = compile(model, x, preset="secformer", calibration=[x])
    view = approximated_module(cm.graph, dtype=torch.float64, goldschmidt="exact")
    ref = approximated_module(cm.graph, dtype=torch.float64)
    with torch.no_grad():
        got, want = view(x)[0], ref(x)[0]
    assert (got - want).abs().max().item() <= 1e-3
    assert (cm.simulate(x)[0] - got.float()).abs().max().item() <= SIM_TOL
    # far outside the default 2Quad range the iterations diverge; the exact step does not
    g = compile(model, x, preset="secformer", calibration=[]).graph
    big = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"]}
    scaled = approximated_module(g, dtype=torch.float64, goldschmidt="exact",
                                 weights={k: v * 6 for k, v in g.weights.items() if "query" in k or "key" in k})
    with torch.no_grad():
        assert torch.isfinite(scaled(big)[0]).all()


def test_calibration_on_the_approximated_program(case):
    """Quad GeLU changes the ranges LayerNorm sees: measured on the approximated program they
    differ from the exact model's (what compile() calibrates on); compile_calibrated uses them."""
    from secformer_compiler import calibrate
    from secformer_compiler.training import compile_calibrated, measure_ranges

    model, x = case
    cm = compile_calibrated(model, x, [x], preset="mpcformer")
    approx_r = measure_ranges(cm.graph, [x])
    exact_r = calibrate.measure_ranges(cm.graph, [x])
    assert set(approx_r) == set(exact_r)
    assert any(abs(approx_r[k][1] / exact_r[k][1] - 1) > 0.1 for k in approx_r)
    want = float_approx(cm, x)[0]
    exact_steps = approximated_module(cm.graph, dtype=torch.float64, goldschmidt="exact")
    with torch.no_grad():
        assert (exact_steps(x)[0].float() - want).abs().max().item() <= 1e-3
    assert (cm.simulate(x)[0] - want).abs().max().item() <= SIM_TOL
