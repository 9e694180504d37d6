"""Comparison and what is built on it: msb, x < c, x < y, b2a, bit x value, select, relu, max.

msb (DESIGN.md, "Comparison"). Read x as a signed `bits`-bit integer (valid when
|x| < 2^(bits-1)); each party first reduces its share mod 2^bits, which is local and exact
because 2^bits divides 2^64. With s0 + s1 = x (mod 2^bits),

    msb(x) = s0[bits-1] XOR s1[bits-1] XOR carry(a + b),   a = s0 mod 2^n, b = s1 mod 2^n,

n = bits - 1. The carry of two *privately held* n-bit words is a carry-lookahead tree:

* level 0: generate g = a AND b by a dealer-assisted AND of private words (P0 sends
  a ^ u, P1 sends b ^ v for private uniform masks u, v; the dealer shares u & v);
  propagate p = a ^ b is already XOR-shared (P0 holds a, P1 holds b).
* the words are padded to n' = 2^ceil(log2 n) bits with identity elements (G=0, P=1) at the
  low end, then reduced by a tree of log2(n') levels, pairing each block with the one
  just above it: G' = G_hi ^ (P_hi & G_lo), P' = P_hi & P_lo (P is not needed at the last
  level). Each level's ANDs share the P_hi operand and use one binary Beaver triple
  (A, B1, B2, A&B1, A&B2); P_hi ^ A, G_lo ^ B1, P_lo ^ B2 are opened together.
* levels 0 and 1 share one round: level 1's G' and P' are sums of words private to one
  party and products of a word P0 holds (a_h, a_l, a_h & a_l) and one P1 holds (b_h, b_l,
  b_h & b_l), so each party sends its three half-width words masked, and the five
  products are dealer-assisted ANDs (`_carry`). That is log2(n') rounds in all, and
  n' bits per element fewer than a level-0 swap followed by level 1's opening.

Layout. Before level 0 each party moves bit j of its own (padded) private word to position
rev(j), the bit-reversal of the index (local: 3 delta swaps for 64 bits). In that order
the partner of position i is position i + W/2 and it holds
the bit just above, so each level's "compaction" is a shift by W/2 and a mask: the words
halve in width every level and go on the wire at that width, without the pext-style
shuffles an interleaved layout would need (about 6 word ops per level instead of ~60).
Where the level's width is tiny, the three opened words are concatenated into one word
when that packs into fewer bytes (three 4-bit values: one int16 instead of three uint8).

Containers. The words live in the narrowest signed dtype that holds the padded width (int16
up to 16 bits, int32 up to 32, else int64; `_word_dtype`), and so do their masks: the PRG
draws them, P1 unpacks the dealer's corrections, the engine unpacks openings and the dealer
derives its triples all in that container (`Correlations.correlated(..., dtype=...)`). The
bit patterns, the bytes on the wire and the cost are those of int64 words; only memory
traffic changes. GeLU's two 17-bit comparisons on 128x3072 took P0 about 165 ms of CPU in
int64 and about 60 ms so (benchmarks/profile_e2e.py: 0.29 s to 0.06 s per 2 BERT-base layers).

Security: everything a party receives is a value XORed with a fresh uniform mask from the
dealer (u, v, A, B1, B2, r): level 0 hands the peer a ^ u with u known only to its sender;
every other opening is of a value masked by a fresh uniformly shared triple element.

Dropped low bits (`msb(..., drop=d)`): the tree can run on each share's top bits - d bits
only. The words then add up to floor(x / 2^d) minus the carry of the dropped parts, so the
sign is right except possibly in the one-sided window 0 <= x < 2^d. GeLU's segment tests use
it (a threshold moving by 2^-5 changes GeLU by ~1.5e-4): 17-bit trees instead of 33-bit.

Measured costs per element and per party (`msb_cost`, checked in tests against the
transport's count):
    bits=64: 6 rounds, 24.25 bytes (levels 0-1: 12; tree: 6, 3, 2, 1, 0.25)
    bits=32: 5 rounds, 12.25 bytes (levels 0-1: 6; tree: 3, 2, 1, 0.25)
    bits=20: 5 rounds, 12.25 bytes (n = 19 pads to 32 bits)
    bits=17: 4 rounds, 6.25 bytes (GeLU's segment tests, `nonlinear.gelu_cmp_plan`)
b2a, bit_mul, select and relu's final product each cost one more round.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..context import P0, Context
from ..correlations import RING, Dom, mod_dom
from ..messages import Protocol, open_add, open_xor, parallel, swap
from ..packing import packed_nbytes
from ..ring import bit_select, signed_by_bit, wrap
from .arith import numel
from .cost import Cost
from .fused import _and_times
from .trunc import Pending, and_share, bit_sources, masked_bit


def _ones(bits: int) -> int:
    return -1 if bits >= 64 else (1 << bits) - 1


def _word_dtype(width: int) -> torch.dtype:
    """The narrowest signed dtype that holds a carry tree's `width`-bit words.

    Bitwise word ops are memory-bound: on 128x3072 words one tree level takes 6.5 ms in
    int64, 2.3 ms in int32 and 0.6 ms in int16 here (the narrow tensors stay in cache).
    The values and the bytes on the wire are the same whatever the container."""
    return torch.int16 if width <= 16 else torch.int32 if width <= 32 else torch.int64


def _const(c: int, dtype: torch.dtype) -> int:
    """A bit pattern of the dtype's width as the signed integer torch accepts for it."""
    bits = torch.iinfo(dtype).bits
    return c - (1 << bits) if c >= 1 << (bits - 1) else c


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 64:
        raise ValueError(f"comparison width must be in [2, 64] bits, got {bits}")


def _index_reverse(x: torch.Tensor, width: int) -> torch.Tensor:
    """Move bit j of every width-bit word (width a power of two) to position rev(j).

    rev reverses the log2(width) bits of the index j. Done as delta swaps that exchange
    index bits (i, L-1-i): the bit at a position with index bit i set and bit L-1-i clear
    trades places with the one `delta` above. The masks select lower positions only, so
    an arithmetic >> of a 64-bit word never brings a sign bit into a kept position.
    """
    levels = width.bit_length() - 1
    for i in range(levels // 2):
        j = levels - 1 - i
        delta = (1 << j) - (1 << i)
        m = 0
        for pos in range(width):
            if (pos >> i) & 1 and not (pos >> j) & 1:
                m |= 1 << pos
        t = (x ^ (x >> delta)) & _const(m, x.dtype)
        x = x ^ t ^ (t << delta)
    return x


def _concat_opening(count: int, numel_: int, h: int) -> bool:
    """Whether `count` h-bit words of an opening pack into fewer bytes as one word."""
    return count * h <= 64 and packed_nbytes(numel_, count * h) < count * packed_nbytes(numel_, h)


def _open_words(words: list[torch.Tensor], h: int, send=open_xor) -> Protocol:
    """Open XOR-shared h-bit words in one round, concatenated when that is cheaper (or, with
    send=swap, hand the peer these masked private words the same way)."""
    dt = words[0].dtype
    if not _concat_opening(len(words), words[0].numel(), h):
        return [o.to(dt) for o in (yield from send(*words, bits=h))]
    if len(words) * h >= torch.iinfo(dt).bits:  # the concatenated word needs a wider container
        words = [w.to(torch.int64) for w in words]
    cat = words[0]
    for i, w in enumerate(words[1:], 1):
        cat = cat | (w << (i * h))
    (o,) = yield from send(cat, bits=len(words) * h)
    m = _ones(h)
    return [((o >> (i * h)) & m).to(dt) for i in range(len(words))]


def _words_bytes(count: int, numel_: int, h: int) -> int:
    """Bytes of `_open_words` for `count` h-bit words."""
    if _concat_opening(count, numel_, h):
        return packed_nbytes(numel_, count * h)
    return count * packed_nbytes(numel_, h)


def _private_ands(ctx: Context, xs: list[torch.Tensor], pairs: list[tuple[int, int]], h: int,
                   dt: torch.dtype) -> Protocol:
    """XOR shares of x_i & y_j for each (i, j) in pairs, in one round, where xs are this
    party's private h-bit words (P0's x, P1's y; placeholders on the dealer).

    Each party sends its words masked by fresh uniform masks only it and the dealer know
    (P0: x ^ u, P1: y ^ v); the shares x & (y ^ v) ^ w0 (P0) and (x ^ u) & v ^ w1 (P1) XOR to
    x & y since the dealer shares w = u & v."""
    k = len(xs)
    shape = xs[0].shape
    shares = ctx.corr.correlated(
        [(shape, Dom("xor", h, owner=0))] * k + [(shape, Dom("xor", h, owner=1))] * k,
        lambda *uv: [uv[i] & uv[k + j] for i, j in pairs], [Dom("xor", h)] * len(pairs), dtype=dt)
    shares = [t.to(dt) for t in shares]  # no-ops but at the dealer (meta int64)
    us, vs, ws = shares[:k], shares[k:2 * k], shares[2 * k:]
    own = us if ctx.party == P0 else vs
    theirs = yield from _open_words([x ^ o for x, o in zip(xs, own)], h, send=swap)
    return [((xs[i] & theirs[j]) if ctx.party == P0 else (theirs[i] & vs[j])) ^ w
            for (i, j), w in zip(pairs, ws)]


def _carry(ctx: Context, mine: torch.Tensor, n: int) -> Protocol:
    """XOR share of carry-out(a + b) for n-bit words a (held by P0) and b (held by P1).

    `mine` is this party's private word (a on P0, b on P1; anything of the shape on the
    dealer). Rounds: log2(n'), n' = n rounded up to a power of two (1 for n = 1): levels
    0 and 1 share the first round.
    """
    shape = mine.shape
    width = _pow2_at_least(n)
    k = width - n
    # The words live in the narrowest container (_word_dtype): masks and triples are drawn
    # in it (correlated(dtype=...)) and openings are unpacked into it; the .to(dt) of
    # drawn and received values below are no-ops except on the dealer's meta placeholders.
    dt = _word_dtype(width)
    dbits = torch.iinfo(dt).bits
    mine = mine.to(dt)
    # Pad with k identity elements at the low end: G = a & b = 0 there because b's pad is
    # 0, and P = a ^ b = 1 because P0 sets its pad bits to 1.
    mine = mine << k
    if ctx.party == P0 and k:
        mine = mine | ((1 << k) - 1)
    mine = _index_reverse(mine, width)

    if width == 1:  # a single bit: the carry is a AND b (one dealer-assisted AND)
        (g,) = yield from _private_ands(ctx, [mine], [(0, 0)], 1, dt)
        return g.to(torch.int64)

    # Level 0 and level 1 in one round. Level 1's block of two bits (hi above lo) has
    #   G = g_hi ^ p_hi g_lo = a_h b_h ^ (a_h a_l) b_l ^ a_l (b_h b_l),
    #   P = p_hi p_lo = (a_h a_l) ^ (b_h b_l) ^ a_h b_l ^ a_l b_h,
    # with g = a & b, p = a ^ b: each term is private to one party or a product of a word
    # P0 holds (x = a_h, a_l, a_h a_l) and one P1 holds (y = b_h, b_l, b_h b_l). A product
    # x y is a dealer-assisted AND of private words: P0 sends x ^ u, P1 sends y ^ v (u, v
    # uniform, each known only to its sender and the dealer), and the shares
    # x & (y ^ v) ^ w0 (P0) and (x ^ u) & v ^ w1 (P1) XOR to x & y since w = u & v. So one
    # swap of three h-bit words replaces level 0's swap of a width-bit word and level 1's
    # opening of three h-bit words: one round and `width` bits fewer per element.
    h = width // 2
    m = _ones(h)
    last = h == 1
    xs = [(mine >> h) & m if width == dbits else mine >> h, mine & m]  # hi, lo
    xs.append(xs[0] & xs[1])
    pairs = [(0, 0), (2, 1), (1, 2)] + ([] if last else [(0, 1), (1, 0)])  # (x, y) indices
    cross = yield from _private_ands(ctx, xs, pairs, h, dt)
    g = cross[0] ^ cross[1] ^ cross[2]
    if last:
        return g.to(torch.int64)
    p = xs[2] ^ cross[3] ^ cross[4]  # a_h a_l on P0, b_h b_l on P1: a plain XOR share
    width = h

    # Tree: in bit-reversed order position i + h holds the block just above position i.
    while width > 1:
        h = width // 2
        m = _ones(h)
        last = h == 1
        # >> is arithmetic: only a word as wide as its container can carry a sign bit into
        # the high half.
        p_hi = (p >> h) & m if width == dbits else p >> h
        g_hi = (g >> h) & m if width == dbits else g >> h
        ys = [g & m] if last else [g & m, p & m]
        triple = ctx.corr.correlated(
            [(shape, Dom("xor", h))] * (1 + len(ys)),
            lambda a, *bs: [a & b for b in bs], [Dom("xor", h)] * len(ys), dtype=dt)
        triple = [t.to(dt) for t in triple]
        a, bs, cs = triple[0], triple[1:1 + len(ys)], triple[1 + len(ys):]
        for y, b in zip(ys, bs):
            y ^= b  # y is a fresh temporary: open y ^ B in place
        d, *es = yield from _open_words([p_hi ^ a] + ys, h)
        # x & y = x & e ^ d & B ^ A & B with x = d ^ A, y = e ^ B: XOR-linear in this
        # party's share x_i of x = P_hi, so no term is added by one party only.
        ands = []
        for e, b, c in zip(es, bs, cs):
            z = p_hi & e
            b &= d
            z ^= b
            z ^= c
            ands.append(z)
        g_hi ^= ands[0]
        g = g_hi
        if not last:
            p = ands[1]
        width = h
    return g.to(torch.int64)


def _carry_bytes(numel_: int, n: int) -> int:
    width = _pow2_at_least(n)
    if width == 1:
        return packed_nbytes(numel_, 1)
    width //= 2
    total = _words_bytes(3, numel_, width)  # levels 0 and 1: three private words swapped
    while width > 1:
        h = width // 2
        total += _words_bytes(2 if h == 1 else 3, numel_, h)
        width = h
    return total


def _carry_rounds(n: int) -> int:
    """Rounds of `_carry` for n-bit words: log2(n') with n' = n rounded up to a power of
    two (levels 0 and 1 share a round), 1 for a single bit."""
    return max(1, _pow2_at_least(n).bit_length() - 1)


def msb(ctx: Context, x: torch.Tensor, bits: int = 64, drop: int = 0) -> Protocol:
    """XOR-shared bit (int64 0/1 per element) = [x < 0] for |x| < 2^(bits-1).

    The bound is the caller's to guarantee (it cannot be checked on secret data); outside
    it the result is the sign of x mod 2^bits read as a signed bits-bit integer.

    drop > 0 compares only the shares' high bits: each party drops its share's low `drop`
    bits (local), so the shares of the words add up to floor(x / 2^drop) - c with the
    carry c in {0, 1} of the dropped parts, and the carry tree runs on bits - drop bits
    (one round less per halving of the width). The result is then [x < 0] for every x in
    [-2^(bits-1) + 2^drop, 2^(bits-1)), except that it may be 1 for 0 <= x < 2^drop: a
    one-sided window of width 2^drop just above zero. Callers that can tolerate a threshold
    moving by 2^drop (GeLU's segment tests: `nonlinear.gelu_cmp_plan`) get a cheaper
    comparison; what is sent is the same protocol on other private words, so no new value
    is revealed.
    Cost: `msb_cost` (1 + ceil(log2(bits-drop-1)) rounds).
    """
    _check_bits(bits)
    if not 0 <= drop <= bits - 2:
        raise ValueError(f"msb: drop must be in [0, {bits - 2}] for a {bits}-bit comparison, got {drop}")
    s = x & _ones(bits)  # local reduction mod 2^bits (2^bits divides 2^64)
    if drop:
        # logical shift of the share read as an unsigned bits-bit word (only a 64-bit word
        # can be negative here, and the mask clears what the arithmetic shift brought in)
        s = (s >> drop) & _ones(bits - drop)
        bits -= drop
    top = (s >> (bits - 1)) & 1
    low = s & _ones(bits - 1)
    carry = yield from _carry(ctx, low, bits - 1)
    return top ^ carry


def msb_cost(shape, bits: int = 64, drop: int = 0) -> Cost:
    _check_bits(bits)
    bits -= drop
    return Cost(_carry_rounds(bits - 1), _carry_bytes(numel(shape), bits - 1))


# --- comparisons (XOR-shared bits) ------------------------------------------------------

def _neg_public(c: int | torch.Tensor) -> int | torch.Tensor:
    return wrap(-c) if isinstance(c, int) else -c


def _public(c: int | torch.Tensor) -> int | torch.Tensor:
    return wrap(c) if isinstance(c, int) else c


def lt_public(ctx: Context, x: torch.Tensor, c: int | torch.Tensor, bits: int = 64,
              drop: int = 0) -> Protocol:
    """[x < c] for public c (ring integer or int64 tensor, same scale); |x - c| < 2^(bits-1).

    drop: see `msb` (the answer may be 1 for c <= x < c + 2^drop)."""
    return (yield from msb(ctx, ctx.add_public(x, _neg_public(c)), bits, drop))


def gt_public(ctx: Context, x: torch.Tensor, c: int | torch.Tensor, bits: int = 64,
              drop: int = 0) -> Protocol:
    """[x > c] for public c; |x - c| < 2^(bits-1).

    drop: see `msb` (the answer may be 1 for c - 2^drop < x <= c)."""
    return (yield from msb(ctx, ctx.add_public(-x, _public(c)), bits, drop))


def lt(ctx: Context, x: torch.Tensor, y: torch.Tensor, bits: int = 64) -> Protocol:
    """[x < y] for two secrets; |x - y| < 2^(bits-1)."""
    return (yield from msb(ctx, x - y, bits))


compare_cost = msb_cost  # lt_public, gt_public and lt are msb of a local difference


def not_bit(ctx: Context, bit: torch.Tensor) -> torch.Tensor:
    """1 - bit for an XOR-shared bit: P0 flips its share (local)."""
    return bit ^ 1 if ctx.party == P0 else bit


# --- bits times arithmetic values -----------------------------------------------------

def b2a(ctx: Context, bit: torch.Tensor) -> Protocol:
    """XOR-shared bit -> additive share of the integer 0/1. One round, 1 bit per element.

    The dealer gives a uniform bit r both XOR-shared and additively shared; c = bit ^ r is
    opened (uniform, so it says nothing) and bit = c + r - 2cr.
    """
    r, r_add = ctx.corr.correlated([(bit.shape, Dom("xor", 1))], lambda r: [r], [RING])
    (c,) = yield from open_xor(bit ^ r, bits=1)
    return ctx.add_public(signed_by_bit(r_add, c), c)


def b2a_cost(shape) -> Cost:
    return Cost(1, packed_nbytes(numel(shape), 1))


def bit_mul(ctx: Context, bits_list: Sequence[torch.Tensor], z: torch.Tensor) -> Protocol:
    """[b_j * z for each XOR-shared bit b_j] for one arithmetic z (any scale), in one round.

    Per bit the dealer gives r_j (XOR and additive forms); for z a ring mask a with the
    products r_j * a. Open c_j = b_j ^ r_j (1 bit each) and e = z - a (once, 8 bytes):
    b*z = c*z + (1 - 2c) * r*z and r*z = r*e + [r*a]. Bits broadcast against z.
    """
    k = len(bits_list)
    sources = [(b.shape, Dom("xor", 1)) for b in bits_list] + [(z.shape, RING)]
    out = ctx.corr.correlated(
        sources, lambda *v: list(v[:k]) + [r * v[k] for r in v[:k]], [RING] * (2 * k))
    r_xor, a, r_add, ra = out[:k], out[k], out[k + 1:2 * k + 1], out[2 * k + 1:]
    # the 8-byte opening goes first so the 1-bit one (any length) does not shift its offset
    (e,), cs = yield from parallel(
        open_add(z - a), open_xor(*[b ^ r for b, r in zip(bits_list, r_xor)], bits=1))
    res = []
    for c, rj, raj in zip(cs, r_add, ra):
        rz = rj * e + raj
        res.append(bit_select(c, z, rz))  # c z + (1 - 2c) r z
    return res


def bit_mul_cost(bit_shapes: Sequence, z_shape) -> Cost:
    return Cost(1, sum(packed_nbytes(numel(s), 1) for s in bit_shapes) + 8 * numel(z_shape))


def bit_mul_pending(ctx: Context, bits_list: Sequence[torch.Tensor], z: Pending) -> Protocol:
    """`bit_mul` for a z that is a pending truncation (trunc.Pending): its round is this
    one (fused.py). With e~ = base - a opened and P = 2^(64-k) AB the truncation's
    correction, z = e~ + P + a and r z = r e~ + r P + [r a]; r P comes from the dealer's
    u r, v r, u v r (mod 2^k) for the truncation's private mask bits u, v (fused._and_times).
    One round: 8 bytes, and a bit per bit and for the truncation, per element."""
    if not z.pending:
        return (yield from bit_mul(ctx, bits_list, z.base))
    k = len(bits_list)
    sources = [(b.shape, Dom("xor", 1)) for b in bits_list] + [(z.shape, RING)] + bit_sources(z)

    def dealer(*v):
        rs, a, u, w = v[:k], v[k], v[k + 1], v[k + 2]
        out = list(rs) + [r * a for r in rs] + [u * w]
        for r in rs:
            out += [u * r, w * r, u * w * r]
        return out

    doms = [RING] * (2 * k) + [mod_dom(z.k)] * (1 + 3 * k)
    out = ctx.corr.correlated(sources, dealer, doms)
    r_xor, a, u, w = out[:k], out[k], out[k + 1], out[k + 2]
    rest = out[k + 3:]
    r_add, ra, uv, crs = rest[:k], rest[k:2 * k], rest[2 * k], rest[2 * k + 1:]
    mine = masked_bit(ctx, z, u, w)
    (e,), cs, (theirs,) = yield from parallel(
        open_add(z.base - a), open_xor(*[b ^ r for b, r in zip(bits_list, r_xor)], bits=1),
        swap(mine, bits=1))
    ab = and_share(ctx, z, mine, theirs, uv)
    sh = 64 - z.k
    z_done = z.base + (ab << sh)
    res = []
    for j, (c, rj, raj) in enumerate(zip(cs, r_add, ra)):
        um, vm, uvm = crs[3 * j:3 * j + 3]
        rp = _and_times(ctx, mine, theirs, rj, um, vm, uvm) << sh
        rz = rj * e + rp + raj
        res.append(bit_select(c, z_done, rz))
    return res


def bit_mul_pending_cost(bit_shapes: Sequence, z_shape) -> Cost:
    return bit_mul_cost(bit_shapes, z_shape) + Cost(0, packed_nbytes(numel(z_shape), 1))


def select(ctx: Context, bit: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Protocol:
    """bit ? x : y = y + bit * (x - y) for an XOR-shared bit. One round."""
    (d,) = yield from bit_mul(ctx, [bit], x - y)
    return y + d


def select_cost(shape) -> Cost:
    return bit_mul_cost([shape], shape)


def relu(ctx: Context, x: torch.Tensor, bits: int = 64) -> Protocol:
    """max(x, 0) = (1 - msb(x)) * x for |x| < 2^(bits-1). msb rounds + 1."""
    neg = yield from msb(ctx, x, bits)
    (y,) = yield from bit_mul(ctx, [not_bit(ctx, neg)], x)
    return y


def relu_cost(shape, bits: int = 64) -> Cost:
    return msb_cost(shape, bits) + bit_mul_cost([shape], shape)


# --- max by a tree of comparisons --------------------------------------------------------

def _tree_sizes(n: int) -> list[int]:
    """Pairs compared at each level of the tree (odd sizes carry their last element)."""
    out = []
    while n > 1:
        out.append(n // 2)
        n = n - n // 2
    return out


def max_tree(ctx: Context, x: torch.Tensor, dim: int = -1, bits: int = 64) -> Protocol:
    """Max over `dim` (kept, size 1) by pairwise tournament (CrypTen's log_reduction).

    ceil(log2 n) levels, each one comparison (lt, secret vs secret) and one select, so
    differences of the values must satisfy |x_i - x_j| < 2^(bits-1).
    """
    if x.shape[dim] == 0:
        raise ValueError("max_tree over an empty dimension")
    x = x.movedim(dim, -1)
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        lo, hi, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
        less = yield from lt(ctx, lo, hi, bits)
        m = yield from select(ctx, less, hi, lo)
        x = torch.cat([m, rest], dim=-1)
    return x.movedim(-1, dim)


def max_tree_cost(shape, dim: int = -1, bits: int = 64) -> Cost:
    shape = list(shape)
    n = shape[dim]
    total = Cost()
    for h in _tree_sizes(n):
        shape[dim] = h
        total = total + msb_cost(shape, bits) + select_cost(shape)
    return total
