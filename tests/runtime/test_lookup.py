"""The one-round table lookup and the table-seeded reciprocal: both runtimes, whole range, cost."""

import math

import numpy as np
import pytest
import torch

from secformer_compiler.approx.table_seed import (choose_table_reciprocal, reciprocal_table,
                                                  table_reciprocal_error)
from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.protocols.goldschmidt import prescale_const
from secformer_compiler.runtime.protocols.lookup import (
    lookup, lookup_cost, reciprocal_table_core, reciprocal_table_core_cost, reciprocal_table_out_k,
    table_fracs)
from secformer_compiler.runtime.protocols.trunc import begin_rescale, finish, trunc_cost
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)


@pytest.fixture(scope="module")
def cluster():
    return LocalCluster(FX)


@pytest.mark.parametrize("bits,shift", [(4, 0), (10, 33), (12, 20), (16, 48)])
def test_lookup_reads_the_index_or_the_one_below(cluster, bits, shift):
    """Every index of the table is reached (signed values across the ring, both edges), and
    the result is table[floor(x / 2^shift)] or table[floor(x / 2^shift) - 1], mod 2^bits."""
    size = 1 << bits
    table = torch.randint(-2 ** 62, 2 ** 62, (size,), dtype=torch.int64)
    hi = torch.arange(size, dtype=torch.int64)  # every index, as the top bits of x
    if bits > 12:  # (elements x 2^bits table entries) stays small: both ends and a sample
        hi = torch.cat([hi[:64], hi[-64:], hi[torch.randint(0, size, (256,))]])
    low = torch.randint(0, 1 << shift, hi.shape, dtype=torch.int64) if shift else torch.zeros_like(hi)
    # signed values: high parts from -2^(bits-1) up, plus negative and ring-edge inputs
    x = torch.cat([((hi - size // 2) << shift) + low, torch.tensor([-1, 0, 2 ** 63 - 1, -2 ** 63])])
    shape = tuple(x.shape)

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, shape)
        t = yield from lookup(ctx, s, shift, bits, table)
        return (yield from arith.reveal(ctx, t))

    o0, o1, stats = cluster.run(program, (x,), (None,))
    assert torch.equal(o0, o1)
    idx = (x >> shift) & (size - 1)
    ok = (o0 == table[idx]) | (o0 == table[(idx - 1) & (size - 1)])
    assert ok.all()
    clear, counter = run_clear(program, x, fxp=FX)
    assert torch.equal(clear, table[idx])  # the simulator's P1 share is 0: no carry
    declared = arith.share_cost(shape) + lookup_cost(shape, bits) + arith.reveal_cost(shape)
    assert stats.rounds == counter.rounds == declared.rounds
    assert stats.bytes_sent[0] == declared.bytes


def test_lookup_opens_a_uniform_index(cluster):
    """What is opened is idx + r mod 2^bits with a fresh uniform r: for a constant input the
    opened values spread over the whole table (chi-square on 4096 lookups of 16 entries),
    and a second run on the same input opens different values."""
    bits, n = 4, 4096
    x = torch.full((n,), 5 << 20, dtype=torch.int64)
    opened = []

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, (n,))
        gen = lookup(ctx, s, 20, bits, torch.arange(16, dtype=torch.int64))
        msgs = next(gen)  # the lookup's one round: record what this party receives
        reply = yield msgs
        if ctx.party == 0:
            opened.append(reply[0][0].clone())
        try:
            gen.send(reply)
        except StopIteration as stop:
            t = stop.value
        return (yield from arith.reveal(ctx, t))

    for _ in range(2):
        o0, _, _ = cluster.run(program, (x,), (None,))
        assert ((o0 == 5) | (o0 == 4)).all()
    assert len(opened) == 2
    counts = torch.bincount(opened[0].reshape(-1).to(torch.int64), minlength=16).double()
    chi2 = (((counts - n / 16) ** 2) / (n / 16)).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: p < 1e-5 above 44
    assert not torch.equal(opened[0], opened[1])


@pytest.mark.parametrize("lo,hi", [(150.0, 2000.0), (1000.0, 8000.0), (20.0, 2000.0)])
def test_reciprocal_table_over_its_range(cluster, lo, hi):
    """The chosen table and steps meet 1e-4 over [lo, hi] in 2PC and the simulator, match
    the float reference's bound (both carries), and cost what the formula says."""
    choice = choose_table_reciprocal(lo, hi, 1e-4, headroom=1.0)
    assert choice is not None
    p, bits, steps = choice.prescale, choice.table_bits, choice.iterations
    mult, shift = prescale_const(p)
    x = torch.cat([torch.from_numpy(np.geomspace(lo, hi, 3000)),
                   lo * (hi / lo) ** torch.rand(1000, dtype=torch.float64)])
    shape = tuple(x.shape)
    out_frac = 16 + shift + 3
    fu, _ = table_fracs(bits)

    def program(ctx, xv):
        y = yield from arith.share(ctx, xv, 0, shape)
        s = y * mult  # p y at f + shift bits
        u0 = begin_rescale(ctx, s, 16 + shift, fu)
        r = yield from reciprocal_table_core(ctx, s, 16 + shift, u0, mult, shift, bits, steps, out_frac)
        r = yield from finish(ctx, r)
        return (yield from arith.reveal(ctx, r))

    o0, o1, stats = cluster.run(program, (FX.encode(x),), (None,))
    assert torch.equal(o0, o1)
    clear, counter = run_clear(program, FX.encode(x), fxp=FX)
    xq = FX.decode(FX.encode(x))
    for out in (o0, clear):
        rel = ((out.double() / 2 ** out_frac) * xq - 1).abs().max().item()
        assert rel <= choice.achieved_err + 2e-5, (rel, choice)
    assert choice.achieved_err <= 1e-4
    assert table_reciprocal_error(lo, hi, p, bits, steps) == pytest.approx(choice.achieved_err)
    _check_core_cost(stats, counter, shape, steps,
                     reciprocal_table_core_cost(shape, bits, steps, "exact", 16 + shift - fu),
                     reciprocal_table_out_k(bits, shift, out_frac, "exact"))


def _check_core_cost(stats, counter, shape, steps, core, out_k):
    """Share, the core (the lookup and its steps), its result's truncation, the reveal: the
    declared cost is the transport's count."""
    declared = (arith.share_cost(shape) + core + (trunc_cost(shape) if out_k else arith.Cost())
                + arith.reveal_cost(shape))
    assert stats.rounds == counter.rounds == declared.rounds == 3 + 1 + steps
    assert stats.bytes_sent[0] == declared.bytes


def test_reciprocal_table_reference_never_overshoots_and_degrades_below_range():
    """Newton from the seed stays below 1/x everywhere in (0, 2/p); below the calibrated
    range the error grows smoothly instead of blowing up."""
    choice = choose_table_reciprocal(200.0, 2000.0, 1e-4)
    x = torch.from_numpy(np.geomspace(1.0, 2 / choice.prescale * 0.999, 20000))
    for carry in (0, 1):
        y = reciprocal_table(x, prescale=choice.prescale, table_bits=choice.table_bits,
                             iterations=choice.iterations, carry=carry)
        assert (y * x <= 1 + 1e-12).all()
        assert (y > 0).all()
    xs = torch.from_numpy(np.geomspace(5.0, 200.0, 500))  # down to lo / 40
    rels = [1 - reciprocal_table(xs, prescale=choice.prescale, table_bits=choice.table_bits,
                                 iterations=choice.iterations, carry=carry) * xs for carry in (0, 1)]
    worst = torch.maximum(*rels)
    assert worst[-1] <= 1e-4 and worst.max() < 0.12  # (1/(j + 1))^2 for the cell j read: j >= 2 here
    assert worst[0] > 1e-2  # it does degrade


def test_choose_table_reciprocal_prefers_fewer_rounds_then_a_smaller_table():
    narrow = choose_table_reciprocal(500.0, 2000.0, 1e-4)
    wide = choose_table_reciprocal(10.0, 2000.0, 1e-4)
    assert narrow.iterations == 1 and narrow.table_bits <= 10
    assert wide.iterations >= 2  # 1 step would need more than 11 bits there
    assert choose_table_reciprocal(1.0, 8192.0, 1e-4, max_rounds=2) is None
    with pytest.raises(ValueError, match="lo <= hi"):
        choose_table_reciprocal(10.0, 1.0, 1e-4)


@pytest.mark.parametrize("bits,steps,lo,half_exp", [(12, 1, 0.02, 0), (8, 2, 0.02, 3), (10, 1, 0.1, -2),
                                                     (6, 3, 0.05, 0)])
def test_rsqrt_table_core_over_its_range(cluster, bits, steps, lo, half_exp):
    """2^-half_exp / sqrt(w) for w in [lo, 1): within the seed's bound after the steps
    (|1 - w t^2| <= 1/(j + 1), then e -> 3e^2/4 + e^3/4; relative error about e/2) in 2PC and
    the simulator, and what rsqrt_table_core_cost says."""
    from secformer_compiler.runtime.protocols.lookup import rsqrt_table_core, rsqrt_table_core_cost, rsqrt_table_out_k

    w_frac, out_frac = 44, 28
    w = torch.cat([torch.from_numpy(np.geomspace(lo, 1 - 2 ** -20, 3000)),
                   lo + (1 - lo) * torch.rand(1000, dtype=torch.float64)])
    wi = torch.round(w * 2 ** w_frac).to(torch.int64)
    shape = tuple(w.shape)

    def program(ctx, wv):
        s = yield from arith.share(ctx, wv, 0, shape)
        r = yield from rsqrt_table_core(ctx, s, w_frac, bits, steps, half_exp, out_frac)
        r = yield from finish(ctx, r)
        return (yield from arith.reveal(ctx, r))

    o0, o1, stats = cluster.run(program, (wi,), (None,))
    assert torch.equal(o0, o1)
    clear, counter = run_clear(program, wi, fxp=FX)
    want = 2.0 ** -half_exp / torch.sqrt(wi.double() / 2 ** w_frac)
    e = 1.0 / (math.floor(lo * 2 ** bits) - 1 + 1) + 2.0 ** -10  # the seed's bound at lo
    for _ in range(steps):
        e = 0.75 * e * e + 0.25 * e ** 3
    for out in (o0, clear):
        rel = (out.double() / 2 ** out_frac / want - 1).abs().max().item()
        assert rel <= e / 2 + 2e-5, (rel, e)
    _check_core_cost(stats, counter, shape, steps, rsqrt_table_core_cost(shape, bits, steps, "exact", w_frac),
                     rsqrt_table_out_k(bits, half_exp, out_frac, "exact"))


def test_choose_table_rsqrt():
    """Fewest rounds, then the smallest table; an even exponent above headroom x hi; None
    where w's bits would pass 2^61 or the output's 15 significant bits (raw) would not hold."""
    from secformer_compiler.approx.table_seed import choose_table_rsqrt, ln_scale, table_rsqrt_error

    c = choose_table_rsqrt(0.69, 2.87, 768, 1e-4)
    assert c.iterations == 1 and c.table_exp % 2 == 0
    assert 2.0 ** c.table_exp > 2.87 * 1.5 * ln_scale(768) > 2.0 ** (c.table_exp - 2)
    assert table_rsqrt_error(0.69, 2.87, 768, c.table_exp, c.table_bits, 1) == pytest.approx(c.achieved_err)
    smaller = choose_table_rsqrt(0.69, 2.87, 768, 1e-4, max_rounds=1)
    assert smaller is None
    assert choose_table_rsqrt(0.3, 10.0, 768, 1e-4).iterations == 2  # ratio 33: two steps
    assert choose_table_rsqrt(0.05, 50.0, 768, 1e-4) is None  # ratio 1000: not within 3 steps
    assert choose_table_rsqrt(40.0, 180.0, 1024, 1e-4) is None  # 2f + 2j + E = 62
    assert choose_table_rsqrt(100.0, 700.0, 768, 1e-4) is None  # E = 12 > 10
