"""Plugins: the example package examples/secformer-relu-softmax, installed for real, compiles.

The package is pip-installed (no deps, no build isolation, offline) into a temporary
directory that is put on sys.path, so `importlib.metadata` finds its entry point in the
group `secformer_compiler.passes` exactly as for a user's installed plugin. The compiler
must load it by itself when asked for `softmax="softmax.2relu"`; afterwards sys.path,
sys.modules and every registry it touched are restored.

Checks: the simulator matches the plugin spec's float reference (the approximated model in
float64) within fixed-point error, 2PC matches the simulator, the static cost model equals
what the simulator and the 2PC run count, the plugin's pass runs by name, and registering
a name twice is refused.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertModel

import secformer_compiler as sc
from secformer_compiler import cost as cost_mod
from secformer_compiler import mpc_interp, plugins
from secformer_compiler.approx import APPROXIMATIONS, measure_error
from secformer_compiler.cost import program_cost
from secformer_compiler.passes import registry, run_passes
from secformer_compiler.training import float_approx

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "secformer-relu-softmax"
PACKAGE = "secformer_relu_softmax"
ULP = 2.0 ** -16  # compile() default: 16 fractional bits


def _restore(table: dict, saved: dict) -> None:
    table.clear()
    table.update(saved)


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """Install the example into a temporary site directory and put it on sys.path.

    The plugin is *not* imported here: the compiler must find it through its entry point.
    """
    src = tmp_path_factory.mktemp("src") / EXAMPLE.name  # build outside the source tree
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"

    tables = (APPROXIMATIONS, registry.PASSES, mpc_interp.NONLINEAR, cost_mod.NONLINEAR_COST)
    saved = [dict(t) for t in tables]
    saved_path, saved_loaded = list(sys.path), registry._plugins_loaded
    assert PACKAGE not in sys.modules and "softmax.2relu" not in APPROXIMATIONS
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    registry._plugins_loaded = False  # another test may have loaded (no) plugins already
    try:
        yield site
    finally:
        sys.path[:] = saved_path
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        for table, old in zip(tables, saved):
            _restore(table, old)
        registry._plugins_loaded = saved_loaded
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def bert(plugin_site):
    """A tiny random BERT compiled with softmax="softmax.2relu": the first use of the name."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # padding: masked scores must drop out of the 2ReLU rows
    x = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}
    # Calibration is for LayerNorm's Goldschmidt range (the uncalibrated default, var + eps in
    # [1e-3, 1e3], does not survive 2PC at 16 bits); the 2ReLU spec must keep its own defaults
    # under it (see the plugin's approximation.py).
    cal = [{"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": mask}]
    loaded_before = PACKAGE in sys.modules
    cm = sc.compile(model, x, softmax="softmax.2relu", calibration=cal)
    sim = cm.simulate(**x)[0]  # once (the slowest step): shared by the tests below
    return SimpleNamespace(cm=cm, x=x, loaded_before=loaded_before, sim=sim,
                           counted=cm.last_simulation_counter)


def test_example_entry_point_is_installed(plugin_site):
    eps = [ep for ep in importlib.metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
           if ep.value == PACKAGE]
    assert [ep.name for ep in eps] == ["relu_softmax"]
    assert Path(eps[0].dist.locate_file("")).resolve() == Path(plugin_site).resolve()


def test_compile_loads_the_plugin_through_its_entry_point(bert, plugin_site):
    cm = bert.cm
    assert not bert.loaded_before
    mod = sys.modules[PACKAGE]
    assert Path(mod.__file__).resolve().is_relative_to(Path(plugin_site).resolve())
    softmax = [n for n in cm.graph if n.op == "softmax"]
    assert len(softmax) == 2
    for n in softmax:
        assert n.attrs["method"] == "softmax.2relu"
        assert n.attrs["params"] == dict(mod.SPEC.params)  # not re-derived by calibration
        assert len(n.inputs) == 2  # the padding mask reaches the protocol
    assert "softmax.2relu" in cm.report()


def test_plugin_spec_meets_its_declared_bound(bert):
    spec = APPROXIMATIONS["softmax.2relu"]
    assert spec.replacement and spec.op == "softmax"
    report = measure_error(spec)
    assert report.max_abs <= spec.declared_max_abs_err, report
    assert spec.declared_max_abs_err <= 2 * report.max_abs, "declared bound is loose"
    # all-zero rows (every score <= 0, or every positive one masked) give 0, not NaN
    x = torch.tensor([[-1.0, -2.0, 0.0], [3.0, -1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1], [0, 1, 0]], dtype=torch.float64)
    assert torch.equal(spec.reference(x, mask), torch.zeros_like(x))


def test_simulator_matches_the_specs_float_reference(bert):
    cm, x, sim = bert.cm, bert.x, bert.sim
    ref = float_approx(cm, x)[0]  # the same program in float64, each nonlinearity by its spec
    # fixed-point error of 16 fractional bits through two layers (measured: 7e-4)
    assert (sim - ref).abs().max() < 4e-3
    # the padded row still has finite, non-trivial outputs
    assert torch.isfinite(sim).all() and sim[1].abs().max() > 0.1


def test_2pc_matches_simulator_and_cost_model_matches_counts(bert):
    cm, x, sim, counted = bert.cm, bert.x, bert.sim, bert.counted
    res = cm.run(**x)
    # Same fixed-point program; exact truncation rounds down or not at random (1 ulp), and two
    # layers of LayerNorm amplify that (measured: 35 ulps). One softmax alone: next test.
    assert (res.outputs[0] - sim).abs().max() <= 128 * ULP
    static = program_cost(cm.graph)
    assert static.rounds == counted.rounds == res.stats.rounds
    assert static.bytes_per_party == counted.bytes_sent == res.stats.bytes_sent[0] == res.stats.bytes_sent[1]
    for n in cm.graph:
        if n.op == "softmax":
            row = res.stats.by_tag[n.name]
            c = static.by_node[n.name]
            assert (row["bytes_sent"], row["rounds"]) == (c.bytes, c.rounds), n.name
            assert c.rounds == 7 + (15 + 1) + 2  # relu, Goldschmidt (fused.py), product, truncation


class _ScoresSoftmax(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.lin(x) * 2, -1)


def test_single_softmax_2pc_within_a_few_ulps(plugin_site, seed):
    model = _ScoresSoftmax().eval()
    x = torch.randn(2, 4, 16)
    cm = sc.compile(model, (x,), softmax="softmax.2relu")
    sim = cm.simulate(x=x)[0]
    scores = (model.lin(x) * 2).double()
    spec = APPROXIMATIONS["softmax.2relu"]
    # the linear layer's rounding (~1 ulp per score) plus the protocol's own few ulps
    assert (sim - spec.reference(scores)).abs().max() <= 8 * ULP
    res = cm.run(x=x)
    assert (res.outputs[0] - sim).abs().max() <= 4 * ULP
    static = program_cost(cm.graph)
    assert static.rounds == cm.last_simulation_counter.rounds == res.stats.rounds
    assert static.bytes_per_party == cm.last_simulation_counter.bytes_sent == res.stats.bytes_sent[0]


def test_divisor_range_is_checked_not_garbage(plugin_site):
    """With more fractional bits the reciprocal's iterate has less headroom: refuse, loudly."""
    cm = sc.compile(_ScoresSoftmax().eval(), (torch.zeros(1, 2, 16),), softmax="softmax.2relu",
                    frac_bits=20)
    with pytest.raises(ValueError, match="Goldschmidt reciprocal's low end at 20 fractional bits"):
        cm.simulate(x=torch.zeros(1, 2, 16))


def test_plugin_pass_runs_by_name(bert):
    cm = bert.cm
    graph = run_passes(cm.graph.copy(), ["report_softmax_count"])
    assert graph.meta["softmax_count"] == {"softmax.2relu": 2}
    # rows = batch x heads x queries per softmax node; row length = keys
    assert graph.meta["softmax_rows"] == {"softmax.2relu": (2 * (2 * 2 * 8), 8)}
    assert "softmax_count" not in cm.graph.meta  # the pass ran on a copy


def test_plugin_names_cannot_be_registered_twice(bert):
    mod = sys.modules[PACKAGE]
    with pytest.raises(plugins.DuplicateApproximationError, match="softmax.2relu"):
        plugins.register_approximation(mod.SPEC)
    with pytest.raises(plugins.DuplicateProtocolError, match="softmax.2relu"):
        plugins.register_protocol("softmax", "softmax.2relu", lambda *a: None, lambda *a: None)
    with pytest.raises(plugins.DuplicatePassError, match="report_softmax_count"):
        plugins.register_pass("report_softmax_count")(mod.passes.report_softmax_count)


def _spec(name: str) -> plugins.ApproxSpec:
    def fn(x, mask=None, dim=-1, *, prescale):
        return torch.softmax(x, dim) * prescale
    return plugins.ApproxSpec(name=name, op="softmax", method="test", domain=(-1.0, 1.0),
                              params={"prescale": 1.0}, fn=fn, declared_max_abs_err=0.0)


def test_registering_an_approximation_twice_raises():
    name = "softmax.sftest_twice"
    try:
        assert plugins.register_approximation(_spec(name)).name == name
        with pytest.raises(plugins.DuplicateApproximationError, match="already registered"):
            plugins.register_approximation(_spec(name))
        with pytest.raises(plugins.DuplicateApproximationError, match="softmax.2quad"):
            plugins.register_approximation(_spec("softmax.2quad"))  # a built-in name
    finally:
        APPROXIMATIONS.pop(name, None)
    assert APPROXIMATIONS["softmax.2quad"].method == "2quad"  # untouched


def test_register_protocol_is_all_or_nothing():
    key = ("softmax", "softmax.sftest_half")
    cost_mod.NONLINEAR_COST[key] = lambda *a: plugins.Cost()  # a cost rule without a protocol
    try:
        with pytest.raises(plugins.DuplicateProtocolError, match="cost rule"):
            plugins.register_protocol(*key, lambda *a: None, lambda *a: None)
        assert key not in mpc_interp.NONLINEAR
        with pytest.raises(ValueError, match="softmax.<variant>"):
            plugins.register_protocol("softmax", "gelu.x", lambda *a: None, lambda *a: None)
        with pytest.raises(ValueError, match="no method dispatch"):
            plugins.register_protocol("matmul", "matmul.x", lambda *a: None, lambda *a: None)
    finally:
        cost_mod.NONLINEAR_COST.pop(key, None)
        mpc_interp.NONLINEAR.pop(key, None)

