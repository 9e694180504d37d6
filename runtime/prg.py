"""Cryptographic pseudo-random generator: AES-128 in counter mode from `cryptography`.

All masks and correlated randomness come from here (DESIGN.md: torch.Generator and NumPy
generators are not cryptographic). A seed is 16 bytes from `os.urandom`; the dealer and
one computing party that share a seed expand the identical stream, which is how the
dealer hands out correlated randomness while sending only one correction per item.
"""

from __future__ import annotations

import os

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 16
_BLOCK = 16  # AES block size
_ZEROS = bytes(1 << 22)  # the CTR plaintext: keystream = AES-CTR(zeros), drawn in 4 MiB pieces
_ZEROS_VIEW = memoryview(_ZEROS)


def new_seed() -> bytes:
    """A fresh 128-bit seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


class PRG:
    """A stream of uniform bytes (AES-128-CTR keystream) with tensor-shaped draws."""

    def __init__(self, seed: bytes | None = None, stream: int = 0) -> None:
        seed = new_seed() if seed is None else seed
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
        # Independent streams of one seed: the stream number fills the counter block's high
        # 8 bytes, so two streams never reuse a counter before 2^64 blocks (2^68 bytes).
        nonce = int(stream).to_bytes(8, "big") + b"\0" * 8
        self._enc = Cipher(algorithms.AES(seed), modes.CTR(nonce)).encryptor()
        self._seed = seed
        self.bytes_drawn = 0

    def stream(self, stream: int) -> "PRG":
        """Another independent stream of this seed, from its start (same seed on both sides)."""
        return PRG(self._seed, stream)

    def bytes(self, n: int) -> bytearray:
        """The next n keystream bytes, written straight into the returned buffer: the
        keystream encrypts a shared all-zero source (CTR mode), with no per-draw zero buffer
        and no copy (4x faster than `bytearray(update(bytes(n)))` for a 3 MiB draw here)."""
        self.bytes_drawn += n
        # update_into wants room for len(data) + block size - 1 bytes
        buf = bytearray(n + _BLOCK - 1)
        out = memoryview(buf)
        pos = 0
        while pos < n:
            c = min(n - pos, len(_ZEROS))
            pos += self._enc.update_into(_ZEROS_VIEW[:c], out[pos:pos + c + _BLOCK - 1])
        out.release()
        del buf[n:]
        return buf

    def ring(self, shape: tuple[int, ...] | torch.Size, bits: int = 64,
             dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """Uniform tensor (int64 unless `dtype` says otherwise); for bits < 64, uniform in
        [0, 2^bits), or that bit pattern where it fills a narrower signed container.

        A value of `bits` bits is the low bits of the fewest whole keystream bytes that hold
        it (1, 2, 4 or 8 per element): the carry tree's narrow words, bit shares and 33-bit
        comparison masks are most of what a party draws, and at 8 bytes each most of the
        AES output was thrown away. Both ends of a shared seed draw the same way.

        dtype: the container (a signed int dtype of at least `bits` bits; int64 by default).
        The value's bit pattern is the same in every container, so a draw into int16 equals
        the int64 one mod 2^16: the comparisons keep their words narrow (compare.py)."""
        if bits > torch.iinfo(dtype).bits:
            raise ValueError(f"PRG.ring: {bits}-bit values do not fit {dtype}")
        n = 1
        for s in shape:
            n *= int(s)
        if n == 0:
            return torch.zeros(shape, dtype=dtype)
        width = _WIDTH[min(bits, 64)]
        raw = _DTYPE[width] if dtype == torch.int64 else _SIGNED.get(width, _DTYPE[width])
        t = torch.frombuffer(self.bytes(width * n), dtype=raw).reshape(shape)
        signed = raw.is_signed  # a signed word may carry (sign-extended) bits above `bits`
        if t.dtype != dtype:
            t = t.to(dtype)  # an unsigned width is already in [0, 2^(8 width))
        if bits < torch.iinfo(dtype).bits and (signed or bits < 8 * width):
            t = t & ((1 << bits) - 1)
        return t


# keystream bytes per element for a draw of b bits, and the dtype that reads them
_WIDTH = {b: 1 if b <= 8 else 2 if b <= 16 else 4 if b <= 32 else 8 for b in range(1, 65)}
_DTYPE = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.int64}
# the same keystream bytes read as a narrow signed container holds them (no widening copy)
_SIGNED = {2: torch.int16, 4: torch.int32}
