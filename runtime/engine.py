"""Drives protocol generators for one role: packs openings, talks to the peer, counts cost.

`Role` is one of P0, P1 or the dealer with its persistent state (PRG streams, fixed
correlations). `Role.run(program, *args)` runs one program: the dealer first runs it on
meta tensors (the offline phase: before any input exists it produces P1's whole
correction stream and sends it as one blob), then P0 and P1 run it online. Each party has
its own offline phase too (`Role.prepare`): a meta-tensor pass records the program's
fixed-weight products so their input-independent half (A_i @ F) is computed before the
online phase starts. Both offline passes are recorded the first time a program runs with
given argument shapes and replayed after that (`plan_key`, `Role.dealer_offline`): the
requests depend only on public shapes. The same function serves threads (`runtime.local`)
and processes (`runtime.dist`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .context import CLEAR, DEALER, DEALER_MODE, P0, P1, PARTY, ROLE_NAMES, Context, clear_context
from .correlations import DealerCorrelations, PartyCorrelations, RecordingCorrelations
from .memory import release_free_memory
from .messages import ADD, SWAP, XOR, Counter, Msg, Protocol
from .packing import mask_bits, pack, packed_nbytes, unpack
from .prg import PRG, new_seed
from .protocols.arith import FIXED_OPERANDS
from .ring import FixedPoint, chosen_kernel, compact_limbs, ring_matmul
from .transport import PeerError, Transport


class Engine:
    """Executes the rounds a protocol yields, for one role, and counts them."""

    def __init__(self, ctx: Context, transport: Transport | None = None) -> None:
        self.ctx = ctx
        self.transport = transport
        self.counter = Counter()

    def run(self, gen: Protocol) -> Any:
        try:
            msgs = next(gen)
            while True:
                msgs = gen.send(self.step(msgs))
        except StopIteration as stop:
            return stop.value

    def step(self, msgs: list[Msg]) -> list:
        if not msgs:
            return []
        mode = self.ctx.mode
        if mode == DEALER_MODE:
            return [[torch.empty_like(t) for t in m.tensors] for m in msgs]
        if mode == CLEAR:
            return self._step_clear(msgs)
        return self._step_party(msgs)

    def _account(self, msgs: list[Msg], party: int) -> None:
        self.counter.rounds += 1
        seen = set()
        for m in msgs:
            sent = sum(packed_nbytes(t.numel(), m.bits) for t in m.tensors) if m.sends(party) else 0
            recv = sum(packed_nbytes(t.numel(), m.bits) for t in m.tensors) if m.receives(party) else 0
            first = m.tag not in seen
            seen.add(m.tag)
            self.counter.add(m.tag, sent, recv, first)

    def _step_clear(self, msgs: list[Msg]) -> list:
        self._account(msgs, P0)
        out = []
        for m in msgs:
            if m.kind == SWAP:
                out.append([torch.zeros_like(t) for t in m.tensors])
            else:
                out.append([mask_bits(t, m.bits) for t in m.tensors])
        return out

    def _step_party(self, msgs: list[Msg]) -> list:
        me = self.ctx.party
        peer = P1 if me == P0 else P0
        self._account(msgs, me)
        chunks, nbytes = [], 0
        for m in msgs:
            if m.sends(me):
                chunks += [pack(mask_bits(t, m.bits), m.bits) for t in m.tensors]
            if m.receives(me):
                nbytes += sum(packed_nbytes(t.numel(), m.bits) for t in m.tensors)
        payload = torch.cat(chunks) if chunks else None
        buf = self.transport.exchange(peer, payload, nbytes)
        out, pos = [], 0
        for m in msgs:
            if not m.receives(me):
                out.append(None)
                continue
            res = []
            for t in m.tensors:
                n = packed_nbytes(t.numel(), m.bits)
                # the container of what was sent (int16 / int32 for narrow comparison words)
                theirs = unpack(buf[pos:pos + n], t.shape, m.bits,
                                t.dtype if t.dtype in (torch.int16, torch.int32) else torch.int64)
                pos += n
                if m.kind == ADD:
                    res.append(mask_bits(t + theirs, m.bits))
                elif m.kind == XOR:
                    res.append(mask_bits(t ^ theirs, m.bits))
                else:
                    res.append(theirs)
            out.append(res)
        return out


def meta_like(x: Any) -> Any:
    """Replace every tensor in a nested argument structure by a meta tensor of its shape."""
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    as_meta = getattr(x, "as_meta", None)  # a lazily read mapping of tensors (artifact.ShareFile)
    if callable(as_meta) and not isinstance(x, type):
        return as_meta()
    if isinstance(x, (list, tuple)):
        return type(x)(meta_like(v) for v in x)
    if isinstance(x, dict):
        return {k: meta_like(v) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: meta_like(getattr(x, f.name))
                                         for f in dataclasses.fields(x) if f.init})
    return x


def plan_key(program: Callable[..., Protocol], args: tuple) -> Any:
    """What an offline pass depends on: the program and its arguments' public structure.

    Tensors count by shape and dtype (their values are secret or not there at all: the
    dealer and the offline passes see meta tensors); an object with a `fingerprint()`
    method (the IR graph) by that digest, so that a fresh unpickled copy of the same program
    (a process cluster sends one with every request) finds the recorded pass; everything
    else (ints, names, functions) by value or identity. None when an argument is
    unhashable: then nothing is recorded. A party keys its prepare pass on `_offline_args` (progress
    callbacks dropped), which is also what that pass runs."""
    def sig(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("tensor", tuple(x.shape), x.dtype)
        if isinstance(x, (list, tuple)):
            return (type(x).__name__,) + tuple(sig(v) for v in x)
        if isinstance(x, dict):
            return ("dict",) + tuple((k, sig(v)) for k, v in x.items())
        fp = getattr(x, "fingerprint", None)
        if callable(fp) and not isinstance(x, type):
            try:
                return ("fingerprint", type(x).__qualname__, fp())
            except Exception as e:  # noqa: BLE001 - no digest: the pass is simply not recorded
                raise TypeError(f"no fingerprint: {e}") from e
        hash(x)
        return x
    try:
        return (program, sig(args))
    except TypeError:
        return None


def _offline_args(args: tuple) -> tuple:
    """Arguments for a party's offline pass: shapes only, and no callbacks (a progress bar
    must not see the meta pass)."""
    return tuple(None if callable(a) and not isinstance(a, torch.Tensor) else a for a in meta_like(args))


class Role:
    """One role's persistent state across programs (seeds, fixed masks, counters)."""

    def __init__(self, rank: int, transport: Transport, fxp: FixedPoint | None = None,
                 trunc: str = "exact") -> None:
        self.rank = rank
        self.transport = transport
        self.fxp = fxp or FixedPoint()
        self.trunc = trunc
        self.ctx: Context | None = None
        self.engine: Engine | None = None
        self.dealer_bytes = 0
        self.auto_prepare = True  # parties: run `prepare` before each program unless done
        self._prepared = False
        # recorded offline passes by (program, argument shapes): the dealer's request lists
        # and the parties' fixed-product lists (see `dealer_offline` and `prepare`)
        self._plans: dict[Any, Any] = {}
        # whether this role's last offline pass (the dealer's, or a party's prepare) replayed
        # a recorded one instead of running the program on meta tensors
        self.replayed = False

    @property
    def name(self) -> str:
        return ROLE_NAMES[self.rank]

    def setup(self) -> None:
        """Key distribution: the dealer draws one seed per party and sends it (16 bytes each)."""
        t = self.transport
        if self.rank == DEALER:
            s0, s1 = new_seed(), new_seed()
            t.send(P0, torch.frombuffer(bytearray(s0), dtype=torch.uint8))
            t.send(P1, torch.frombuffer(bytearray(s1), dtype=torch.uint8))
            corr = DealerCorrelations(PRG(s0), PRG(s1), flush=lambda buf: self._send_chunk(buf))
            self.ctx = Context(DEALER, DEALER_MODE, corr, self.fxp, self.trunc)
        else:
            seed = bytes(t.recv(DEALER, 16).tolist())
            corr = PartyCorrelations(self.rank, PRG(seed))
            self.ctx = Context(self.rank, PARTY, corr, self.fxp, self.trunc, private=PRG())
        self.engine = Engine(self.ctx, t)

    def _send_chunk(self, buf: torch.Tensor) -> None:
        # not waiting for P1 to take it: the dealer makes the next chunk meanwhile (the
        # program's end waits for all of them: `transport.drain`)
        self.transport.send_blob(P1, buf, wait=False)
        self.dealer_bytes += buf.numel() + 8

    def prepare(self, program: Callable[..., Protocol], *args: Any) -> None:
        """A computing party's offline phase for the next `run(program, *args)`.

        Runs the program on meta tensors (as the dealer does, so the order of requests is
        the same) to list its fixed-weight products, then draws their masks and computes
        A_i @ F for each. Needs no input values and no communication."""
        if self.ctx is None:
            self.setup()
        if self.rank == DEALER:
            return
        key = plan_key(program, _offline_args(args))
        requests = self._plans.get(key) if key is not None else None
        self.replayed = requests is not None
        if requests is None:
            rec = RecordingCorrelations(self.ctx.corr)
            rctx = Context(DEALER, DEALER_MODE, rec, self.fxp, self.trunc, state=meta_like(self.ctx.state),
                           recording=True)
            Engine(rctx).run(program(rctx, *_offline_args(args)))
            requests = rec.requests
            self._remember(key, requests)
        self.ctx.corr.prepare_products(requests)
        # Prepare this party's weight shares for the matmul kernel now rather than in the
        # first request's online phase (kept for every later request: ring.SplitOperand).
        # All of them compact or none, by the total (ring.compact_limbs: BERT-large's full
        # limbs do not fit beside the other two roles on one 24 GB machine).
        fixed = self.ctx.state.get(FIXED_OPERANDS, {})
        operands = {key: fixed[key] for key, _shape, op in requests if op is ring_matmul and key in fixed}
        fresh = [w for w in operands.values() if w.split is None]
        compact = compact_limbs(sum(w.share.numel() for w in fresh))
        for w in fresh:
            w.split_share(compact)
        if fresh:  # a one-off phase: give its temporaries and the freed int64 shares back
            release_free_memory()
        self._prepared = True

    def operand_form(self) -> str:
        """How this role keeps its weight matmul operands: its ring kernel (ring.matmul_kernel;
        "none" before its first ring product), with "compact" where its limbs are kept compact
        (ring.compact_limbs). Recorded by a benchmark beside its memory figures."""
        kernel = chosen_kernel() or "none"  # "none": no ring product yet (not measured for this)
        if self.ctx is None:
            return kernel
        if self.rank == DEALER:
            compact = bool(getattr(self.ctx.corr, "_compact", False))
        else:
            compact = any(w.split is not None and w.split.compact
                          for w in self.ctx.state.get(FIXED_OPERANDS, {}).values())
        return f"{kernel} compact" if compact else kernel

    MAX_PLANS = 16  # recorded passes kept (programs x shapes; accuracy runs use a few buckets)

    def _remember(self, key: Any, plan: Any) -> None:
        if key is None:
            return
        if len(self._plans) >= self.MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan

    def dealer_offline(self, program: Callable[..., Protocol], *args: Any) -> None:
        """The dealer's half of `run`: produce the program's correlations (P1's corrections
        go out through the correlations' flush and `take_corrections`).

        The first time a program runs with given argument shapes the dealer runs it on meta
        tensors and records its requests (`DealerCorrelations.start_recording`); later runs
        replay the list. A program that fixes operands (`keep`: the weight loading) is not
        recorded: it runs once, and its keys may not be registered twice."""
        corr = self.ctx.corr
        key = plan_key(program, args)
        plan = self._plans.get(key) if key is not None else None
        self.replayed = plan is not None
        if plan is not None:
            corr.replay(plan)
            return
        log = corr.start_recording()
        try:
            self.engine.run(program(self.ctx, *meta_like(args)))
        finally:
            corr.stop_recording()
        # ("draw", sources, derive, out_doms, out_shapes, keep, dtype): index 5 is `keep`
        if not any(e[0] == "draw" and e[5] is not None for e in log):
            self._remember(key, log)

    def run(self, program: Callable[..., Protocol], *args: Any) -> Any:
        """Run one program: offline (dealer) then online (P0, P1). Returns this role's result."""
        if self.ctx is None:
            self.setup()
        if self.rank != DEALER and self.auto_prepare and not self._prepared:
            self.prepare(program, *args)
        self._prepared = False
        if self.rank == DEALER:
            self.dealer_offline(program, *args)
            buf = self.ctx.corr.take_corrections()
            if buf.numel():
                self._send_chunk(buf)
            self._send_chunk(buf[:0])  # end of this program's stream
            self.transport.drain()
            return None
        if self.rank == P1:
            first = self.transport.recv_blob(DEALER)
            fetch = lambda: self.transport.recv_blob(DEALER)  # noqa: E731
            if first.numel():
                self.ctx.corr.load_corrections(first, fetch)
            else:
                self.ctx.corr.load_corrections(first)
        try:
            out = self.engine.run(program(self.ctx, *args))
        finally:
            left = self.ctx.corr.prepared_left()
            self.ctx.corr.discard_prepared()
        if left:
            raise RuntimeError(f"{self.name}: {left} prepared fixed products were not used: "
                               "prepare() was called for a different program or arguments")
        if self.rank == P1 and self.ctx.corr.remaining_corrections():
            raise PeerError("the dealer sent more correlated randomness than the program used: "
                            "the roles are running different programs")
        return out


def run_clear(program: Callable[..., Protocol], *args: Any, fxp: FixedPoint | None = None,
              trunc: str = "exact", ctx: Context | None = None) -> tuple[Any, Counter]:
    """Run a program in the clear (P0 holds every value, P1's shares are zero): the simulator."""
    ctx = ctx or clear_context(fxp, trunc)
    engine = Engine(ctx)
    return engine.run(program(ctx, *args)), engine.counter
