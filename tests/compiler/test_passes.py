"""Passes: golden IR text, the support check, the verifier, the pass manager and plugins,
pattern and mask rewrites, and the approximation presets.

Golden files live in tests/compiler/golden/; regenerate them after an intended change with
SECFORMER_UPDATE_GOLDEN=1 pytest tests/compiler/test_passes.py and review the diff.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import transformers as T

from secformer_compiler import float_interp
from secformer_compiler.errors import CompileError, UnsupportedOpsError, VerifyError
from secformer_compiler.frontend import build_ir, import_program, trace
from secformer_compiler.ir import OPS, Graph, Node
from secformer_compiler.passes import DEFAULT_PIPELINE, PassManager, registry
from secformer_compiler.passes.approximate import PRESETS

from test_frontend import hand_written_case, text_inputs  # tests/compiler is on sys.path (rootdir-relative)

GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SECFORMER_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"missing golden {path}; run with SECFORMER_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"IR differs from {path} (SECFORMER_UPDATE_GOLDEN=1 to accept)"


def compile_until(model, inputs, last: str, public=("attention_mask",), **options):
    graph = import_program(trace(model, inputs), inputs, public)
    passes = DEFAULT_PIPELINE[: DEFAULT_PIPELINE.index(last) + 1]
    return PassManager(passes, options).run(graph)


def tiny_bert_layer() -> nn.Module:
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    model = T.BertModel(cfg).eval()
    model.config._attn_implementation = "eager"
    return model


# -- golden text ------------------------------------------------------------------------


def test_golden_bert_layer(seed):
    torch.manual_seed(0)
    inputs = text_inputs({1: 5})
    check_golden("bert_layer.mpc.txt", build_ir(tiny_bert_layer(), inputs, preset="exact").to_text())


def test_golden_bert_layer_after_folding(seed):
    torch.manual_seed(0)
    inputs = text_inputs({1: 5})
    graph = compile_until(tiny_bert_layer(), inputs, "fold_public")
    assert graph.level == "aten"
    check_golden("bert_layer.fold_public.txt", graph.to_text())


def test_golden_patterns_before_and_after(seed):
    torch.manual_seed(0)
    model, inputs = hand_written_case()
    before = compile_until(model, inputs, "decompose_aten", public=("mask",))
    after = compile_until(model, inputs, "recognize_softmax_mask", public=("mask",))
    assert {"tanh", "erf", "rsqrt", "sqrt", "div", "where"} <= {n.op for n in before}
    assert not {"tanh", "erf", "rsqrt", "sqrt", "div", "where"} & {n.op for n in after}
    check_golden("patterns.decompose_aten.txt", before.to_text())
    check_golden("patterns.recognized.txt", after.to_text())


# -- the support check ------------------------------------------------------------------

torch.library.define("sftest::weird", "(Tensor x) -> Tensor")
torch.library.impl("sftest::weird", "cpu")(lambda x: x * 2)
torch.library.register_fake("sftest::weird")(lambda x: torch.empty_like(x))


class Ranker(nn.Module):
    def forward(self, x):
        top, _ = torch.topk(x, 2, dim=-1)
        return top.sum(-1, keepdim=True) + torch.sort(x, -1).values


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.rank = nn.Linear(4, 4), Ranker()

    def forward(self, x):
        y = torch.ops.sftest.weird(self.rank(self.proj(x)))
        public = torch.sort(torch.arange(4, 0, -1)).values  # public: evaluated in the clear, fine
        return y + public


def test_unsupported_ops_are_all_listed_in_one_error(seed):
    with pytest.raises(UnsupportedOpsError) as info:
        build_ir(Unsupported(), (torch.randn(2, 4),))
    err = info.value
    whats = sorted(p.what.split(" ")[0] for p in err.items)
    assert whats == ["aten.sort.default", "aten.topk.default", "sftest.weird.default"]
    paths = {p.what.split(" ")[0]: p.module_path for p in err.items}
    assert paths["aten.topk.default"] == "rank" and paths["aten.sort.default"] == "rank"
    assert "3 unsupported op(s)" in str(err) and "aten.layer_norm.default" in str(err)  # the supported set


def test_argument_level_support_is_checked(seed):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    with pytest.raises(UnsupportedOpsError, match=r"conv2d with kernel \[3, 3\], stride \[1, 1\]"):
        build_ir(model, (torch.randn(1, 3, 8, 8),))


def test_standalone_transcendentals_are_reported_at_lowering(seed):
    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x) + torch.erf(x)

    with pytest.raises(UnsupportedOpsError) as info:
        build_ir(Exp(), (torch.randn(3),))
    assert sorted(p.what.split(" ")[0] for p in info.value.items) == ["erf", "exp"]


# -- masks and selections ----------------------------------------------------------------


def test_masked_fill_outside_softmax_is_local_arithmetic(seed):
    class Fill(nn.Module):
        def forward(self, x, mask):
            return x.masked_fill(mask == 0, 3.0) * 2

    x, mask = torch.randn(2, 5), torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]])
    graph = build_ir(Fill(), (x, mask), public_inputs=("mask",))
    assert "where" not in {n.op for n in graph}
    assert torch.allclose(float_interp.run(graph, (x, mask))[0].float(), Fill()(x, mask))


def test_huge_fill_outside_softmax_is_rejected(seed):
    class Fill(nn.Module):
        def forward(self, x, mask):
            return x.masked_fill(mask == 0, float("-inf"))

    with pytest.raises(UnsupportedOpsError, match="fixed-point range"):
        build_ir(Fill(), (torch.randn(2, 5), torch.ones(2, 5, dtype=torch.long)), public_inputs=("mask",))


def test_mask_added_before_scaling(seed):
    class Scaled(nn.Module):
        def forward(self, s, mask):
            return torch.softmax((s + (1.0 - mask[:, None, :]) * -10000.0) / 8.0, -1)

    s, mask = torch.randn(2, 4, 4) * 8, torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    graph = build_ir(Scaled(), (s, mask), preset="exact", public_inputs=("mask",))
    assert [n.op for n in graph if n.secret] == ["input", "scale", "softmax"]
    assert torch.allclose(float_interp.run(graph, (s, mask))[0].float(), Scaled()(s, mask), atol=1e-6)


def test_constant_all_ones_mask_is_dropped(seed):
    class Attn(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(4, 4).bool())

    graph = build_ir(Attn(), (torch.randn(1, 2, 4, 8),), preset="exact")
    assert [len(n.inputs) for n in graph if n.op == "softmax"] == [1]


def test_causal_sdpa_gets_a_constant_mask(seed):
    class Causal(nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    q = torch.randn(1, 2, 4, 8)
    graph = build_ir(Causal(), (q,), preset="exact")
    (sm,) = [n for n in graph if n.op == "softmax"]
    assert graph[sm.inputs[1]].op == "constant"
    assert torch.allclose(float_interp.run(graph, (q,))[0].float(), Causal()(q), atol=1e-5)


# -- verifier and pass manager ----------------------------------------------------------


def small_graph() -> Graph:
    g = Graph(weights={"w": torch.randn(3, 4)}, inputs=["x"], outputs=["y"])
    g.add(Node("x", "input", [], {"name": "x", "kind": "float"}, (2, 4), "f32", True))
    g.add(Node("w", "weight", [], {"name": "w"}, (3, 4), "f32", True))
    g.add(Node("y", "linear", ["x", "w"], {}, (2, 3), "f32", True))
    return g


def test_verifier_lists_every_problem(seed):
    g = small_graph()
    g.verify()
    g["y"].shape = (2, 5)
    g.add(Node("z", "matmul", ["y", "nope"], {}, (2, 2)))
    g.add(Node("c", "constant", [], {"value": torch.ones(2)}, (2,), "f32", secret=True))
    with pytest.raises(VerifyError) as info:
        g.verify()
    msgs = [p.what for p in info.value.items]
    assert any("shape (2, 5) but inputs give (2, 3)" in m for m in msgs)
    assert any("undefined" in m for m in msgs) and any("constants are public" in m for m in msgs)


def test_pass_manager_names_the_pass_that_broke_the_graph(seed):
    def break_shapes(graph: Graph) -> Graph:
        """Corrupt a shape (test only)."""
        graph["y"].shape = (7,)
        return graph

    def keep(graph: Graph) -> Graph:
        """Do nothing."""
        return graph

    with pytest.raises(VerifyError, match="after pass 'break_shapes'") as info:
        PassManager([keep, break_shapes, keep]).run(small_graph())
    assert info.value.pass_name == "break_shapes"


def test_register_pass_rejects_duplicates_and_undocumented(seed):
    with pytest.raises(registry.DuplicatePassError):
        registry.register_pass("fold_public")(lambda g: g)

    def undocumented(g):
        return g

    with pytest.raises(ValueError, match="docstring"):
        registry.register_pass("sftest_undocumented")(undocumented)


def test_plugin_passes_load_from_entry_points(seed, tmp_path, monkeypatch):
    (tmp_path / "sftest_plugin.py").write_text(textwrap.dedent('''
        from secformer_compiler.passes import register_pass

        @register_pass("sftest_count_nodes")
        def count_nodes(graph, tag="n"):
            """Record the node count in graph.meta (test plugin)."""
            graph.meta[tag] = len(graph)
            return graph
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("sftest", "sftest_plugin", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.delitem(registry.PASSES, "sftest_count_nodes", raising=False)
    try:
        graph = PassManager(["sftest_count_nodes"], {"sftest_count_nodes": {"tag": "count"}}).run(small_graph())
        assert graph.meta["count"] == 3
    finally:
        registry.PASSES.pop("sftest_count_nodes", None)
        sys.modules.pop("sftest_plugin", None)


def test_unknown_pass_lists_registered(seed, monkeypatch):
    monkeypatch.setattr(registry, "_plugins_loaded", True)
    with pytest.raises(CompileError, match="no pass named 'nope'.*fold_public"):
        registry.get_pass("nope")


# -- op tables --------------------------------------------------------------------------


def test_every_op_has_a_float_reference():
    assert float_interp.missing_rules() == []
    assert set(float_interp.REFERENCE) == set(OPS)


# -- approximation presets --------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_exact():
    torch.manual_seed(0)
    inputs = text_inputs({1: 5})
    return compile_until(tiny_bert_layer(), inputs, "lower_to_mpc")


def methods(graph: Graph) -> dict[str, str]:
    return {n.op: n.attrs["method"] for n in graph if "method" in n.attrs and n.op != "tanh"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_attach_methods_and_params(bert_exact, preset):
    from secformer_compiler.passes.approximate import approximate

    graph = approximate(bert_exact, preset=preset)
    assert methods(graph) == {op: PRESETS[preset][op] for op in ("gelu", "layernorm", "softmax")}
    for n in graph:
        if n.op in ("gelu", "layernorm", "softmax"):
            spec = graph.meta["approximations"][n.name]
            assert n.attrs["params"] == dict(spec.params)
    assert "method" not in next(iter(bert_exact)).attrs  # the input graph is left as it was


def test_overrides_and_calibration(bert_exact):
    from secformer_compiler.passes.approximate import approximate

    graph = approximate(bert_exact, preset="secformer", overrides={"softmax": "puma", "layer_norm_1": "layernorm.crypten"})
    assert methods(graph)["softmax"] == "softmax.puma"
    assert graph["layer_norm_1"].attrs["method"] == "layernorm.crypten"
    assert graph["layer_norm"].attrs["method"] == "layernorm.secformer"
    wide = approximate(bert_exact, preset="secformer")["layer_norm"].attrs["params"]
    narrow = approximate(bert_exact, preset="secformer", calibration={"layer_norm": (0.5, 2.0)})
    assert narrow["layer_norm"].attrs["params"]["iterations"] < wide["iterations"]
    with pytest.raises(CompileError, match="unknown preset"):
        approximate(bert_exact, preset="fast")
    with pytest.raises(CompileError, match="neither a preset"):
        approximate(bert_exact, overrides={"softmax": "quick"})
    with pytest.raises(CompileError, match="does not approximate"):
        approximate(bert_exact, overrides={"gelu": "softmax.puma"})


def test_check_override_accepts_presets_and_registered_approximations(monkeypatch):
    """The CLI's early check (`check_override`) uses the registry the pass uses: presets,
    `<op>.exact`, any registered approximation of the op (a plugin's too), nothing else."""
    from secformer_compiler.approx import APPROXIMATIONS, get_approx
    from secformer_compiler.passes.approximate import check_override

    for op, method in (("gelu", "puma"), ("gelu", "gelu.exact"), ("gelu", "gelu.secformer_erf"),
                       ("softmax", "softmax.2quad")):
        check_override(op, method)
    with pytest.raises(CompileError, match="'relu' is not one of"):
        check_override("relu", "gelu.secformer")
    with pytest.raises(CompileError, match="neither a preset"):
        check_override("gelu", "softmax.2quad")  # another op's approximation
    with pytest.raises(CompileError, match="neither a preset"):
        check_override("gelu", "gelu.mine")
    # what a plugin registers becomes selectable (the registry is the one source of names)
    monkeypatch.setitem(APPROXIMATIONS, "gelu.mine", get_approx("gelu.secformer").derive(
        name="gelu.mine", declared_max_abs_err=1.5e-4))
    check_override("gelu", "gelu.mine")
