"""Correlated randomness: the dealer's side and each computing party's side of one stream.

The dealer shares one PRG seed with P0 and another with P1. Every correlation is a list of
*sources* (uniform secrets; each party's share is drawn from its own seed, so sources cost
no communication) and *derived* values computed from the sources by the dealer (a Beaver
product, sin/cos of a mask, ...). P0's share of a derived value is drawn from P0's seed;
P1 receives the one correction share `derived - share0` from the dealer. So the dealer
sends exactly one correction per derived item, to one party (issue 2, item 3).

All three roles run the *same protocol code*: the dealer runs it on `meta` tensors (shapes
only, no data and no cost), and its `DealerCorrelations` generate the real material while
handing meta placeholders to the protocol. P0 and P1 must request correlations in the
same order, which they do because control flow in a protocol never depends on secrets.

`ClearCorrelations` makes every source zero and every derived value `derive(0, ...)` held by
P0: running a protocol in the clear with it (P1's shares all zero) executes exactly the
party's fixed-point arithmetic, which is what the simulator does.
"""

from __future__ import annotations

import types
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch

from .packing import mask_bits, pack, packed_nbytes, unpack
from .prg import PRG
from .ring import SplitOperand, compact_limbs, public_operand, ring_matmul

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dom:
    """The domain of a shared value: additive mod 2^bits or XOR over `bits` bits.

    owner: None = secret-shared between P0 and P1; 0 or 1 = known to that party alone (the
    other's share is zero), e.g. a private mask for a dealer-assisted product.
    """

    kind: str = "add"
    bits: int = 64
    owner: int | None = None

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return mask_bits(a + b if self.kind == "add" else a ^ b, self.bits)

    def split(self, value: torch.Tensor, share0: torch.Tensor) -> torch.Tensor:
        return mask_bits(value - share0 if self.kind == "add" else value ^ share0, self.bits)


RING = Dom("add", 64)


def bits_dom(bits: int, owner: int | None = None) -> Dom:
    return Dom("xor", bits, owner)


def mod_dom(bits: int, owner: int | None = None) -> Dom:
    return Dom("add", bits, owner)


Source = tuple[Sequence[int], Dom]
Derive = Callable[..., Sequence[torch.Tensor]]
Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The activation masks of fixed-weight products come from their own PRG stream of each
# party's seed, so a party can draw them, and compute its share of A @ F, before the input
# exists (`PartyCorrelations.prepare_products`) without disturbing the main stream's order.
LINEAR_STREAM = 1


def _dtypes(dtype) -> tuple[torch.dtype, torch.dtype]:
    """(sources' container, derived values' container) of a `correlated` dtype argument."""
    return tuple(dtype) if isinstance(dtype, tuple) else (dtype, dtype)


def _meta(shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.int64, device="meta")


# Shapes of a derive function's values, run once on meta tensors per (code, input shapes,
# captured values) and then looked up: an elementwise op on meta tensors runs torch's Python
# reference kernels (about 100 us each, measured), and every role paid that for every
# correlated request of every request (about 900 per BERT-base inference per party).
_SHAPES: dict[tuple, list[Shape]] = {}
_SHAPES_MAX = 4096


def _fn_key(fn: Any, depth: int = 0) -> Hashable | None:
    """What `fn`'s result shapes can depend on besides its inputs' shapes: its code and what
    it captured (tensors by shape and dtype, plain values by value, nested functions the same
    way). None when something captured is none of those: such a function is not cached."""
    if depth > 4:
        return None
    if isinstance(fn, types.BuiltinFunctionType):  # torch.mul and the like: itself
        return fn
    if not isinstance(fn, types.FunctionType):  # bound methods, partials: not cached
        return None
    code = fn.__code__
    parts: list[Hashable] = [code]
    for v in list(fn.__closure__ or ()) + list(fn.__defaults__ or ()):
        if not isinstance(v, torch.Tensor) and hasattr(v, "cell_contents"):
            try:
                v = v.cell_contents
            except ValueError:  # an empty cell
                return None
        if isinstance(v, torch.Tensor):
            parts.append(("t", tuple(v.shape), v.dtype))
        elif v is None or isinstance(v, (bool, int, float, str)):
            parts.append(("v", type(v), v))
        elif callable(v):
            sub = _fn_key(v, depth + 1)
            if sub is None:
                return None
            parts.append(sub)
        else:
            return None
    return tuple(parts)


def derived_shapes(fn: Callable[..., Sequence[torch.Tensor]], shapes: Sequence[Sequence[int]]) -> list[Shape]:
    """The shapes of fn(*values) for values of `shapes`, without computing them (meta tensors,
    cached: `_fn_key`)."""
    fkey = _fn_key(fn)
    key = None if fkey is None else (fkey, tuple(tuple(int(d) for d in s) for s in shapes))
    hit = None if key is None else _SHAPES.get(key)  # one lookup: roles may be threads
    if hit is not None:
        return hit
    out = [tuple(t.shape) for t in fn(*[_meta(s) for s in shapes])]
    if key is not None:
        if len(_SHAPES) >= _SHAPES_MAX:
            _SHAPES.clear()
        _SHAPES[key] = out
    return out


class Correlations(ABC):
    """Interface shared by the party, dealer and clear implementations."""

    def __init__(self) -> None:
        self._fixed_shapes: dict[str, list[Shape]] = {}
        self._public: dict[str, torch.Tensor] = {}

    def random(self, shape: Sequence[int], dom: Dom = RING) -> torch.Tensor:
        """This party's share of a fresh uniform secret in `dom`."""
        return self.correlated([(shape, dom)])[0]

    def correlated(self, sources: Sequence[Source], derive: Derive | None = None,
                   out_doms: Sequence[Dom] = (),
                   keep: str | None = None, zero_at_zero: bool = False,
                   out_shapes: Sequence[Sequence[int]] | None = None,
                   dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
        """Shares of the sources, then of `derive(*sources)` (one per out_dom).

        keep: remember these sources under a key so `fixed_product` can use them (a fixed
        weight's mask, reused across inferences).
        zero_at_zero: derive(0, ...) is 0 (Beaver products); lets the simulator skip it.
        out_shapes: the derived values' shapes when the caller knows them: spares running
        `derive` on meta tensors (a few dozen microseconds per op, paid by every role).
        dtype: the container of the returned shares (every domain must fit it): int16 or
        int32 for the comparisons' narrow words, drawn and received without an int64 copy.
        The dealer's `derive` sees the sources in that container too (bit operations).
        A pair (sources' container, derived values' container) gives the derived values
        their own: uint8 for bytes of packed bit tables (lookup.lookup_bits), read and sent
        without a widening copy.
        """
        self._zero_at_zero = zero_at_zero
        if keep is not None:
            if keep in self._fixed_shapes:
                raise KeyError(f"correlation key {keep!r} is already in use")
            self._fixed_shapes[keep] = [tuple(s) for s, _ in sources]
        if out_shapes is not None:
            out_shapes = [tuple(s) for s in out_shapes]
        elif derive is not None:
            out_shapes = derived_shapes(derive, [s for s, _ in sources])
        else:
            out_shapes = []
        if derive is not None:
            if len(out_shapes) != len(out_doms):
                raise ValueError("derive returned a different number of values than out_doms")
        src_dt, out_dt = _dtypes(dtype)
        if any(d.bits > torch.iinfo(src_dt).bits for _, d in sources) or \
                any(d.bits > torch.iinfo(out_dt).bits for d in out_doms):
            raise ValueError(f"correlated: a domain is wider than the {dtype} container")
        return self._draw(sources, derive, out_doms, out_shapes, keep, dtype)

    @abstractmethod
    def _draw(self, sources, derive, out_doms, out_shapes, keep,
              dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
        """Produce this role's shares (see `correlated`)."""

    def publish(self, key: str, masked: torch.Tensor) -> torch.Tensor:
        """Record the opened F = W - B of the fixed source `key` (P0 and P1 both know it);
        returns the tensor kept. A matrix is kept in the layout of the process's int64 ring
        matmul kernel (ring.public_operand: column-major for "int64-colmajor", tiled when
        large), so each party's A_i @ F (prepare_products) makes no copy of F per call and no
        second copy of F is kept (the caller's FixedOperand holds the returned one)."""
        masked = public_operand(masked)
        self._public[key] = masked
        return masked

    def _public_for(self, key: str, op: Op) -> torch.Tensor | SplitOperand:
        """F of `key` as `op` takes it (a prepared matmul operand is rebuilt for other ops)."""
        pub = self._public[key]
        return pub.value if isinstance(pub, SplitOperand) and op is not ring_matmul else pub

    def _product_shape(self, shape: Sequence[int], key: str, op: Op) -> Shape:
        fixed = self._fixed_shapes[key][0]
        return derived_shapes(lambda a, b: [op(a, b)], [shape, fixed])[0]

    @abstractmethod
    def fixed_product(self, shape: Sequence[int], key: str, op: Op) -> list[torch.Tensor]:
        """For x (shape) times the fixed secret W kept under `key` (mask B, F = W - B public):
        this party's shares of a fresh mask A, of A op F (computed locally from its A share and
        the public F, ahead of time when prepared) and of C = A op B (dealer-derived).

        x op W = E op W + A op F + C with E = x - A opened, so the online phase computes one
        product (E op W_i) instead of two (x_i op F and E op B_i)."""


class PartyCorrelations(Correlations):
    """P0's or P1's view: sources and P0's derived shares from the seed, P1's from corrections."""

    def __init__(self, party: int, prg: PRG) -> None:
        super().__init__()
        self.party = party
        self.prg = prg
        self.linear_prg = prg.stream(LINEAR_STREAM)
        self._ahead: deque = deque()  # (key, shape, A_i, A_i op F) drawn before the input
        self._buf: torch.Tensor | None = None
        self._pos = 0

    def prepare_products(self, requests: Sequence[tuple[str, Shape, Op]]) -> None:
        """Offline: draw the masks of the next program's fixed products (in its order) and
        compute A_i op F for each, so the online phase does one product per fixed operand."""
        for key, shape, op in requests:
            a = self.linear_prg.ring(shape)
            # A weight fixed by this same program is not open yet: its product waits online.
            pre = op(a, self._public_for(key, op)) if key in self._public else None
            self._ahead.append((key, tuple(shape), a, pre))

    def prepared_left(self) -> int:
        """Prepared fixed products not used yet (0 after a program that matched its preparation)."""
        return len(self._ahead)

    def discard_prepared(self) -> None:
        self._ahead.clear()

    def fixed_product(self, shape, key, op):
        out_shape = self._product_shape(shape, key, op)
        if self._ahead:
            k, s, a, pre = self._ahead.popleft()
            if (k, s) != (key, tuple(shape)):
                raise RuntimeError(f"prepared fixed products out of order: expected {key} {tuple(shape)}, "
                                   f"have {k} {s} (prepare with the same program and arguments)")
        else:
            a, pre = self.linear_prg.ring(shape), None
        if pre is None:
            pre = op(a, self._public_for(key, op))
        c = self.prg.ring(out_shape) if self.party == 0 else self._take(out_shape, 64)
        return [a, pre, c]

    def load_corrections(self, buf: torch.Tensor, fetch: Callable[[], torch.Tensor] | None = None) -> None:
        """P1: the dealer's correction stream for the next program (uint8 buffer). `fetch`
        returns the next chunk when the buffer runs out (an empty chunk ends the stream)."""
        self._buf, self._pos, self._fetch, self._ended = buf, 0, fetch, fetch is None

    def remaining_corrections(self) -> int:
        """Unused correction bytes, reading the stream to its end marker."""
        left = 0 if self._buf is None else self._buf.numel() - self._pos
        while self._next_chunk():
            left += self._buf.numel()
        return left

    def _next_chunk(self) -> bool:
        """Move on to the stream's next chunk (False at its end). The old chunk's unread tail
        is the caller's to keep: only an item that straddles two chunks is copied (`_take`),
        never a whole chunk (a copy per 64 MiB chunk was 1.6 GB per BERT-base inference)."""
        if self._ended:
            return False
        chunk = self._fetch()
        if chunk.numel() == 0:
            self._ended = True
            return False
        self._buf, self._pos = chunk, 0
        return True

    def _draw(self, sources, derive, out_doms, out_shapes, keep, dtype=torch.int64):
        dtype, out_dt = _dtypes(dtype)
        out = []
        for shape, dom in sources:
            if dom.owner is None or dom.owner == self.party:
                out.append(self.prg.ring(shape, dom.bits, dtype))
            else:
                out.append(torch.zeros(tuple(shape), dtype=dtype))
        for shape, dom in zip(out_shapes, out_doms):
            if self.party == 0:
                out.append(self.prg.ring(shape, dom.bits, out_dt))
            else:
                out.append(self._take(shape, dom.bits, out_dt))
        return out

    def _take(self, shape: Shape, bits: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        n = packed_nbytes(int(torch.Size(shape).numel()), bits)
        if self._buf is not None and self._pos + n <= self._buf.numel():
            item = self._buf[self._pos:self._pos + n]
            self._pos += n
            return unpack(item, shape, bits, dtype)
        # The item straddles chunks: its pieces are the current tail and the next chunks' heads.
        parts = [self._buf[self._pos:]] if self._buf is not None and self._pos < self._buf.numel() else []
        need = n - sum(p.numel() for p in parts)
        while need > 0:
            if not self._next_chunk():
                raise RuntimeError(
                    "P1 ran out of dealer corrections: the dealer ran a different program "
                    "(check that all roles compiled the same artifact)")
            take = min(need, self._buf.numel())
            parts.append(self._buf[:take])
            self._pos, need = take, need - take
        item = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.zeros(0, dtype=torch.uint8)
        return unpack(item, shape, bits, dtype)


class DealerCorrelations(Correlations):
    """The dealer: mirrors both parties' seeds, computes derived values, emits P1's corrections."""

    # 16 MiB: the dealer concatenates a chunk before sending it and P1 holds the one it reads
    # (and any still referenced); 256 MiB chunks cost both up to ~0.5 GB more at seq 512.
    # Below glibc's largest mmap threshold (32 MiB), so a role serving requests reuses its
    # heap's pages for them instead of mapping and faulting in fresh ones (runtime/memory.py).
    default_chunk_bytes = 16 << 20

    def __init__(self, prg0: PRG, prg1: PRG, flush: Callable[[torch.Tensor], None] | None = None,
                 chunk_bytes: int | None = None) -> None:
        super().__init__()
        self.prg0, self.prg1 = prg0, prg1
        self.linear0, self.linear1 = prg0.stream(LINEAR_STREAM), prg1.stream(LINEAR_STREAM)
        self._fixed_values: dict[str, list[torch.Tensor]] = {}
        # B of each fixed matmul operand prepared once for the matmul kernel (ring.SplitOperand):
        # every inference's C = A @ B reuses it
        self._fixed_split: dict[str, SplitOperand] = {}
        self._compact: bool | None = None  # whether they are kept compact (ring.compact_limbs)
        self.corrections: list[torch.Tensor] = []  # without `flush`: the stream so far, in pieces
        self.correction_bytes = 0
        # Stream P1's corrections in chunks so neither side holds a whole model's worth
        # (several GB for BERT-base); the dealer still runs ahead of the online phase. With
        # `flush`, corrections are written into a chunk buffer as they are made (a 64-bit one
        # is computed straight into it), and each full chunk is handed to `flush`, which
        # then owns it: no concatenation, no per-item tensor (they were 14% of the dealer's
        # online samples, profile_base.md).
        self.flush = flush
        self.chunk_bytes = chunk_bytes or DealerCorrelations.default_chunk_bytes
        self._chunk: torch.Tensor | None = None
        self._fill = 0
        self._log: list | None = None  # the requests of the program being recorded

    # A program's requests depend only on public shapes (DESIGN.md: control flow never
    # depends on a secret), so the dealer can run a program once on meta tensors, keep the
    # list of requests it made, and replay that list for every later inference of the same
    # program and shapes: the same draws in the same order, so the same correction stream
    # byte for byte, without re-running the protocol code (most of the dealer's CPU was
    # torch's meta kernels and the generators' Python, not the correlations themselves).

    def start_recording(self) -> list:
        """Record every request from now on; returns the (growing) list."""
        self._log = []
        return self._log

    def stop_recording(self) -> None:
        self._log = None

    def replay(self, plan: Sequence[tuple]) -> None:
        """Serve a recorded request list again: fresh draws, in the recorded order."""
        for entry in plan:
            if entry[0] == "draw":
                self._draw(*entry[1:])
            else:
                self.fixed_product(*entry[1:])

    def take_corrections(self) -> torch.Tensor:
        """P1's correction stream since the last call (or the last chunk handed to `flush`),
        as one uint8 buffer."""
        self._chunk_to_list()
        buf = torch.cat(self.corrections) if len(self.corrections) > 1 else \
            self.corrections[0] if self.corrections else torch.zeros(0, dtype=torch.uint8)
        self.corrections = []
        return buf

    # --- the chunk buffer (with `flush`) ------------------------------------------------------

    def _chunk_to_list(self) -> None:
        """Move the partly filled chunk to the list (it comes after what the list holds)."""
        if self._chunk is not None and self._fill:
            self.corrections.append(self._chunk[:self._fill])
        self._chunk, self._fill = None, 0

    def _room(self) -> int:
        """Bytes left in the current chunk, opening a fresh one (with `flush`) if none is."""
        if self._chunk is None:
            if self.corrections:  # made before `flush` was set: they come first
                pending, self.corrections = self.corrections, []
                for part in pending:
                    self._put(part)
            if self._chunk is None:
                self._chunk, self._fill = torch.empty(self.chunk_bytes, dtype=torch.uint8), 0
        return self.chunk_bytes - self._fill

    def _advance(self, n: int) -> None:
        self._fill += n
        self.correction_bytes += n
        if self._fill == self.chunk_bytes:  # full: `flush` owns it now, the next one is fresh
            chunk, self._chunk, self._fill = self._chunk, None, 0
            self.flush(chunk)

    def _put(self, corr: torch.Tensor) -> None:
        """Append packed corrections (uint8) to the stream, across chunks as they fill."""
        if self.flush is None:
            self._chunk_to_list()
            self.corrections.append(corr)
            self.correction_bytes += corr.numel()
            return
        pos, n = 0, corr.numel()
        while pos < n:
            take = min(n - pos, self._room())
            self._chunk[self._fill:self._fill + take].copy_(corr[pos:pos + take])
            pos += take
            self._advance(take)

    def _draw(self, sources, derive, out_doms, out_shapes, keep, dtype=torch.int64):
        # the dealer computes in the parties' container: the same bit patterns, and the
        # comparisons' narrow words cost it as little as them
        if self._log is not None:
            self._log.append(("draw", sources, derive, out_doms, out_shapes, keep, dtype))
        dtype, out_dt = _dtypes(dtype)
        secrets = []
        for shape, dom in sources:
            s0 = self.prg0.ring(shape, dom.bits, dtype) if dom.owner in (None, 0) else None
            s1 = self.prg1.ring(shape, dom.bits, dtype) if dom.owner in (None, 1) else None
            if s0 is None:
                secrets.append(s1)
            elif s1 is None:
                secrets.append(s0)
            else:
                secrets.append(dom.combine(s0, s1))
        if keep is not None:
            self._fixed_values[keep] = secrets
        if derive is not None:
            for value, shape, dom in zip(derive(*secrets), out_shapes, out_doms):
                self._emit(value, shape, dom, out_dt)
        return [_meta(s) for s, _ in sources] + [_meta(s) for s in out_shapes]

    def _emit(self, value: torch.Tensor, shape: Shape, dom: Dom,
              dtype: torch.dtype = torch.int64) -> None:
        """P1's correction for a derived value: value - P0's share drawn from P0's seed."""
        share0 = self.prg0.ring(shape, dom.bits, dtype)
        n = 8 * share0.numel()
        if (self.flush is not None and dom.bits == 64 and n and self._room() >= n
                and self._fill % 8 == 0):
            # the common case (ring values): the 64-bit correction is made in its place in the
            # chunk, exactly the bytes `pack` would give
            out = self._chunk[self._fill:self._fill + n].view(torch.int64).view(share0.shape)
            value = value.to(torch.int64)
            if dom.kind == "add":
                torch.sub(value, share0, out=out)
            else:
                torch.bitwise_xor(value, share0, out=out)
            self._advance(n)
            return
        self._put(pack(dom.split(value.to(dtype), share0), dom.bits))

    def fixed_product(self, shape, key, op):
        if self._log is not None:
            self._log.append(("fixed", shape, key, op))
        a = self.linear0.ring(shape) + self.linear1.ring(shape)
        b = self._fixed_values[key][0]
        if key in self._fixed_split:  # B is kept prepared only (ring.SplitOperand)
            b = self._fixed_split[key] if op is ring_matmul else self._fixed_split[key].value
        elif op is ring_matmul and b.device.type != "meta":
            if self._compact is None:  # decided once, by all the weights loaded (ring.compact_limbs)
                self._compact = compact_limbs(sum(v[0].numel() for v in self._fixed_values.values()
                                                  if v[0] is not None and v[0].dim() >= 2))
            b = self._fixed_split[key] = SplitOperand(b, self._compact)
            self._fixed_values[key][0] = None  # the prepared operand holds B: do not keep it twice
        value = op(a, b)  # C = A op B; the dealer never sees F
        self._emit(value, tuple(value.shape), RING)
        return [_meta(shape), _meta(value.shape), _meta(value.shape)]


class ClearCorrelations(Correlations):
    """The simulator's view: all sources zero, derived values held entirely by P0."""

    def _draw(self, sources, derive, out_doms, out_shapes, keep, dtype=torch.int64):
        dtype, out_dt = _dtypes(dtype)
        zeros = [torch.zeros(tuple(s), dtype=torch.int64) for s, _ in sources]
        derived = []
        if derive is not None and self._zero_at_zero:
            derived = [torch.zeros(s, dtype=torch.int64) for s in out_shapes]
        elif derive is not None:
            for value, dom in zip(derive(*zeros), out_doms):
                derived.append(mask_bits(value.to(torch.int64), dom.bits))
        return [t.to(dtype) for t in zeros] + [t.to(out_dt) for t in derived]

    def fixed_product(self, shape, key, op):
        out = self._product_shape(shape, key, op)
        return [torch.zeros(tuple(shape), dtype=torch.int64), torch.zeros(out, dtype=torch.int64),
                torch.zeros(out, dtype=torch.int64)]


class RecordingCorrelations(Correlations):
    """A party's offline pass: runs the program on meta tensors and records, in order, the
    fixed products it will ask for, so `PartyCorrelations.prepare_products` can compute them
    before the input arrives. Draws nothing."""

    def __init__(self, like: Correlations) -> None:
        super().__init__()
        self._fixed_shapes = dict(like._fixed_shapes)
        self.requests: list[tuple[str, Shape, Op]] = []

    def _draw(self, sources, derive, out_doms, out_shapes, keep, dtype=torch.int64):
        return [_meta(s) for s, _ in sources] + [_meta(s) for s in out_shapes]

    def fixed_product(self, shape, key, op):
        out = self._product_shape(shape, key, op)
        self.requests.append((key, tuple(shape), op))
        return [_meta(shape), _meta(out), _meta(out)]
