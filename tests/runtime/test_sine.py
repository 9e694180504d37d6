"""Secure sine series: accuracy against float64, declared cost, fresh masks, period checks."""

import math

import pytest
import torch

from secformer_compiler.runtime.engine import run_clear
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.messages import Protocol
from secformer_compiler.runtime.protocols import arith, compare
from secformer_compiler.runtime.protocols.sine import (
    _public_factors, bits_times_x, bits_times_x_cost, harmonics, sine_series, sine_series_cost,
    trig_of_mask, x_cos_series, x_cos_series_cost, x_sine_series, x_sine_series_cost)
from secformer_compiler.runtime.protocols.trunc import trunc, trunc_cost
from secformer_compiler.runtime.ring import FixedPoint

FX = FixedPoint(16)
COEFFS = [1.2, -0.3, 0.4, 0.05, -0.1]


@pytest.fixture(scope="module")
def cluster():
    return LocalCluster(FX)


def series(x, coeffs, period):
    return sum(b * torch.sin(2 * math.pi * k * x / period) for k, b in enumerate(coeffs, 1))


def test_sine_series_whole_ring_and_cost(cluster, seed):
    """Any x works (the series is periodic and d is opened mod P 2^f): sweep far past P."""
    period = 16
    x = torch.cat([torch.linspace(-40, 40, 2001, dtype=torch.float64),
                   torch.tensor([0.0, 8.0, -8.0, 16.0, 1000.5, -30000.25]),
                   torch.randn(500, dtype=torch.float64) * 10])
    shape = x.shape

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, shape)
        y = yield from sine_series(ctx, s, COEFFS, period)
        return (yield from arith.reveal(ctx, y))

    o0, o1, stats = cluster.run(program, (FX.encode(x),), (None,))
    assert torch.equal(o0, o1)
    got = FX.decode(o0, 32)  # 2f fractional bits
    want = series(x, COEFFS, period)
    err = (got - want).abs().max().item()
    print(f"sine_series max err {err:.2e}")
    # encoding: 2^-17 per public factor and per dealer share, 5 terms: < 5 * 2 * 2^-17 * 1.2
    assert err < 1e-4
    clear, counter = run_clear(program, FX.encode(x), fxp=FX)
    assert (FX.decode(clear, 32) - want).abs().max() < 1e-4
    declared = arith.share_cost(shape) + sine_series_cost(shape, period) + arith.reveal_cost(shape)
    assert stats.rounds == counter.rounds == declared.rounds == 3
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(shape).bytes
    assert sine_series_cost(shape, period).bytes == 4 * x.numel()  # a 20-bit value as int32


def test_x_sine_series_and_bit_products(cluster, seed):
    """x (c + series) in one 8-byte opening; b * x reuses that opening (1 bit per element)."""
    period = 16
    x = torch.cat([torch.linspace(-6, 6, 1201, dtype=torch.float64),
                   torch.randn(300, dtype=torch.float64) * 3])
    shape = x.shape

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, shape)
        y, opened = yield from x_sine_series(ctx, s, COEFFS, period, const=0.5, bit_masks=1)
        y = yield from trunc(ctx, y, 2 * ctx.f)
        neg = yield from compare.msb(ctx, s)
        (bx,) = yield from bits_times_x(ctx, opened, [neg])  # min(x, 0)
        return (yield from arith.reveal(ctx, y)), (yield from arith.reveal(ctx, bx))

    (y0, b0), (y1, b1), stats = cluster.run(program, (FX.encode(x),), (None,))
    assert torch.equal(y0, y1) and torch.equal(b0, b1)
    want = x * (0.5 + series(x, COEFFS, period))
    # the series' encoding error (< 1e-4, measured 4e-5 above) is multiplied by x
    err = ((FX.decode(y0) - want).abs() / (1 + x.abs())).max().item()
    print(f"x_sine_series max err / (1 + |x|) {err:.2e}")
    assert err < 1e-4
    assert (FX.decode(b0) - x.clamp(max=0)).abs().max() < 2 ** -16
    (cy, cb), counter = run_clear(program, FX.encode(x), fxp=FX)
    assert ((FX.decode(cy) - want).abs() / (1 + x.abs())).max() < 1e-4
    assert (FX.decode(cb) - x.clamp(max=0)).abs().max() < 2 ** -16
    from secformer_compiler.runtime.protocols.trunc import trunc_cost
    declared = (arith.share_cost(shape) + x_sine_series_cost(shape) + trunc_cost(shape)
                + compare.msb_cost(shape) + bits_times_x_cost([shape]) + arith.reveal_cost(shape)
                + arith.reveal_cost(shape))
    assert stats.rounds == counter.rounds == declared.rounds
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(shape).bytes


def cos_series(x, coeffs, period):
    return sum(g * torch.cos(2 * math.pi * k * x / period) for k, g in enumerate(coeffs, 1))


@pytest.mark.parametrize("frac", [16, 20])
def test_x_cos_series_and_bit_products(cluster, seed, frac):
    """const + x/2 + a cosine series in one 8-byte opening, for any x in the ring's range
    (the series is periodic; x/2 is exact), and b * x reusing that opening. frac: the
    dealt sines' and the public factors' fractional bits (GeLU's even form uses f + 4)."""
    period, coeffs = 16, [-5.2, 2.7, -1.9, 0.9, -0.4]  # GeLU-like sizes, alternating signs
    x = torch.cat([torch.linspace(-6, 6, 1201, dtype=torch.float64),
                   torch.randn(300, dtype=torch.float64) * 3,
                   torch.tensor([1000.25, -1000.5, 8.0, -8.0, 0.0], dtype=torch.float64)])
    x = FX.decode(FX.encode(x))  # the reference at the encoded x (the series' slope is ~8)
    shape = x.shape
    shift = 2 * frac - 16

    def program(ctx, xv):
        s = yield from arith.share(ctx, xv, 0, shape)
        y, opened = yield from x_cos_series(ctx, s, coeffs, period, const=3.9, x_coef=0.5,
                                            trig_frac=frac, scale_frac=frac, bit_masks=1)
        y = yield from trunc(ctx, y, shift)
        neg = yield from compare.msb(ctx, s)
        (bx,) = yield from bits_times_x(ctx, opened, [neg])  # min(x, 0)
        return (yield from arith.reveal(ctx, y)), (yield from arith.reveal(ctx, bx))

    (y0, b0), (y1, b1), stats = cluster.run(program, (FX.encode(x),), (None,))
    assert torch.equal(y0, y1) and torch.equal(b0, b1)
    want = 3.9 + x / 2 + cos_series(x, coeffs, period)
    err = (FX.decode(y0) - want).abs().max().item()
    print(f"x_cos_series frac={frac} max err {err:.2e}")
    # rounding: sum|gamma| (11.1) * 2^-(frac+1) for the dealt cosines, as much for the
    # public factors, plus the final truncation's unit
    bound = 2 * sum(abs(g) for g in coeffs) * 2.0 ** -(frac + 1) + 2.0 ** -15
    assert err < bound
    assert (FX.decode(b0) - x.clamp(max=0)).abs().max() < 2 ** -16
    (cy, cb), counter = run_clear(program, FX.encode(x), fxp=FX)
    assert (FX.decode(cy) - want).abs().max() < bound
    declared = (arith.share_cost(shape) + x_cos_series_cost(shape) + trunc_cost(shape)
                + compare.msb_cost(shape) + bits_times_x_cost([shape]) + arith.reveal_cost(shape)
                + arith.reveal_cost(shape))
    assert stats.rounds == counter.rounds == declared.rounds
    assert stats.bytes_sent[1] == declared.bytes - arith.share_cost(shape).bytes


def test_x_cos_series_deals_half_of_x_sine_series(cluster):
    """The even form's point: 2K dealt values per element (sin, cos of the mask) where the
    product form deals 4K (also a S_k, a C_k); both plus the bit product's 2."""
    n, k = 4096, 7
    coeffs = [0.1] * k
    sizes = {}
    for name, fn in (("cos", x_cos_series), ("sine", x_sine_series)):
        def program(ctx, xv, fn=fn):
            s = yield from arith.share(ctx, xv, 0, (n,))
            kw = dict(trig_frac=20, scale_frac=20) if fn is x_cos_series else {}
            y, _ = yield from fn(ctx, s, coeffs, 16, bit_masks=1, **kw)
            return (yield from arith.reveal(ctx, y))
        *_, stats = cluster.run(program, (torch.zeros(n, dtype=torch.int64),), (None,))
        sizes[name] = stats.dealer_bytes
    assert sizes["cos"] < 8 * n * (2 * k + 2) * 1.01 and sizes["sine"] > 8 * n * (4 * k + 2)


def test_x_cos_series_refuses_an_inexact_linear_term():
    def program(ctx, xv):
        return (yield from x_cos_series(ctx, xv, [0.1], 16, x_coef=0.3))
    with pytest.raises(ValueError, match="x_coef"):
        run_clear(program, torch.zeros(3, dtype=torch.int64))


def _spy(gen: Protocol, log: list) -> Protocol:
    """Pass a protocol's rounds through, recording what each round opened."""
    try:
        msgs = next(gen)
        while True:
            reply = yield msgs
            log.append(reply)
            msgs = gen.send(reply)
    except StopIteration as stop:
        return stop.value


def test_mask_is_fresh_per_call(cluster):
    """The same x opened twice gives unrelated d: a fresh mask t per call."""
    x = FX.encode(torch.full((64,), 1.5, dtype=torch.float64))
    logs: dict = {}

    def program(ctx, xv):
        log = logs.setdefault(ctx.party, [])
        s = yield from arith.share(ctx, xv, 0, (64,))
        yield from _spy(sine_series(ctx, s, COEFFS, 16), log)
        yield from _spy(sine_series(ctx, s, COEFFS, 16), log)
        return None

    cluster.run(program, (x,), (None,))
    for party in (0, 1):
        d1, d2 = (r[0][0] for r in logs[party])
        assert d1.max() < 2 ** 20 and d1.min() >= 0  # opened mod M = 16 * 2^16
        assert (d1 != d2).float().mean() > 0.9
    assert torch.equal(logs[0][0][0][0], logs[1][0][0][0])  # both parties see the same d


@pytest.mark.parametrize("period", [20, 12, 0])
def test_period_must_be_power_of_two(period):
    def program(ctx, xv):
        return (yield from sine_series(ctx, xv, COEFFS, period))
    with pytest.raises(ValueError, match="power of two"):
        run_clear(program, torch.zeros(3, dtype=torch.int64))



def test_harmonics_match_direct_sin_cos():
    """The angle-addition recurrence against torch's sin/cos of k theta, over the whole
    circle and k up to 32 (its error grows ~2 ulp per step); and the integer factors it
    feeds equal the direct rounding on a million angles (a difference needs an exact value
    within ~1e-14 of a rounding tie)."""
    theta = torch.rand(20000, dtype=torch.float64) * (2 * math.pi)
    for k, (s, c) in enumerate(harmonics(theta, 32), 1):
        assert torch.allclose(s, torch.sin(k * theta), rtol=0, atol=1e-13), k
        assert torch.allclose(c, torch.cos(k * theta), rtol=0, atol=1e-13), k
    mb, f = 20, 16
    d = torch.randint(-2 ** 62, 2 ** 62, (1 << 20,))
    dm = (d & ((1 << mb) - 1)).to(torch.float64) * (2 * math.pi / (1 << mb))
    us, vs = _public_factors(d, COEFFS, mb, f)
    trig = trig_of_mask(d, len(COEFFS), mb, f)
    for k, b in enumerate(COEFFS, 1):
        assert torch.equal(us[k - 1], torch.round(b * 2.0 ** f * torch.sin(k * dm)).to(torch.int64))
        assert torch.equal(vs[k - 1], torch.round(b * 2.0 ** f * torch.cos(k * dm)).to(torch.int64))
        assert torch.equal(trig[k - 1], torch.round(2.0 ** f * torch.sin(k * dm)).to(torch.int64))
        assert torch.equal(trig[len(COEFFS) + k - 1], torch.round(2.0 ** f * torch.cos(k * dm)).to(torch.int64))
