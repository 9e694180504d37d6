"""What protocols say to each other: opening requests, and lockstep composition.

A protocol is a Python generator. Each `yield` hands the scheduler a list of `Msg`
(openings that can go out together) and receives one result per `Msg`; each yield is one
communication round. `parallel` advances several protocol instances in lockstep and merges
their openings, so independent work shares rounds: one message per peer per round
(DESIGN.md, "Rounds and bytes").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import torch

# A protocol: yields list[Msg], receives list[list[Tensor] | None], returns its result.
Protocol = Generator[list["Msg"], list, Any]

ADD, XOR, SWAP = "add", "xor", "swap"


@dataclass
class Msg:
    """One opening.

    kind: ``add`` reconstructs an additive sharing mod 2^bits, ``xor`` a binary sharing,
    ``swap`` hands each receiver the peer's tensors unchanged (both values already masked).
    to: None = both parties receive; 0 or 1 = only that party receives (the other gets None).
    tag: the op this traffic is accounted to.
    """

    tensors: Sequence[torch.Tensor]
    kind: str = ADD
    bits: int = 64
    to: int | None = None
    tag: str | None = None

    def sends(self, party: int) -> bool:
        return self.to is None or self.to != party

    def receives(self, party: int) -> bool:
        return self.to is None or self.to == party


def open_add(*tensors: torch.Tensor, bits: int = 64, to: int | None = None) -> Protocol:
    """Open additive shares (mod 2^bits); one round. Returns a tuple of public tensors."""
    res = yield [Msg(tensors, ADD, bits, to)]
    return res[0]


def open_xor(*tensors: torch.Tensor, bits: int = 64, to: int | None = None) -> Protocol:
    """Open binary (XOR) shares whose values have `bits` significant bits; one round."""
    res = yield [Msg(tensors, XOR, bits, to)]
    return res[0]


def swap(*tensors: torch.Tensor, bits: int = 64, to: int | None = None) -> Protocol:
    """Send already-masked private values to the peer and receive the peer's; one round."""
    res = yield [Msg(tensors, SWAP, bits, to)]
    return res[0]


def parallel(*gens: Protocol) -> Protocol:
    """Run protocol instances in lockstep; returns their results as a list, in order."""
    results: list[Any] = [None] * len(gens)
    pending: dict[int, list[Msg]] = {}
    for i, g in enumerate(gens):
        try:
            pending[i] = next(g)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        order = list(pending)
        merged: list[Msg] = []
        for i in order:
            merged.extend(pending[i])
        replies = yield merged
        pos = 0
        for i in order:
            n = len(pending[i])
            part, pos = replies[pos:pos + n], pos + n
            try:
                pending[i] = gens[i].send(part)
            except StopIteration as stop:
                results[i] = stop.value
                del pending[i]
    return results


def tagged(gen: Protocol, tag: str) -> Protocol:
    """Account every message of `gen` (that has no tag yet) to `tag`."""
    try:
        msgs = next(gen)
        while True:
            for m in msgs:
                if m.tag is None:
                    m.tag = tag
            msgs = gen.send((yield msgs))
    except StopIteration as stop:
        return stop.value


def run_local(gen: Protocol) -> Any:
    """Run a protocol that must not communicate (a local computation); error if it yields."""
    try:
        next(gen)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("run_local: protocol tried to communicate")


@dataclass
class Counter:
    """Bytes sent and rounds, in total and per tag, as counted from the messages sent."""

    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    by_tag: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, tag: str | None, sent: int, received: int, round_: bool) -> None:
        row = self.by_tag.setdefault(tag or "untagged", {"bytes_sent": 0, "rounds": 0})
        row["bytes_sent"] += sent
        if round_:
            row["rounds"] += 1
        self.bytes_sent += sent
        self.bytes_received += received

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "rounds": self.rounds, "by_tag": self.by_tag}
