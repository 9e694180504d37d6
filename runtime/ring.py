"""The ring Z_(2^64) held in torch.int64, fixed-point encoding, and exact ring matmul.

int64 arithmetic in torch wraps modulo 2^64, which is exactly the ring we need, so
additions and elementwise products of shares are native. Two things are not:

* Fixed-point decoding must treat the int64 as a *signed* value (two's complement)
  and divide, never floor-shift a share: CrypTen decodes negative values off by one
  because it truncates toward zero on the reconstructed value's shares.
* torch's int64 matmul has no BLAS path and is 15-80x slower than float64 on this
  machine (measured: (128x768)@(768x3072) 3.3 s int64 vs 0.044 s float64). `ring_matmul`
  splits both operands into three signed 22-bit limbs (a = a0 + a1 2^22 + a2 2^44) and
  needs only the limb products whose weight is below 2^64: c0 = a0 b0, c1 = a0 b1 + a1 b0,
  c2 = a0 b2 + a1 b1 + a2 b0. It computes them with five float64 GEMMs instead of six
  (Karatsuba on the two low limbs: c1 = (a0 + a1)(b0 + b1) - a0 b0 - a1 b1, and a1 b1 is
  needed for c2 anyway): the GEMMs are 35-40% of a party's online CPU in BERT, and this
  removes a sixth of them. Every partial sum is an exact integer in float64: |limb| <= 2^21
  (top limb <= 2^20), so plain limb products are <= 2^42 and K is chunked to <= 2^11
  (|sum| <= 2^53); the Karatsuba factors are <= 2^22, so their product's K is chunked to
  <= 2^9 (again 2^44 * 2^9 = 2^53).
  A right operand used again and again (a party's share of a fixed weight) can be split
  once (`SplitOperand`): splitting a (768 x 3072) share costs about a quarter of one
  (128 x 768) @ (768 x 3072) product here, paid on every call otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

RING_BITS = 64
_LIMB_BITS = 22
_MAX_K_CHUNK = 2048  # 2^42 * 2^11 = 2^53: float64 sums of limb products stay exact
_MID_K_CHUNK = 512  # 2^44 * 2^9 = 2^53: the same for the Karatsuba product (a0 + a1)(b0 + b1)


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point format: a real x is stored as round(x * 2^frac_bits) in Z_(2^64)."""

    frac_bits: int = 16

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    def encode(self, x: torch.Tensor | float, frac_bits: int | None = None) -> torch.Tensor:
        """Encode reals as ring elements (round to nearest). Values must satisfy |x| < 2^(63-f)."""
        f = self.frac_bits if frac_bits is None else frac_bits
        t = torch.as_tensor(x, dtype=torch.float64)
        limit = 2.0 ** (63 - f)
        if t.numel() and bool((t.abs() >= limit).any()):
            raise OverflowError(
                f"value of magnitude {float(t.abs().max()):.3g} does not fit the fixed-point "
                f"format with {f} fractional bits (limit 2^{63 - f}); lower frac_bits or rescale"
            )
        return torch.round(t * (1 << f)).to(torch.int64)

    def decode(self, x: torch.Tensor, frac_bits: int | None = None) -> torch.Tensor:
        """Decode ring elements to float64, reading them as signed two's-complement values."""
        f = self.frac_bits if frac_bits is None else frac_bits
        return x.to(torch.float64) / float(1 << f)


def wrap(x: int) -> int:
    """Map a Python int into the signed int64 range (mod 2^64)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


def low_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x mod 2^bits as a non-negative int64 (bits < 64); identity for bits == 64."""
    if bits >= 64:
        return x
    return x & ((1 << bits) - 1)


def _limbs(x: torch.Tensor) -> list[torch.Tensor]:
    """Split int64 x into three signed limbs (float64) with x = l0 + l1*2^22 + l2*2^44 mod 2^64,
    followed by l0 + l1 (the Karatsuba factor, exact: |l0 + l1| <= 2^22)."""
    half = 1 << (_LIMB_BITS - 1)
    mask = (1 << _LIMB_BITS) - 1
    out = []
    rest = x
    for _ in range(2):
        limb = ((rest + half) & mask) - half  # balanced digit in [-2^21, 2^21)
        out.append(limb.to(torch.float64))
        rest = (rest - limb) >> _LIMB_BITS  # exact: rest - limb is divisible by 2^22
    out.append(rest.to(torch.float64))  # top limb: |rest| < 2^20 after two arithmetic shifts
    out.append(out[0] + out[1])
    return out


class SplitOperand:
    """A right operand of `ring_matmul` split once into float64 limbs, per chunk of K.

    Holds 4 float64 values per element (three limbs and the sum of the two low ones: 32
    bytes) and not the int64 tensor itself: a party keeps one of these per weight matrix
    for the whole session, so the 8 bytes would be 20% more of its largest memory. `value`
    rebuilds the int64 tensor exactly from the limbs when some other use needs it.
    """

    __slots__ = ("shape", "chunks")

    def __init__(self, value: torch.Tensor) -> None:
        if value.dim() < 2:
            raise ValueError(f"a matmul right operand needs 2 or more dims, got shape {tuple(value.shape)}")
        self.shape = value.shape
        k = value.shape[-2]
        self.chunks = tuple(tuple(_limbs(value[..., s:s + _MAX_K_CHUNK, :]))
                            for s in range(0, k, _MAX_K_CHUNK))

    @property
    def value(self) -> torch.Tensor:
        """The int64 operand, l0 + l1 2^22 + l2 2^44 mod 2^64 (exact: the limbs are integers)."""
        parts = [(l0.to(torch.int64) + (l1.to(torch.int64) << _LIMB_BITS) + (l2.to(torch.int64) << (2 * _LIMB_BITS)))
                 for l0, l1, l2, _ in self.chunks]
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


def ring_matmul(a: torch.Tensor, b: "torch.Tensor | SplitOperand") -> torch.Tensor:
    """Exact (a @ b) mod 2^64 for int64 tensors (broadcasting like torch.matmul), via float64 limbs.

    b may be a `SplitOperand` (its limbs computed once, ahead of the call)."""
    split = b if isinstance(b, SplitOperand) else None
    if split is not None:
        if a.device.type == "meta":
            return torch.matmul(a, torch.empty(split.shape, dtype=torch.int64, device="meta"))
    elif a.device.type == "meta" or b.device.type == "meta":
        return torch.matmul(a, b)
    k = a.shape[-1]
    acc = None
    for i, s in enumerate(range(0, k, _MAX_K_CHUNK)):
        la = _limbs(a[..., s:s + _MAX_K_CHUNK])
        lb = split.chunks[i] if split is not None else _limbs(b[..., s:s + _MAX_K_CHUNK, :])
        part = _combine(la, lb, torch.matmul)
        acc = part if acc is None else acc + part
    return acc


def _combine(la: list[torch.Tensor], lb: list[torch.Tensor], op: Callable) -> torch.Tensor:
    """(a @ b) mod 2^64 of one K chunk (<= 2^11) from its limbs (`_limbs`), in five products."""
    a0, a1, a2, a01 = la
    b0, b1, b2, b01 = lb
    i64 = torch.int64
    p00 = op(a0, b0).to(i64)
    p11 = op(a1, b1).to(i64)
    # a0 b2 + a2 b0: each |sum| <= 2^21 * 2^20 * 2^11 = 2^52, so their float sum is exact too
    c2 = p11 + (op(a0, b2) + op(a2, b0)).to(i64)
    k = a01.shape[-1]
    mid = None
    for s in range(0, k, _MID_K_CHUNK):
        part = op(a01[..., s:s + _MID_K_CHUNK], b01[..., s:s + _MID_K_CHUNK, :]).to(i64)
        mid = part if mid is None else mid + part
    c1 = mid - p00 - p11
    return p00 + (c1 << _LIMB_BITS) + (c2 << (2 * _LIMB_BITS))
