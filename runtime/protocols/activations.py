"""GeLU variants (MPCFormer Quad, PUMA piecewise, CrypTen tanh form) and tanh (SecFormer-style
sine series, CrypTen), as 2PC protocols matching the float references in
`secformer_compiler.approx` (gelu.quad, gelu.puma, gelu.crypten, tanh.secformer, tanh.crypten).

Masked polynomials (`_Masked`). Each protocol draws all its masks in one dealer
correlation: a uniform ring mask m_v per secret v it will open, a uniform bit r_b per
XOR-shared bit b, and additive shares of every product of masks that its polynomials need.
Once e_v = v - m_v and c_b = b ^ r_b are open (both uniform: fresh one-time pads), every
polynomial in the secrets is local: (e + m)^k expands into public powers of e times
dealt monomials of m, and b = c + (1 - 2c) r_b. A product of any degree in any number of
opened secrets thus costs the rounds of their openings only; the limit is the ring (the
value at its summed scale must stay below 2^62 for the truncation that follows), which
is where the fractional-bit choices below come from. A value outside its branch (a
polynomial at x = 30, an exp of the wrong sign) may overflow: that is harmless because it
is multiplied by a 0 bit, exactly, in the ring.

Truncation: the masked-polynomial protocols (puma, crypten) hold values at 2^56..2^61,
where SecureML-style local truncation fails with probability ~|v|/2^63 per element, so
they always truncate exactly (trunc_exact); gelu_quad and tanh_secformer truncate values at
2f bits and follow the context's mode.

Costs per element and party at bits=64 (T = 1/8 byte: a truncation or a 1-bit opening;
msb64 = 6 rounds, 24.25 bytes). `*_cost` below; the tests check them against the transport:
    gelu_quad       2 rounds     8 +   T =   8.125 bytes
    gelu_puma       7 rounds    32 +  6T + 3 msb64 = 105.5   (polynomials in 4 rounds, hidden)
    tanh_secformer  7 rounds    12 +  3T + 2 msb64 =  60.875 (P = 16: a 20-bit sine opening)
    gelu_crypten   25 rounds   128 + 18T +   msb64 = 154.5   (exp_iterations = 9)
    tanh_crypten   22 rounds   136 + 17T +   msb64 = 154.25
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ...approx.gelu import PUMA_GELU_BREAKS, PUMA_GELU_LEFT, PUMA_GELU_MID
from ...approx.tanh import TANH_SINE_COEFFS, TANH_SINE_PERIOD, TANH_SINE_THRESHOLD
from ..context import Context
from ..correlations import RING, Dom
from ..messages import Protocol, open_add, open_xor, parallel
from ..ring import wrap
from .arith import numel, square, square_cost
from .compare import (b2a, b2a_cost, bit_mul, bit_mul_cost, gt_public, lt_public, msb, msb_cost,
                      not_bit)
from .cost import Cost, bits_bytes
from .sine import sine_series, sine_series_cost
from .trunc import trunc, trunc_cost, trunc_exact

Terms = Sequence[tuple[int, Mapping[str, int]]]  # sum of coef * prod(var ** exponent)


def _mul(a, b):
    """Product of public coefficients: Python ints are kept inside int64 (mod 2^64)."""
    if isinstance(a, int) and isinstance(b, int):
        return wrap(a * b)
    return a * b


class _Masked:
    """One protocol call's masks and dealt mask monomials (module docstring).

    ring / bits: names of the secrets / XOR-shared bits the call will open; polys: every
    polynomial it will evaluate (so the dealer knows which monomials to deal). `plan`
    holds named polynomials for the caller's convenience.
    """

    def __init__(self, ctx: Context, shape, ring: Sequence[str], bits: Sequence[str],
                 polys: Sequence[Terms]) -> None:
        self.ctx, self.shape = ctx, tuple(shape)
        self.names, self.nr = list(ring) + list(bits), len(ring)
        self.plan: dict[str, Terms] = {}
        self.public: dict[str, torch.Tensor] = {}
        keys = set()
        for terms in polys:
            for _, powers in terms:
                keys.update(self._expand(powers))
        singles = {self._key({v: 1}) for v in ring}  # a mask itself is a source: nothing to deal
        self.keys = sorted(keys - singles - {self._key({})})

        def derive(*src):
            out = []
            for key in self.keys:
                t = None
                for s, e in zip(src, key):
                    for _ in range(e):
                        t = s if t is None else t * s
                out.append(t)
            return out

        sources = [(shape, RING)] * self.nr + [(shape, Dom("xor", 1))] * len(bits)
        # every dealt value is a product of masks: zero when they are (the simulator skips it)
        got = ctx.corr.correlated(sources, derive, [RING] * len(self.keys), zero_at_zero=True)
        self.src = dict(zip(self.names, got[:len(self.names)]))
        self.dealt = dict(zip(self.keys, got[len(self.names):]))
        self.dealt.update({self._key({v: 1}): self.src[v] for v in ring})

    def _key(self, powers: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(powers.get(v, 0) for v in self.names)

    def _expand(self, powers: Mapping[str, int], coef=None) -> dict:
        """{mask monomial: public coefficient} of coef * prod(v ** k); coef None: keys only.

        A secret is e + m: (e + m)^k = sum_j C(k, j) e^(k-j) m^j. A bit is c + (1 - 2c) r.
        """
        cur = {(): coef}
        for i, v in enumerate(self.names):
            k = powers.get(v, 0)
            if i >= self.nr and k > 1:
                raise ValueError("a bit is its own square: use exponent 1")
            if coef is None or not k:
                parts = [(j, None if coef is None else 1) for j in range(k + 1)]
            elif i >= self.nr:
                c = self.public[v]
                parts = [(0, c), (1, 1 - 2 * c)]
            else:
                parts = [(j, _mul(math.comb(k, j), self._epow(v, k - j))) for j in range(k + 1)]
            nxt: dict = {}
            for key, cf in cur.items():
                for j, part in parts:
                    val = None if cf is None else _mul(cf, part)
                    nk = key + (j,)
                    nxt[nk] = val if nk not in nxt or val is None else nxt[nk] + val
            cur = nxt
        return cur

    def _epow(self, v: str, p: int):
        out = 1
        for _ in range(p):
            out = _mul(out, self.public[v])
        return out

    def open(self, ring: Mapping[str, torch.Tensor] | None = None,
             bits: Mapping[str, torch.Tensor] | None = None) -> Protocol:
        """Open v - m_v (8 bytes each) and b ^ r_b (1 bit each) in one round."""
        ring, bits = ring or {}, bits or {}
        gens = []
        if ring:
            gens.append(open_add(*[v - self.src[n] for n, v in ring.items()]))
        if bits:
            gens.append(open_xor(*[b ^ self.src[n] for n, b in bits.items()], bits=1))
        res = yield from parallel(*gens)
        self.public.update(zip(list(ring) + list(bits), [t for r in res for t in r]))

    def eval(self, terms: Terms) -> torch.Tensor:
        """This party's share of sum coef * prod(v ** k) over opened secrets (local)."""
        acc, const = self.ctx.zeros(self.shape), 0
        for coef, powers in terms:
            for key, cf in self._expand(powers, wrap(coef)).items():
                if any(key):
                    acc = acc + (wrap(cf) if isinstance(cf, int) else cf) * self.dealt[key]
                else:
                    const = const + cf
        return self.ctx.add_public(acc, wrap(const) if isinstance(const, int) else const)


def _open_cost(shape, ring: int = 0, bits: int = 0) -> Cost:
    return Cost(1, 8 * ring * numel(shape) + bits * bits_bytes(numel(shape), 1))


def _fixed(c: float, k: int) -> int:
    return round(c * 2.0 ** k)


# --- MPCFormer Quad ------------------------------------------------------------------------

def gelu_quad(ctx: Context, x: torch.Tensor, *,
              coeffs: Sequence[float] = (0.5, 0.25, 0.125)) -> Protocol:
    """c0 + c1 x + c2 x^2 (MPCFormer: 0.5 + 0.25 x + 0.125 x^2). Square, one truncation.

    The constants are folded into the truncation: 8 Quad = x^2 + 2x + 4 is formed at 2f
    fractional bits and shifted by f + 3 (exact integers for dyadic constants, else
    rounded at 2^-20). |x| < 2^14 keeps it below 2^62.
    """
    f = ctx.f
    k = next((k for k in range(21) if all((c * 2 ** k).is_integer() for c in coeffs)), 20)
    c0, c1, c2 = (_fixed(c, k) for c in coeffs)
    x2 = yield from square(ctx, x)
    z = ctx.add_public(c2 * x2 + (c1 << f) * x, wrap(c0 << (2 * f)))
    return (yield from trunc(ctx, z, f + k))


def gelu_quad_cost(shape, mode: str = "exact") -> Cost:
    return square_cost(shape) + trunc_cost(shape, mode)


# --- PUMA piecewise polynomial -------------------------------------------------------------

PUMA_FRAC = 24  # coefficient bits: the polynomials sit at 2f + 24 = 56 bits, |P| < 2^5


def _lt(ctx: Context, x, c: float, bits: int) -> Protocol:
    """[x < c] for the fixed-point x: x_int < c 2^f iff x_int < ceil(c 2^f)."""
    return lt_public(ctx, x, math.ceil(c * 2 ** ctx.f), bits)


def _gt(ctx: Context, x, c: float, bits: int) -> Protocol:
    return gt_public(ctx, x, math.floor(c * 2 ** ctx.f), bits)


def _puma_terms(coeffs: Sequence[float], f: int) -> list:
    """sum c_j x^j at 2f + PUMA_FRAC bits from x (f), x^2 (2f), x3 = trunc x^3 (f)."""
    mono = {0: ({}, 2 * f), 1: ({"x": 1}, f), 2: ({"x": 2}, 0), 3: ({"x3": 1}, f),
            4: ({"x": 1, "x3": 1}, 0), 6: ({"x3": 2}, 0)}
    terms = []
    for j, c in enumerate(coeffs):
        if c:
            if j not in mono:
                raise ValueError(f"PUMA GeLU: no x^{j} term in this protocol")
            powers, shift = mono[j]
            terms.append((_fixed(c, PUMA_FRAC) << shift, powers))
    return terms


def gelu_puma(ctx: Context, x: torch.Tensor, bits: int = 64, *,
              breaks: Sequence[float] = PUMA_GELU_BREAKS, left: Sequence[float] = PUMA_GELU_LEFT,
              mid: Sequence[float] = PUMA_GELU_MID) -> Protocol:
    """PUMA GeLU: 0 | left cubic | mid degree-6 | x, split at x < -4, x < -1.95, x > 3.

    Rounds: the 3 comparisons (msb, 6 rounds at bits=64) run alongside the polynomials (4
    rounds: open x -> x^2, x^3; truncate x^3; open x3 -> x^4 = x x3, x^6 = x3^2 and both
    polynomials at 2f + 24 bits; truncate), then one round opens P_L, P_M and the three
    masked segment bits and combines s_L P_L + s_M P_M + [x > 3] x (x reuses its mask).
    Segment bits are local XORs: s_L = [x < -4] ^ [x < -1.95], s_M = 1 ^ [x < -1.95] ^ [x > 3].
    Needs |x| < 2^(bits - 1 - f); the polynomials only need to be right on their segments.
    """
    f = ctx.f
    b0, b1, b2 = breaks
    pl, pm = _puma_terms(left, f), _puma_terms(mid, f)
    out_terms = [(1, {"sL": 1, "PL": 1}), (1, {"sM": 1, "PM": 1}), (1, {"sR": 1, "x": 1})]
    cube = [(1, {"x": 3})]
    M = _Masked(ctx, x.shape, ["x", "x3", "PL", "PM"], ["sL", "sM", "sR"],
                [cube, pl, pm, out_terms])

    def polys() -> Protocol:
        yield from M.open({"x": x})
        x3 = yield from trunc_exact(ctx, M.eval(cube), 2 * f)
        yield from M.open({"x3": x3})
        return (yield from parallel(trunc_exact(ctx, M.eval(pl), f + PUMA_FRAC),
                                    trunc_exact(ctx, M.eval(pm), f + PUMA_FRAC)))

    lo, l1, hi, (p_l, p_m) = yield from parallel(
        _lt(ctx, x, b0, bits), _lt(ctx, x, b1, bits), _gt(ctx, x, b2, bits), polys())
    s_m = not_bit(ctx, l1 ^ hi)
    yield from M.open({"PL": p_l, "PM": p_m}, {"sL": lo ^ l1, "sM": s_m, "sR": hi})
    return M.eval(out_terms)


def gelu_puma_cost(shape, bits: int = 64) -> Cost:
    t = trunc_cost(shape)
    polys = _open_cost(shape, 1) + t + _open_cost(shape, 1) + Cost(t.rounds, 2 * t.bytes)
    cmp = msb_cost(shape, bits)
    phase = Cost(max(cmp.rounds, polys.rounds), 3 * cmp.bytes + polys.bytes)
    return phase + _open_cost(shape, 2, 3)


# --- SecFormer-style tanh --------------------------------------------------------------------

def tanh_secformer(ctx: Context, x: torch.Tensor, coeffs: Sequence[float] = TANH_SINE_COEFFS,
                   period: int = TANH_SINE_PERIOD, threshold: float = TANH_SINE_THRESHOLD,
                   bits: int = 64) -> Protocol:
    """-1 | sum beta_k sin(2 pi k x / P) | +1 split at -T, T (spec tanh.secformer).

    The secure sine (one opening, mod P 2^f) and its truncation run alongside the two
    comparisons; then with m = 1 ^ [x < -T] ^ [x > T] and h = [x > T] (disjoint segments:
    m h = 0), tanh = m S + (1 - m)(2h - 1) = m (S + 1) + 2h - 1: a bit_mul and a b2a in
    one round.
    |x| < 2^(bits - 1 - f) for the comparisons; the sine takes any x.
    """
    f = ctx.f

    def series() -> Protocol:
        s = yield from sine_series(ctx, x, coeffs, period)
        return (yield from trunc(ctx, s, f))

    lo, hi, s = yield from parallel(_lt(ctx, x, -threshold, bits), _gt(ctx, x, threshold, bits),
                                    series())
    mid = not_bit(ctx, lo ^ hi)
    (ms,), hi_a = yield from parallel(bit_mul(ctx, [mid], ctx.add_public(s, 1 << f)), b2a(ctx, hi))
    return ctx.add_public(ms + (hi_a << (f + 1)), wrap(-(1 << f)))


def tanh_secformer_cost(shape, period: int = TANH_SINE_PERIOD, bits: int = 64, f: int = 16,
                        mode: str = "exact") -> Cost:
    series = sine_series_cost(shape, period, f) + trunc_cost(shape, mode)
    cmp = msb_cost(shape, bits)
    phase = Cost(max(cmp.rounds, series.rounds), 2 * cmp.bytes + series.bytes)
    return phase + (bit_mul_cost([shape], shape) | b2a_cost(shape))


# --- CrypTen: sigmoid by exp(-|z|) and Newton, for gelu (tanh form) and tanh ----------------

F_CHAIN = 30  # exp base u = 1 -+ z/2^n and its powers: u^2 at 60 bits, right while |u| < 2
F_CUBIC = 17  # exp result for Newton steps 1-2 (a cubic in E): 3 * 17 + 8 = 59 bits
# Newton from y0 = 3/4 for 1/d, d = 1 + E: y1 = 3/2 - 9/16 d, and
# y2 = 2 y1 - y1^2 d = (255 - 243 E + 189 E^2 - 81 E^3) / 256, exactly.
Y2_NUM = (255, -243, 189, -81)


def _check_sigmoid(exp_iterations: int, reciprocal_iterations: int, reciprocal_initial: float):
    if reciprocal_iterations != 3 or reciprocal_initial != 0.75 or exp_iterations < 2:
        raise ValueError("CrypTen sigmoid protocol: implemented for its defaults (3 Newton "
                         "steps from 0.75) and exp_iterations >= 2")


def _n_doubled(pre: int, cmp_rounds: int, per_square: int, n: int) -> int:
    """Squarings done on both exp chains before the sign is known: the fewest that minimise
    rounds (the select is folded into the first squaring after the comparison)."""
    total = [max(cmp_rounds, pre + per_square * k) + per_square * (n - k) for k in range(n)]
    return total.index(min(total))


def _signed(terms: Terms, extra: Mapping[str, int]) -> list:
    """(1 - 2 neg) * prod(extra) * terms."""
    out = []
    for c, pw in terms:
        out += [(c, {**extra, **pw}), (-2 * c, {"neg": 1, **extra, **pw})]
    return out


def _sigmoid_setup(ctx: Context, x: torch.Tensor, pre_rounds: int, bits: int, n: int,
                   extra: Mapping[str, Terms], extra_ring: Sequence[str]) -> tuple[_Masked, int]:
    """Masks and polynomials of the exp chains, the select, Newton 1-2 and the caller's `extra`.

    Chain secrets: p_j, m_j (squaring j of 1 - t and 1 + t, j <= k + 1), s_j (after the
    select); then Eh, Ec (E at two precisions) and y (y2 at f_y bits).
    """
    per = 1 + trunc_cost((1,)).rounds
    k = _n_doubled(pre_rounds, msb_cost((1,), bits).rounds, per, n)
    chain = [f"{s}{j}" for j in range(1, k + 2) for s in "pm"]
    chain += [f"s{j}" for j in range(k + 2, n + 1)]
    plan: dict[str, Terms] = {v: [(1, {v: 2})] for v in chain}
    p, m = f"p{k + 1}", f"m{k + 1}"
    # select-and-square: (u+ + neg (u- - u+))^2 = u+^2 + neg (u-^2 - u+^2), as neg^2 = neg
    plan["sel"] = [(1, {p: 2}), (1, {"neg": 1, m: 2}), (-1, {"neg": 1, p: 2})]
    plan["y2"] = [(c << ((3 - j) * F_CUBIC), {"Ec": j}) for j, c in enumerate(Y2_NUM)]
    plan.update(extra)
    M = _Masked(ctx, x.shape, [*extra_ring, *chain, "Eh", "Ec", "y"], ["neg"], list(plan.values()))
    M.plan = plan
    return M, k


def _sigmoid_run(ctx: Context, M: _Masked, k: int, n: int, f_y: int, f_d: int, x: torch.Tensor,
                 bits: int, front: Protocol) -> Protocol:
    """front() gives 1 - t, 1 + t; both chains are squared k times alongside msb(x); then
    select-and-square, the remaining squarings, Newton steps 1-2 (cubic in Ec), opening y2."""
    def doubled() -> Protocol:
        u = yield from front
        for j in range(1, k + 1):
            yield from M.open({f"p{j}": u[0], f"m{j}": u[1]})
            u = yield from parallel(*[trunc_exact(ctx, M.eval(M.plan[v]), F_CHAIN)
                                      for v in (f"p{j}", f"m{j}")])
        return u

    neg, (up, um) = yield from parallel(msb(ctx, x, bits), doubled())
    yield from M.open({f"p{k + 1}": up, f"m{k + 1}": um}, {"neg": neg})
    sq = M.eval(M.plan["sel"])
    for j in range(k + 2, n + 1):
        u = yield from trunc_exact(ctx, sq, F_CHAIN)
        yield from M.open({f"s{j}": u})
        sq = M.eval(M.plan[f"s{j}"])
    eh, ec = yield from parallel(trunc_exact(ctx, sq, 2 * F_CHAIN - f_d),
                                 trunc_exact(ctx, sq, 2 * F_CHAIN - F_CUBIC))
    yield from M.open({"Eh": eh, "Ec": ec})
    y2 = yield from trunc_exact(ctx, M.eval(M.plan["y2"]), 3 * F_CUBIC + 8 - f_y)
    yield from M.open({"y": y2})


def _sigmoid_cost(shape, pre: Cost, bits: int, n: int) -> Cost:
    """Cost of `_sigmoid_run` after a front of cost `pre` (the caller adds its last truncation)."""
    t = trunc_cost(shape)
    cmp = msb_cost(shape, bits)
    per = 1 + t.rounds
    k = _n_doubled(pre.rounds, cmp.rounds, per, n)
    front = pre + Cost(per * k, k * (_open_cost(shape, 2).bytes + 2 * t.bytes))
    total = Cost(max(cmp.rounds, front.rounds), cmp.bytes + front.bytes)
    total = total + _open_cost(shape, 2, 1)  # select-and-square
    for _ in range(n - k - 1):
        total = total + t + _open_cost(shape, 1)
    total = total + Cost(t.rounds, 2 * t.bytes)  # E at two precisions, in parallel
    return total + _open_cost(shape, 2) + t + _open_cost(shape, 1)


def gelu_crypten(ctx: Context, x: torch.Tensor, bits: int = 64, *, cubic: float = 0.044715,
                 exp_iterations: int = 9, reciprocal_iterations: int = 3,
                 reciprocal_initial: float = 0.75) -> Protocol:
    """CrypTen's tanh-form GeLU (spec gelu.crypten): x sigmoid(2 sqrt(2/pi)(x + c x^3)).

    With w = 2 sqrt(2/pi)(x + c x^3), neg = [x < 0] = [w < 0], E = exp(-|w|) by
    (1 - |w|/2^n)^(2^n) and y = 3 Newton steps for 1/(1 + E) from 0.75, the reference is
    x (neg ? 1 - y : y) = neg x + (1 - 2 neg) x y. Schedule: open x (x^3), truncate x^3,
    truncate t = w/2^n to 30 bits; square 1 - t and 1 + t side by side until msb(x) is
    done, then one select-and-square; the remaining squarings; Newton steps 1-2 as one
    cubic in E (17 bits); step 3 and the products with x and neg as two polynomials (below),
    truncated in parallel. x^3 at 3f bits needs |x| < 25.4 (f = 16); the reference itself
    breaks for |x| > ~23.5 (spec notes).
    """
    _check_sigmoid(exp_iterations, reciprocal_iterations, reciprocal_initial)
    f, n = ctx.f, exp_iterations
    # gelu = A + B: A = neg x + (1 - 2 neg) x (2 y2 - y2^2) at f + 2 f_y bits (|A| <= |x|);
    # B = -(1 - 2 neg) x y2^2 E at f + 2 f_y + f_d bits: |B| <= |x| exp(-|w|) < 0.25 leaves
    # room for E at 21 bits (its error is multiplied by |x|). Truncated separately.
    f_d = 21
    f_y = (63 - f - f_d) // 2
    s_a, s_b = f + 2 * f_y, f + 2 * f_y + f_d
    out_a = [(1 << (s_a - f), {"neg": 1, "x": 1})] + _signed(
        [(1 << (1 + f_y), {"y": 1}), (-1, {"y": 2})], {"x": 1})
    out_b = _signed([(-1, {"y": 2, "Eh": 1})], {"x": 1})

    pre = 1 + 2 * trunc_cost((1,)).rounds
    cube = [(1, {"x": 3})]
    M, k = _sigmoid_setup(ctx, x, pre, bits, n, {"cube": cube, "A": out_a, "B": out_b}, ["x"])
    c1 = 2 * math.sqrt(2 / math.pi) / 2 ** n  # t = w / 2^n = c1 (x + cubic x^3)
    k_t = 59 - f  # t at 59 bits from x and x3 (f bits each); |t| < 2 where the result is used

    def front() -> Protocol:
        yield from M.open({"x": x})
        x3 = yield from trunc_exact(ctx, M.eval(cube), 2 * f)
        t = yield from trunc_exact(ctx, _fixed(c1, k_t) * x + _fixed(c1 * cubic, k_t) * x3,
                             f + k_t - F_CHAIN)
        one = wrap(1 << F_CHAIN)
        return ctx.add_public(-t, one), ctx.add_public(t, one)

    yield from _sigmoid_run(ctx, M, k, n, f_y, f_d, x, bits, front())
    a, b = yield from parallel(trunc_exact(ctx, M.eval(M.plan["A"]), s_a - f),
                               trunc_exact(ctx, M.eval(M.plan["B"]), s_b - f))
    return a + b


def gelu_crypten_cost(shape, bits: int = 64, exp_iterations: int = 9) -> Cost:
    t = trunc_cost(shape)
    pre = _open_cost(shape, 1) + t + t
    return _sigmoid_cost(shape, pre, bits, exp_iterations) + Cost(t.rounds, 2 * t.bytes)


def tanh_crypten(ctx: Context, x: torch.Tensor, bits: int = 64, *, exp_iterations: int = 9,
                 reciprocal_iterations: int = 3, reciprocal_initial: float = 0.75) -> Protocol:
    """CrypTen tanh (spec tanh.crypten): 2 sigmoid(2x) - 1 = (1 - 2 neg)(2 y - 1).

    As gelu_crypten, but the exp base 1 -+ 2x/2^n is local (a shift of the shares), and
    the last polynomial is (1 - 2 neg)(2 y3 - 1) at 2*15 + 30 = 60 bits. Right for
    |x| <= 2^n, where the reference is (beyond, its exp base leaves [-1, 1]).
    """
    _check_sigmoid(exp_iterations, reciprocal_iterations, reciprocal_initial)
    f, n = ctx.f, exp_iterations
    f_y, f_d = 15, 30
    s = 2 * f_y + f_d
    shift = F_CHAIN - f - (n - 1)  # 2x / 2^n at F_CHAIN bits
    if shift < 0:
        raise ValueError(f"tanh_crypten: needs f + exp_iterations - 1 <= {F_CHAIN}")

    # (1 - 2 neg)(2 y3 - 1) at s bits, y3 = 2 y2 - y2^2 (1 + E)
    y3x2 = [(1 << (2 + f_y + f_d), {"y": 1}), (-(2 << f_d), {"y": 2}), (-2, {"y": 2, "Eh": 1}),
            (-(1 << s), {})]
    M, k = _sigmoid_setup(ctx, x, 0, bits, n, {"out": _signed(y3x2, {})}, [])

    def front() -> Protocol:
        t = x << shift
        one = wrap(1 << F_CHAIN)
        return ctx.add_public(-t, one), ctx.add_public(t, one)
        yield  # makes this a generator; it sends nothing

    yield from _sigmoid_run(ctx, M, k, n, f_y, f_d, x, bits, front())
    return (yield from trunc_exact(ctx, M.eval(M.plan["out"]), s - f))


def tanh_crypten_cost(shape, bits: int = 64, exp_iterations: int = 9) -> Cost:
    return _sigmoid_cost(shape, Cost(), bits, exp_iterations) + trunc_cost(shape)
