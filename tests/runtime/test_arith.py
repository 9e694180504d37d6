"""Sharing, opening, Beaver products, fixed operands and truncation, through every mode."""

import pytest
import torch

from secformer_compiler.runtime.context import clear_context
from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.protocols.trunc import trunc, trunc_cost
from secformer_compiler.runtime import ring as arith_ring
from secformer_compiler.runtime.ring import FixedPoint, SplitOperand

FX = FixedPoint(16)


@pytest.fixture(scope="module")
def cluster():
    return LocalCluster(FX)


def _both(cluster, program, x, y):
    """Run in 2PC (x owned by P0, y by P1) and in the clear; return decoded outputs and stats."""
    o0, o1, stats = cluster.run(program, (x, None), (None, y))
    assert torch.equal(o0, o1)
    clear, counter = run_clear(program, x, y)
    assert counter.rounds == stats.rounds
    return FX.decode(o0), FX.decode(clear), stats


def _prog(op, xs, ys, truncate=True):
    def program(ctx, x, y):
        a = yield from arith.share(ctx, x, 0, xs)
        b = yield from arith.share(ctx, y, 1, ys)
        z = yield from op(ctx, a, b)
        if truncate:
            z = yield from trunc(ctx, z)
        return (yield from arith.reveal(ctx, z))
    return program


@pytest.mark.parametrize("name,op,ref,xs,ys", [
    ("mul", arith.mul, torch.mul, (6, 7), (6, 7)),
    ("mul_broadcast", arith.mul, torch.mul, (3, 6, 7), (7,)),
    ("matmul", arith.matmul, torch.matmul, (5, 9), (9, 4)),
    ("bmm", arith.matmul, torch.matmul, (2, 3, 5, 9), (2, 3, 9, 4)),
])
def test_beaver_products_match_float(cluster, seed, name, op, ref, xs, ys):
    xf, yf = torch.randn(xs, dtype=torch.float64) * 4, torch.randn(ys, dtype=torch.float64) * 4
    got, clear, stats = _both(cluster, _prog(op, xs, ys), FX.encode(xf), FX.encode(yf))
    want = ref(xf, yf)
    k = xs[-1] if "matmul" in name or "bmm" in name else 1
    tol = (k + 1) * 2 ** -15 + 16 * 2 ** -16  # encoding error of the inputs plus 1 ulp of truncation
    assert (got - want).abs().max() <= tol
    assert (got - clear).abs().max() <= 2 ** -16  # 2PC equals the simulator up to truncation's 1 ulp
    # declared cost = counted cost: two input sharings, the product, the truncation, the reveal
    zshape = ref(torch.empty(xs), torch.empty(ys)).shape
    declared = (arith.share_cost(xs) + arith.share_cost(ys) + arith.beaver_cost(xs, ys)
                + trunc_cost(zshape) + arith.reveal_cost(zshape))
    assert stats.rounds == declared.rounds
    # P0 sends its input, P1 its input; each sends product/trunc/reveal traffic
    assert stats.bytes_sent[0] == declared.bytes - arith.share_cost(ys).bytes
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(xs).bytes


def test_square_and_fixed_operand(cluster, seed):
    xf = torch.randn(4, 8, dtype=torch.float64) * 3
    wf = torch.randn(8, 5, dtype=torch.float64)

    def program(ctx, x, w):
        a = yield from arith.share(ctx, x, 0, (4, 8))
        ws = yield from arith.share(ctx, w, 1, (8, 5))
        fw = yield from arith.fix_operand(ctx, ws, "w")
        sq = yield from trunc(ctx, (yield from arith.square(ctx, a)))
        outs = []
        for _ in range(2):  # the masked weight is reused; each call draws a fresh activation mask
            outs.append((yield from trunc(ctx, (yield from arith.matmul_fixed(ctx, a, fw)))))
        fg = yield from arith.fix_operand(ctx, ws[:4], "g")
        g = yield from trunc(ctx, (yield from arith.mul_fixed(ctx, a[:, :5], fg)))
        res = []
        for t in (sq, *outs, g):
            res.append((yield from arith.reveal(ctx, t)))
        return res

    o0, _, stats = cluster.run(program, (FX.encode(xf), None), (None, FX.encode(wf)))
    sq, m1, m2, g = (FX.decode(t) for t in o0)
    assert (sq - xf ** 2).abs().max() < 1e-3
    assert (m1 - xf @ wf).abs().max() < 1e-3 and (m2 - xf @ wf).abs().max() < 1e-3
    assert (g - xf[:, :5] * wf[:4]).abs().max() < 1e-3
    by_fixed = arith.beaver_fixed_cost((4, 8)).bytes
    assert by_fixed == 4 * 8 * 8  # only X - A is opened per inference


def test_fixed_mask_opened_once_differs_across_sessions(seed):
    """F = W - B must be masked by a uniform B: two sessions open different F for the same W."""
    w = FX.encode(torch.ones(4, 4, dtype=torch.float64))

    def program(ctx, w):
        ws = yield from arith.share(ctx, w, 0, (4, 4))
        fw = yield from arith.fix_operand(ctx, ws, "w")
        return fw.masked.value if isinstance(fw.masked, SplitOperand) else fw.masked

    f1 = LocalCluster(FX).run(program, (w,), (None,))[0]
    f2 = LocalCluster(FX).run(program, (w,), (None,))[0]
    assert not torch.equal(f1, f2)


@pytest.mark.parametrize("k", [1, 16, 32, 45])
def test_exact_truncation_whole_range(cluster, k):
    """|x| < 2^62: the result is floor(x / 2^k) or one less, never catastrophically wrong."""
    g = torch.Generator().manual_seed(k)
    mags = torch.randint(0, 62, (4000,), generator=g)
    x = (torch.rand(4000, generator=g, dtype=torch.float64) * 2.0 ** mags.double()).to(torch.int64)
    x = torch.where(torch.rand(4000, generator=g) < 0.5, -x, x)
    x = torch.cat([x, torch.tensor([0, 1, -1, 2 ** 62 - 1, -(2 ** 62) + 1, 2 ** k, -(2 ** k)])])

    shape = x.shape

    def program(ctx, x):
        s = yield from arith.share(ctx, x, 0, shape)
        t = yield from trunc(ctx, s, k)
        return (yield from arith.reveal(ctx, t))

    out, _, stats = cluster.run(program, (x,), (None,))
    floor = torch.div(x, 2 ** k, rounding_mode="floor")
    diff = out - floor
    assert diff.min() >= -1 and diff.max() <= 0
    assert stats.rounds == 3 and stats.bytes_sent[1] == trunc_cost(x.shape).bytes + 8 * x.numel()
    clear, _ = run_clear(program, x)
    assert torch.equal(clear, floor)  # the simulator truncates exactly (P1's share is zero)


def test_local_truncation_is_usually_right():
    ctx = clear_context(FX)
    x = FX.encode(torch.linspace(-100, 100, 1001, dtype=torch.float64))
    assert torch.equal(arith_trunc_local(ctx, x), torch.div(x, 2 ** 16, rounding_mode="floor"))


def arith_trunc_local(ctx, x):
    from secformer_compiler.runtime.protocols.trunc import trunc_local
    return trunc_local(ctx, x, 16)


def test_share_requires_owner_tensor(cluster):
    def program(ctx, x):
        return (yield from arith.share(ctx, x, 0, (3,)))
    with pytest.raises(ValueError, match="owner must pass"):
        cluster.run(program, (None,), (None,))


def test_dealer_streams_corrections_in_chunks(monkeypatch, seed):
    """With a tiny chunk size P1 pulls many chunks mid-program; results and counts are unchanged."""
    from secformer_compiler.runtime.correlations import DealerCorrelations
    monkeypatch.setattr(DealerCorrelations, "default_chunk_bytes", 64)
    xf = torch.randn(6, 7, dtype=torch.float64)
    prog = _prog(arith.mul, (6, 7), (6, 7))
    cluster = LocalCluster(FX)
    out, _, stats = cluster.run(prog, (FX.encode(xf), None), (None, FX.encode(xf)))
    assert (FX.decode(out) - xf * xf).abs().max() < 1e-3
    out2, _, _ = cluster.run(prog, (FX.encode(xf), None), (None, FX.encode(xf)))  # a second program
    assert (FX.decode(out2) - xf * xf).abs().max() < 1e-3
    assert stats.dealer_bytes > 64


def _fixed_program(ctx, x, w, load):
    """Load (share W, open W - B) in one program; use the fixed W in the next ones."""
    if load:
        ws = yield from arith.share(ctx, w, 1, (8, 5))
        ctx.state["fw"] = yield from arith.fix_operand(ctx, ws, "w_prep")
        ctx.state["fg"] = yield from arith.fix_operand(ctx, ws[0], "g_prep")
        return None
    a = yield from arith.share(ctx, x, 0, (4, 8))
    z = yield from trunc(ctx, (yield from arith.matmul_fixed(ctx, a, ctx.state["fw"])))
    g = yield from trunc(ctx, (yield from arith.mul_fixed(ctx, z, ctx.state["fg"])))
    zo = yield from arith.reveal(ctx, z)
    go = yield from arith.reveal(ctx, g)
    return [zo, go]


def test_prepared_fixed_products_equal_inline_ones(seed):
    """A party's offline pass (A_i @ F before the input) changes no output and no message count."""
    xf = torch.randn(4, 8, dtype=torch.float64) * 3
    wf = torch.randn(8, 5, dtype=torch.float64)
    x, w = FX.encode(xf), FX.encode(wf)
    outs = {}
    for auto in (True, False):
        c = LocalCluster(FX)
        for r in c.roles:
            r.auto_prepare = auto
        c.run(_fixed_program, (None, None, True), (None, w, True))
        o0, o1, stats = c.run(_fixed_program, (x, None, False), (None, None, False))
        assert all(torch.equal(a, b) for a, b in zip(o0, o1))
        outs[auto] = ([FX.decode(t) for t in o0], stats.rounds, stats.bytes_sent)
        if auto:  # the prepared products were all used, in order
            assert all(r.ctx.corr.prepared_left() == 0 for r in c.roles[:2])
        # the matmul operand's share was split into limbs once (in prepare, or at first use)
        # and kept as limbs only (they rebuild it exactly); the elementwise one was not split
        for r in c.roles[:2]:
            assert r.ctx.state["fw"].split is not None and r.ctx.state["fg"].split is None
            assert r.ctx.state["fw"].share is None and r.ctx.state["fg"].share is not None
        assert torch.equal(c.roles[0].ctx.state["fw"].share_value() + c.roles[1].ctx.state["fw"].share_value(), w)
        # so did the dealer with its mask B of the matmul weight (C = A @ B every inference)
        assert set(c.roles[2].ctx.corr._fixed_split) == {"w_prep"}
        assert c.roles[2].ctx.corr._fixed_values["w_prep"][0] is None
    (z, g), rounds, sent = outs[True]
    assert (z - xf @ wf).abs().max() < 1e-3
    assert (g - (xf @ wf) * wf[0]).abs().max() < 1e-2
    assert rounds == outs[False][1] and sent == outs[False][2]
    # independent masks, same fixed-point arithmetic: the results differ by truncation carries
    # only (<= 1 ulp each; the second product scales z's by |g|)
    ulp = 2 ** -16
    assert (outs[True][0][0] - outs[False][0][0]).abs().max() <= 2 * ulp
    assert (outs[True][0][1] - outs[False][0][1]).abs().max() <= 2 * ulp * (1 + wf[0].abs().max()) + 2 * ulp


def test_prepare_for_another_program_is_refused(seed):
    x, w = FX.encode(torch.ones(4, 8, dtype=torch.float64)), FX.encode(torch.ones(8, 5, dtype=torch.float64))
    c = LocalCluster(FX)
    c.run(_fixed_program, (None, None, True), (None, w, True))
    p0 = c.roles[0]
    p0.prepare(_fixed_program, x, None, False)  # two products prepared, then a load program runs
    with pytest.raises(RuntimeError, match="prepared fixed products"):
        p0.ctx.corr.fixed_product((3, 8), "w_prep", arith.ring_matmul)


def test_prepare_splits_matmul_weight_shares_before_the_request(seed):
    """The limb split of a fixed matmul operand's share is offline work: prepare does it."""
    x, w = FX.encode(torch.ones(4, 8, dtype=torch.float64)), FX.encode(torch.ones(8, 5, dtype=torch.float64))
    c = LocalCluster(FX)
    c.run(_fixed_program, (None, None, True), (None, w, True))
    p0 = c.roles[0]
    assert p0.ctx.state["fw"].split is None
    p0.prepare(_fixed_program, x, None, False)
    assert p0.ctx.state["fw"].split is not None and p0.ctx.state["fg"].split is None


@pytest.mark.parametrize("budget_mib,compact", [("0", True), ("1024", False)])
def test_weights_kept_compact_past_the_limb_budget(seed, monkeypatch, budget_mib, compact):
    """Past ring.limb_budget_bytes every matmul weight share (the parties') and mask (the
    dealer's) is kept as compact limbs, decided once for all of them; the products are the
    same function (within truncation carries of the float reference)."""
    monkeypatch.setattr(arith_ring, "_KERNEL", "limbs")
    monkeypatch.setenv(arith_ring.LIMB_BUDGET_ENV, budget_mib)
    xf = torch.randn(4, 8, dtype=torch.float64) * 3
    wf = torch.randn(8, 5, dtype=torch.float64)
    c = LocalCluster(FX)
    c.run(_fixed_program, (None, None, True), (None, FX.encode(wf), True))
    for _ in range(2):  # the second request reuses the kept operands
        o0, o1, _ = c.run(_fixed_program, (FX.encode(xf), None, False), (None, None, False))
        assert all(torch.equal(a, b) for a, b in zip(o0, o1))
        z, g = (FX.decode(t) for t in o0)
        assert (z - xf @ wf).abs().max() < 1e-3
        assert (g - (xf @ wf) * wf[0]).abs().max() < 1e-2
    for r in c.roles[:2]:
        assert r.ctx.state["fw"].split.compact is compact
    assert {r.operand_form() for r in c.roles} == {"limbs compact" if compact else "limbs"}
    assert c.roles[2].ctx.corr._fixed_split["w_prep"].compact is compact


def _square_program(ctx, x, w, load):
    """One fixed W used both as a matmul operand (kept as limbs) and elementwise."""
    if load:
        ws = yield from arith.share(ctx, w, 1, (5, 5))
        ctx.state["fw"] = yield from arith.fix_operand(ctx, ws, "w_both")
        return None
    a = yield from arith.share(ctx, x, 0, (5, 5))
    z = yield from trunc(ctx, (yield from arith.matmul_fixed(ctx, a, ctx.state["fw"])))
    g = yield from trunc(ctx, (yield from arith.mul_fixed(ctx, z, ctx.state["fw"])))
    return [(yield from arith.reveal(ctx, g))]


def test_fixed_operand_kept_as_limbs_still_serves_elementwise_products(seed):
    """After a matmul the parties and the dealer keep W's share and mask only as limbs; an
    elementwise product with the same W rebuilds them exactly (the result is right)."""
    xf = torch.randn(5, 5, dtype=torch.float64)
    wf = torch.randn(5, 5, dtype=torch.float64)
    x, w = FX.encode(xf), FX.encode(wf)
    c = LocalCluster(FX)
    c.run(_square_program, (None, None, True), (None, w, True))
    for _ in range(2):
        (g,), _, _ = c.run(_square_program, (x, None, False), (None, None, False))
        assert (FX.decode(g) - (xf @ wf) * wf).abs().max() < 1e-2
    assert all(r.ctx.state["fw"].share is None for r in c.roles[:2])
    assert c.roles[2].ctx.corr._fixed_values["w_both"][0] is None
