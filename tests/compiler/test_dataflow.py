"""The dataflow executor shares rounds between independent nodes and keeps a deterministic order."""

from types import SimpleNamespace

import torch

from secformer_compiler.dataflow import execute
from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.protocols.trunc import trunc
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)


def _graph():
    # a, b inputs; p = a*b and q = a*a are independent (share rounds); r = p*q depends on both
    n = SimpleNamespace
    return [n(name="p"), n(name="q"), n(name="r")], {"p": ["a", "b"], "q": ["a"], "r": ["p", "q"]}


def program(ctx, a, b):
    nodes, deps = _graph()

    def launch(node):
        v = values
        if node.name == "p":
            return _fmul(ctx, v["a"], v["b"])
        if node.name == "q":
            return _fmul(ctx, v["a"], v["a"])
        return _fmul(ctx, v["p"], v["q"])

    sa = yield from arith.share(ctx, a, 0, (5,))
    sb = yield from arith.share(ctx, b, 0, (5,))
    values = {"a": sa, "b": sb}
    yield from execute(nodes, deps, launch, values, tag=lambda n: n.name)
    return (yield from arith.reveal(ctx, values["r"]))


def _fmul(ctx, x, y):
    return (yield from trunc(ctx, (yield from arith.mul(ctx, x, y))))


def test_independent_nodes_share_rounds():
    a = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5], dtype=torch.float64)
    b = torch.tensor([2.0, 0.25, -4.0, 1.0, 1.0], dtype=torch.float64)
    out, _, stats = LocalCluster(FX).run(program, (FX.encode(a), FX.encode(b)), (None, None))
    assert (FX.decode(out) - a * b * a * a).abs().max() < 1e-3
    # 2 sharings + (p, q in parallel: 2 rounds) + r: 2 rounds + reveal = 7, not 9
    assert stats.rounds == 7
    assert set(stats.by_tag) >= {"p", "q", "r"}
    _, counter = run_clear(program, FX.encode(a), FX.encode(b))
    assert counter.rounds == 7
