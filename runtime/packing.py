"""Packing ring values into the fewest bytes their bit width needs, for the wire.

A value known to lie in [0, 2^bits) travels in the smallest integer dtype that holds it;
single bits are packed eight to a byte. Every byte that leaves a party goes through here,
so the transport's byte count is the true cost of each opening.
"""

from __future__ import annotations

import math

import torch

_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def wire_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.uint8
    if bits <= 16:
        return torch.int16
    if bits <= 32:
        return torch.int32
    return torch.int64


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that `pack` produces for `numel` values of `bits` bits."""
    if bits == 1:
        return math.ceil(numel / 8)
    return numel * torch.empty((), dtype=wire_dtype(bits)).element_size()


def mask_bits(t: torch.Tensor, bits: int) -> torch.Tensor:
    """t mod 2^bits as a bit pattern: the low `bits` bits, unchanged when the container is
    no wider than that (int64 at 64 bits, int16 / int32 for narrow comparison words)."""
    return t if bits >= 64 or bits >= torch.iinfo(t.dtype).bits else t & ((1 << bits) - 1)


def pack(t: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 values in [0, 2^bits) (or any int64 when bits == 64) -> flat uint8 buffer."""
    flat = t.reshape(-1)
    if bits == 1:
        n = flat.numel()
        pad = (-n) % 8
        b = flat.to(torch.uint8) & 1
        if pad:
            b = torch.cat([b, torch.zeros(pad, dtype=torch.uint8)])
        return (b.view(-1, 8) * _WEIGHTS).sum(dim=1, dtype=torch.uint8) if b.numel() else b
    return flat.to(wire_dtype(bits)).contiguous().view(torch.uint8)


def unpack(buf: torch.Tensor, shape: torch.Size | tuple[int, ...], bits: int,
           dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Inverse of `pack`: values in [0, 2^bits) (full int64 when bits == 64) in `dtype`.

    dtype: a signed container of at least `bits` bits (int16 / int32 for the comparisons'
    narrow words, compare.py); a value that fills its container comes back as that bit
    pattern (negative when its top bit is set)."""
    numel = math.prod(shape)
    if bits > torch.iinfo(dtype).bits:
        raise ValueError(f"unpack: {bits}-bit values do not fit {dtype}")
    if bits == 1:
        b = (buf.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
        return b.reshape(-1)[:numel].to(dtype).reshape(shape)
    dt = wire_dtype(bits)
    if buf.storage_offset() % torch.empty((), dtype=dt).element_size():
        buf = buf.clone()  # a slice of a larger stream may be misaligned for a wider view
    t = buf.view(dt).reshape(shape)
    if dt != dtype:
        t = t.to(dtype)  # widening a signed wire word sign-extends: the mask clears it
    return mask_bits(t, bits)
