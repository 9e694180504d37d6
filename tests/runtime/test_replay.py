"""The dealer replays a recorded request list, and a party its recorded prepare pass: same
correction stream byte for byte as re-running the program on meta tensors, fresh masks on
every run, and nothing recorded for a program that fixes operands (the weight loading)."""

from __future__ import annotations

import torch

from secformer_compiler.runtime.context import DEALER, DEALER_MODE, Context
from secformer_compiler.runtime.correlations import DealerCorrelations
from secformer_compiler.runtime.engine import Engine, plan_key
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.prg import PRG, new_seed
from secformer_compiler.runtime.protocols import arith, compare
from secformer_compiler.runtime.protocols.trunc import trunc
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)


def _program(ctx, x, w, shape):
    """Shares x (P0) and w (P1), multiplies, truncates, compares and multiplies by a bit:
    Beaver triples, truncation pairs, the carry tree's XOR triples and a b2a."""
    xs = yield from arith.share(ctx, x, 0, shape)
    ws = yield from arith.share(ctx, w, 1, shape)
    y = yield from trunc(ctx, (yield from arith.mul(ctx, xs, ws)))
    neg = yield from compare.msb(ctx, y)
    (z,) = yield from compare.bit_mul(ctx, [neg], y)
    return (yield from arith.reveal(ctx, z))


def _dealer(s0: bytes, s1: bytes):
    corr = DealerCorrelations(PRG(s0), PRG(s1))
    ctx = Context(DEALER, DEALER_MODE, corr, FX, "exact")
    return ctx, Engine(ctx)


def test_replay_streams_the_same_bytes_as_a_meta_run():
    s0, s1 = new_seed(), new_seed()
    (ca, ea), (cb, eb) = _dealer(s0, s1), _dealer(s0, s1)
    meta = torch.empty((4, 6), dtype=torch.int64, device="meta")
    log = ca.corr.start_recording()
    ea.run(_program(ca, meta, meta, (4, 6)))
    ca.corr.stop_recording()
    eb.run(_program(cb, meta, meta, (4, 6)))
    first = ca.corr.take_corrections()
    assert torch.equal(first, cb.corr.take_corrections()) and len(log) > 5
    for _ in range(2):  # replayed (a) and re-run (b): the same draws, in the same order
        ca.corr.replay(log)
        eb.run(_program(cb, meta, meta, (4, 6)))
        again = ca.corr.take_corrections()
        assert torch.equal(again, cb.corr.take_corrections())
        assert again.numel() == first.numel() and not torch.equal(again, first)  # fresh masks


def test_cluster_replays_and_stays_correct(seed):
    cluster = LocalCluster(FX)
    gen = torch.Generator().manual_seed(seed)
    dealer, p0 = cluster.roles[2], cluster.roles[0]
    for i in range(3):
        x = torch.randn(5, 7, generator=gen, dtype=torch.float64) * 4
        w = torch.randn(5, 7, generator=gen, dtype=torch.float64)
        o0, o1, st = cluster.run(_program, (FX.encode(x), None, (5, 7)), (None, FX.encode(w), (5, 7)))
        assert torch.equal(o0, o1)
        want = torch.where(x * w < 0, x * w, torch.zeros_like(x))
        assert (FX.decode(o0) - want).abs().max() < 1e-3, f"run {i}"
        assert len(dealer._plans) == 1 and len(p0._plans) == 1  # recorded once, then replayed
        assert st.replayed == {0: i > 0, 1: i > 0, 2: i > 0}
    # another shape is another plan
    x = FX.encode(torch.ones(2, 3, dtype=torch.float64))
    o0, _, _ = cluster.run(_program, (x, None, (2, 3)), (None, x, (2, 3)))
    assert (FX.decode(o0)).abs().max() == 0 and len(dealer._plans) == 2


def test_loading_is_not_recorded(seed):
    cluster = LocalCluster(FX)
    w = FX.encode(torch.ones(3, 3, dtype=torch.float64))

    def load(ctx, w):
        yield from arith.fix_operand(ctx, w, "w")

    cluster.run(load, (w,), (w,))
    assert cluster.roles[2]._plans == {}


def test_plan_key_is_shapes_and_identity():
    def prog(ctx, x):
        yield []

    a = torch.zeros(2, 3, dtype=torch.int64)
    assert plan_key(prog, (a, 4)) == plan_key(prog, (torch.ones(2, 3, dtype=torch.int64), 4))
    assert plan_key(prog, (a, 4)) != plan_key(prog, (a, 5))
    assert plan_key(prog, (a,)) != plan_key(prog, (torch.zeros(3, 2, dtype=torch.int64),))
    assert plan_key(prog, ({"x": a},)) != plan_key(prog, ({"y": a},))
    assert plan_key(prog, ([1],)) is not None
    assert plan_key(prog, (bytearray(b"x"),)) is None  # unhashable: not recorded


def test_a_graph_argument_is_keyed_by_its_fingerprint():
    """A process cluster unpickles a fresh copy of the graph for every request: the copy must
    find the recorded offline pass (Graph.fingerprint), and a changed graph must not."""
    import pickle

    import secformer_compiler as sc

    def prog(ctx, graph, x):
        yield []

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU()).eval()
    g = sc.compile(model, (torch.randn(2, 4),)).graph
    x = torch.zeros(2, 4, dtype=torch.int64)
    copy = pickle.loads(pickle.dumps(g))
    assert copy is not g and plan_key(prog, (copy, x)) == plan_key(prog, (g, x))
    node = next(n for n in copy if n.op == "gelu")
    node.attrs["params"] = {**node.attrs["params"], "threshold": 3.5}
    assert plan_key(prog, (copy, x)) != plan_key(prog, (g, x))
