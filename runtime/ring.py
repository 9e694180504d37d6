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
  Those full limbs take 32 bytes per element against the int64 share's 8: for BERT-large
  (302 M encoder weights) 9.7 GB in each party and in the dealer, which ran a 24 GB machine
  holding all three out of memory (2026-11-27). Past a memory budget (`compact_limbs`,
  `limb_budget_bytes`) a process keeps its operands compact instead: the three limbs as
  float32, which holds them exactly (|limb| <= 2^21 < 2^24), 12 bytes per element, widened
  to float64 a block of columns at a time in each product.
* Which is fastest depends on the CPU, so each process measures once (`matmul_kernel`):
  the limbs, torch's int64 matmul with the right operand as it is stored ("int64",
  row-major) and with it column-major ("int64-colmajor"). On a core without AVX-512 (AMD
  family 23, where the figures above were taken) the limbs win by 2-2.5x over torch's
  int64 matmul even with a column-major right operand; on an AVX-512 core (AMD family 25,
  model 17) int64 is 1.4-3.3x faster than the limbs (`benchmarks/gemm_peak.py`), and
  there, measured 2026-11-27, row-major beats column-major: (128 x 768) @ (768 x 2304)
  20 ms against 28 ms, @ (768 x 3072) 27 against 47 ms. All are exact mod 2^64, so parties
  may differ in their choice; `SECFORMER_RING_MATMUL=limbs`, `=int64` or `=int64-colmajor`
  fixes it.
* torch's int64 matmul is a plain loop nest with no cache blocking: past a (768 x 768)
  right operand it slows per multiply-add as the operand grows. A `SplitOperand` for an
  int64 kernel therefore keeps a larger matrix as 256 x 256 tiles (only along a dim over
  768) and multiplies tile by tile (`_matmul_tiles`). Measured here (2026-11-27, AMD family
  25, one thread, median of 9, `benchmarks/results/gemm_peak.json`): (128 x 768) @
  (768 x 2304) 24.3 ms whole, 15.7 tiled; @ (768 x 3072) 24.6 against 20.9; (128 x 3072) @
  (3072 x 768) 29.1 against 20.9; BERT-large's (1024 x 4096) 51.1 against 39.5 and
  (4096 x 1024) 49.7 against 39.1. (768 x 768) gains nothing from tiles and stays whole.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .memory import env_mib_bytes

RING_BITS = 64
_LIMB_BITS = 22
_MAX_K_CHUNK = 2048  # 2^42 * 2^11 = 2^53: float64 sums of limb products stay exact
_MID_K_CHUNK = 512  # 2^44 * 2^9 = 2^53: the same for the Karatsuba product (a0 + a1)(b0 + b1)
_TILE = 256  # int64 kernels: tile edge for a right operand dim over _TILE_ABOVE (module docstring)
_TILE_ABOVE = 768
_COMPACT_COLUMNS = 1024  # limbs kernel, compact operand: columns widened to float64 at a time
_SPLIT_ROWS = 256  # rows of an operand split into compact limbs at a time (`_compact_chunk`)
_FULL_BYTES = 32  # limbs kernel: bytes an element of a full SplitOperand (4 float64; compact: 3 float32)
LIMB_BUDGET_ENV = "SECFORMER_LIMB_BUDGET_MIB"


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


def signed_by_bit(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(1 - 2c) v mod 2^64 for bits c (0 / 1 int64, broadcasting): v where c = 0, -v where
    c = 1, as (v ^ s) - s with s = -c (0 or all ones: two's-complement negation). A fresh
    tensor. Why not the product: int64 products are the slow part of the protocols'
    elementwise bit formulas (the exact truncation's and_share took 40% less time this way)."""
    s = -c
    return (v ^ s).sub_(s)


def bit_select(c: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """c z + (1 - 2c) v mod 2^64 for bits c (0 / 1 int64, broadcasting), with no product:
    c z is z AND the all-ones mask -c (the same mask `signed_by_bit` negates with)."""
    s = -c
    return (v ^ s).sub_(s).add_(z & s)


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


_KERNEL: str | None = None  # one of KERNELS once chosen (`matmul_kernel`)
KERNEL_ENV = "SECFORMER_RING_MATMUL"
KERNELS = ("limbs", "int64", "int64-colmajor")


def matmul_kernel() -> str:
    """The exact ring product this process uses: "limbs" (five float64 GEMMs), "int64"
    (torch's int64 matmul, right operand row-major) or "int64-colmajor" (the same with a
    column-major right operand). Chosen on first use by timing them on a (128 x 768) @
    (768 x 768) product (about 0.1 s), unless $SECFORMER_RING_MATMUL says."""
    global _KERNEL
    if _KERNEL is None:
        env = os.environ.get(KERNEL_ENV, "").strip().lower()
        if env and env not in KERNELS:
            raise ValueError(f"{KERNEL_ENV}={env!r}: use 'limbs', 'int64' or 'int64-colmajor' "
                             "(or unset it to measure)")
        _KERNEL = env or _measure_kernels()
    return _KERNEL


def chosen_kernel() -> str | None:
    """The kernel this process chose, or None if it has not needed one yet (no measuring)."""
    return _KERNEL


def int64_layout(b: torch.Tensor) -> torch.Tensor:
    """b in the layout the process's int64 kernel wants (no copy when it already is; plain
    contiguous under the limbs kernel, which splits its operands anyway)."""
    return colmajor(b) if matmul_kernel() == "int64-colmajor" else b.contiguous()


def public_operand(b: torch.Tensor) -> "torch.Tensor | SplitOperand":
    """A public matrix kept for repeated use as a right operand, in no more memory than b:
    a `SplitOperand` under an int64 kernel (layout and tiles), b in `int64_layout` under the
    limbs kernel (whose split form would take 4x the memory)."""
    if b.dim() < 2 or b.device.type == "meta":
        return b
    return int64_layout(b) if matmul_kernel() == "limbs" else SplitOperand(b)


def _measure_kernels() -> str:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-2 ** 62, 2 ** 62, (128, 768), generator=g)
    b = torch.randint(-2 ** 62, 2 ** 62, (768, 768), generator=g)
    limbs, cm = _split_limbs(b), colmajor(b)

    def best(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)

    t_limbs = best(lambda: _matmul_limbs(a, limbs))
    t_rows = best(lambda: torch.matmul(a, b))
    t_cols = best(lambda: torch.matmul(a, cm))
    if min(t_rows, t_cols) >= 0.9 * t_limbs:
        return "limbs"
    return "int64" if t_rows <= t_cols else "int64-colmajor"


def colmajor(b: torch.Tensor) -> torch.Tensor:
    """b with its last two dims stored column-major (the same values): on some CPUs torch's
    int64 matmul is much faster with such a right operand, on others slower (the module
    docstring; `matmul_kernel` measures). No copy when b is already stored that way."""
    return b.transpose(-1, -2).contiguous().transpose(-1, -2)


def _split_limbs(b: torch.Tensor, compact: bool = False) -> tuple:
    """b's limbs per K chunk: (l0, l1, l2, l0 + l1) in float64, or with `compact` only
    (l0, l1, l2) in float32, which holds them exactly (|limb| <= 2^21 < 2^24)."""
    k = b.shape[-2]
    if compact:
        return tuple(_compact_chunk(b[..., s:s + _MAX_K_CHUNK, :]) for s in range(0, k, _MAX_K_CHUNK))
    return tuple(tuple(_limbs(b[..., s:s + _MAX_K_CHUNK, :])) for s in range(0, k, _MAX_K_CHUNK))


def _compact_chunk(b: torch.Tensor) -> tuple:
    """(l0, l1, l2) of one K chunk as float32, split _SPLIT_ROWS rows at a time: the int64 and
    float64 temporaries of a whole (2048 x 4096) chunk would be 64 MiB each, past glibc's mmap
    threshold, and this is the path taken when memory is short (`compact_limbs`)."""
    out = torch.empty((3,) + tuple(b.shape), dtype=torch.float32)
    for r in range(0, b.shape[-2], _SPLIT_ROWS):
        for limb, part in zip(out, _limbs(b[..., r:r + _SPLIT_ROWS, :])):
            limb[..., r:r + _SPLIT_ROWS, :] = part
    return tuple(out)


def _matmul_limbs(a: torch.Tensor, chunks: tuple | None, b: torch.Tensor | None = None) -> torch.Tensor:
    if chunks is not None and len(chunks[0]) == 3:
        return _matmul_compact(a, chunks)
    k = a.shape[-1]
    acc = None
    for i, s in enumerate(range(0, k, _MAX_K_CHUNK)):
        la = _limbs(a[..., s:s + _MAX_K_CHUNK])
        lb = chunks[i] if chunks is not None else _limbs(b[..., s:s + _MAX_K_CHUNK, :])
        part = _combine(la, lb, torch.matmul)
        acc = part if acc is None else acc + part
    return acc


def _matmul_compact(a: torch.Tensor, chunks: tuple) -> torch.Tensor:
    """a @ b mod 2^64 for b kept as float32 limbs (`_split_limbs(compact=True)`): each block
    of _COMPACT_COLUMNS columns is widened to float64 just before its five GEMMs, so the
    widened copy is at most 4 x 2048 x 1024 x 8 bytes (64 MiB; each tensor 16 MiB, below
    glibc's mmap threshold, so the blocks reuse heap pages instead of faulting in fresh ones:
    runtime/memory.py)."""
    k, n = a.shape[-1], chunks[0][0].shape[-1]
    if sum(chunk[0].shape[-2] for chunk in chunks) != k:
        raise RuntimeError(f"ring_matmul: shapes {tuple(a.shape)} and "
                           f"({sum(c[0].shape[-2] for c in chunks)}, {n}) cannot be multiplied")
    la = [_limbs(a[..., s:s + _MAX_K_CHUNK]) for s in range(0, k, _MAX_K_CHUNK)]
    out = None
    for c in range(0, n, _COMPACT_COLUMNS):
        acc = None
        for i, chunk in enumerate(chunks):
            lb = [limb[..., c:c + _COMPACT_COLUMNS].to(torch.float64) for limb in chunk]
            lb.append(lb[0] + lb[1])
            part = _combine(la[i], lb, torch.matmul)
            acc = part if acc is None else acc.add_(part)
        if c == 0 and acc.shape[-1] == n:
            return acc
        if out is None:
            out = torch.empty(acc.shape[:-1] + (n,), dtype=torch.int64)
        out[..., c:c + _COMPACT_COLUMNS] = acc
    return out


class SplitOperand:
    """A right operand of `ring_matmul` prepared once for the process's kernel.

    limbs: 4 float64 values per element, per chunk of K (three limbs and the sum of the two
    low ones: 32 bytes), or with `compact` the three limbs as float32 (12 bytes; widened a
    block of columns at a time in each product: `compact_limbs` says when); int64 kernels:
    the operand in the kernel's layout (`int64_layout`, 8 bytes), as 256 x 256 tiles when a
    dim of a matrix is over 768 (`tile_sizes`; the module docstring says why). A party keeps
    one of these per weight matrix for the whole session and not the plain int64 tensor
    beside it. `value` gives the int64 operand back exactly when some other use needs it.
    """

    __slots__ = ("shape", "chunks", "dense", "tiles")

    def __init__(self, value: torch.Tensor, compact: bool = False) -> None:
        if value.dim() < 2:
            raise ValueError(f"a matmul right operand needs 2 or more dims, got shape {tuple(value.shape)}")
        self.shape = value.shape
        self.chunks, self.dense, self.tiles = None, None, None
        if matmul_kernel() == "limbs":
            self.chunks = _split_limbs(value, compact)
            return
        tk, tn = tile_sizes(value.shape)
        if (tk, tn) == tuple(value.shape[-2:]):
            self.dense = int64_layout(value)
        else:  # tiles[j][i]: rows i*tk.., columns j*tn.. (each in the kernel's layout)
            k, n = value.shape[-2:]
            self.tiles = (tk, tn, tuple(tuple(int64_layout(value[r:r + tk, c:c + tn]) for r in range(0, k, tk))
                                        for c in range(0, n, tn)))

    @property
    def value(self) -> torch.Tensor:
        """The int64 operand, l0 + l1 2^22 + l2 2^44 mod 2^64 (exact: the limbs are integers)."""
        if self.dense is not None:
            return self.dense.contiguous()
        if self.tiles is not None:
            return torch.cat([torch.cat(col, dim=-2) for col in self.tiles[2]], dim=-1)
        parts = [(l0.to(torch.int64) + (l1.to(torch.int64) << _LIMB_BITS) + (l2.to(torch.int64) << (2 * _LIMB_BITS)))
                 for l0, l1, l2, *_ in self.chunks]
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


    @property
    def compact(self) -> bool:
        """Kept as float32 limbs (12 bytes an element) rather than float64 ones (32)."""
        return self.chunks is not None and len(self.chunks[0]) == 3

    @property
    def nbytes(self) -> int:
        """The memory this operand keeps."""
        if self.chunks is not None:
            return sum(t.numel() * t.element_size() for chunk in self.chunks for t in chunk)
        tensors = [self.dense] if self.dense is not None else [t for col in self.tiles[2] for t in col]
        return sum(t.numel() * t.element_size() for t in tensors)


def limb_budget_bytes() -> int:
    """How much memory a process may spend on full (float64) limbs of its kept matmul
    operands: $SECFORMER_LIMB_BUDGET_MIB, else a sixth of the machine's physical memory.

    Why a sixth: a benchmark or the `secformer run` launcher puts P0, P1 and the dealer on
    one machine, and each keeps its weight shares' limbs (the parties their shares and the
    public F beside them, the dealer its B) next to its activations and correlation stream.
    BERT-base's 85 M encoder weights take 2.7 GB of full limbs, under a sixth of 24 GB; BERT-
    large's 302 M take 9.7 GB, which ran this 24 GB machine out of memory (a party at 9.6 GB,
    2026-11-27) and take 3.6 GB compact."""
    budget = env_mib_bytes(LIMB_BUDGET_ENV)
    if budget is not None:
        return budget
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 6
    except (ValueError, OSError, AttributeError):  # no sysconf: assume the 24 GB this was sized on
        return 4 << 30


def compact_limbs(elements: int) -> bool:
    """Whether a process that keeps `elements` matmul-operand elements in all (its weight
    shares) should keep them compact: only under the limbs kernel, and only when their full
    limbs would pass `limb_budget_bytes`. Compact operands cost a widening per product
    (10 to 20% of a weight product's time on the host of 2026-11-28; end to end,
    benchmarks/results/e2e_notes.md, twenty-fifth series) and save 20 bytes an element.
    One decision for all of a process's weights, so that a model is either all fast or all
    small."""
    # the budget first: measuring the kernels takes a moment a small program should not pay
    return _FULL_BYTES * elements > limb_budget_bytes() and matmul_kernel() == "limbs"


def tile_sizes(shape: torch.Size | tuple) -> tuple[int, int]:
    """(tk, tn): the tile an int64 kernel's `SplitOperand` of this shape is kept in. Only a
    plain matrix is tiled, and only along a dim over 768 (a batched operand stays whole)."""
    k, n = shape[-2], shape[-1]
    if len(shape) != 2:
        return k, n
    return (_TILE if k > _TILE_ABOVE else k), (_TILE if n > _TILE_ABOVE else n)


def _matmul_tiles(a: torch.Tensor, split: SplitOperand) -> torch.Tensor:
    """a @ b mod 2^64 for a tiled b: one int64 product per tile, summed over K per column
    block (wrapping int64 sums are exact mod 2^64)."""
    tk, tn, tiles = split.tiles
    k, n = split.shape[-2:]
    if a.shape[-1] != k:
        raise RuntimeError(f"ring_matmul: shapes {tuple(a.shape)} and {tuple(split.shape)} cannot be multiplied")
    a_parts = [a[..., r:r + tk].contiguous() for r in range(0, k, tk)] if tk < k else [a]
    out = torch.empty(a.shape[:-1] + (n,), dtype=torch.int64)
    for j, col in enumerate(tiles):
        o = out[..., j * tn:(j + 1) * tn]
        for i, tile in enumerate(col):
            part = torch.matmul(a_parts[i], tile)
            o.copy_(part) if i == 0 else o.add_(part)
    return out


def ring_matmul(a: torch.Tensor, b: "torch.Tensor | SplitOperand") -> torch.Tensor:
    """Exact (a @ b) mod 2^64 for int64 tensors (broadcasting like torch.matmul), with the
    process's kernel (`matmul_kernel`). b may be a `SplitOperand` (prepared once, ahead)."""
    split = b if isinstance(b, SplitOperand) else None
    if split is not None:
        if a.device.type == "meta":
            return torch.matmul(a, torch.empty(split.shape, dtype=torch.int64, device="meta"))
    elif a.device.type == "meta" or b.device.type == "meta":
        return torch.matmul(a, b)
    if split is not None:
        if split.dense is not None:
            return torch.matmul(a, split.dense)
        if split.tiles is not None:
            return _matmul_tiles(a, split)
        return _matmul_limbs(a, split.chunks)
    if matmul_kernel() != "limbs":
        return torch.matmul(a, int64_layout(b))
    return _matmul_limbs(a, None, b)


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
