"""Three roles as threads of this process, connected by `ThreadTransport` (tests, quick runs)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .context import DEALER, P0, P1
from .engine import Role
from .messages import Protocol
from .ring import FixedPoint
from .transport import PeerError, ThreadHub, ThreadTransport


@dataclass
class RunStats:
    """What one program cost: online bytes sent by each party, rounds, dealer bytes."""

    bytes_sent: dict[int, int]
    rounds: int
    dealer_bytes: int
    by_tag: dict[str, dict[str, int]]
    # Optional, filled by runtime.launch.ProcessCluster (empty / None where not measured).
    # online_s: wall time of P0's and P1's online phase, from a common start once P1 holds
    # the dealer's blob; offline_s: the dealer's offline phase (program on meta tensors and
    # sending the blob); sent_to[role][peer]: bytes each role sent to each peer in this run.
    # prepare_s: each party's own offline phase (A_i @ F of every fixed product, before
    # the online clock starts).
    online_s: dict[int, float] = field(default_factory=dict)
    offline_s: float | None = None
    prepare_s: dict[int, float] = field(default_factory=dict)
    sent_to: dict[int, dict[int, int]] = field(default_factory=dict)
    peak_rss_mib: dict[int, float] = field(default_factory=dict)
    # replayed[role]: its offline pass (the dealer's; a party's prepare) replayed the one
    # recorded for the same program and shapes, instead of a run on meta tensors
    replayed: dict[int, bool] = field(default_factory=dict)
    # cpu_s[role]: the role's process CPU time (user + system) over the whole run (a
    # party's prepare included); online_cpu_s: P0's and P1's over their online phase. On
    # a machine with fewer cores than roles the wall time is bounded by their sum.
    cpu_s: dict[int, float] = field(default_factory=dict)
    online_cpu_s: dict[int, float] = field(default_factory=dict)
    minor_faults: dict[int, int] = field(default_factory=dict)  # per role over the run
    # operand_form[role]: its ring kernel, "compact" where it keeps its weights' limbs compact
    # (engine.Role.operand_form; the memory figures depend on it)
    operand_form: dict[int, str] = field(default_factory=dict)


def combine_stats(runs: Sequence[RunStats]) -> RunStats:
    """One RunStats for several programs run one after the other (a session's weight loading
    in groups): bytes, rounds, times and counts add up; peak memory is the largest seen."""
    if not runs:
        raise ValueError("combine_stats needs at least one run")

    def add(dicts: list[dict]) -> dict:
        out: dict = {}
        for d in dicts:
            for k, v in d.items():
                out[k] = add([out[k], v]) if isinstance(v, dict) and k in out else (
                    (out[k] + v) if k in out else v)
        return out

    offline = [r.offline_s for r in runs if r.offline_s is not None]
    return RunStats(
        bytes_sent=add([r.bytes_sent for r in runs]), rounds=sum(r.rounds for r in runs),
        dealer_bytes=sum(r.dealer_bytes for r in runs), by_tag=add([r.by_tag for r in runs]),
        online_s=add([r.online_s for r in runs]), offline_s=sum(offline) if offline else None,
        prepare_s=add([r.prepare_s for r in runs]), sent_to=add([r.sent_to for r in runs]),
        peak_rss_mib={k: max(r.peak_rss_mib[k] for r in runs if k in r.peak_rss_mib
                             and r.peak_rss_mib[k] is not None)
                      for k in {k for r in runs for k, v in r.peak_rss_mib.items() if v is not None}},
        replayed={k: all(r.replayed.get(k, False) for r in runs) for k in runs[-1].replayed},
        cpu_s=add([r.cpu_s for r in runs]), online_cpu_s=add([r.online_cpu_s for r in runs]),
        minor_faults=add([r.minor_faults for r in runs]), operand_form=dict(runs[-1].operand_form))


class LocalCluster:
    """P0, P1 and the dealer in threads. `run(program, args0, args1)` returns both outputs."""

    def __init__(self, fxp: FixedPoint | None = None, trunc: str = "exact", timeout: float = 120.0) -> None:
        self.hub = ThreadHub()
        self.roles = [Role(r, ThreadTransport(self.hub, r, timeout), fxp, trunc) for r in (P0, P1, DEALER)]
        self._in_parallel([lambda r=r: r.setup() for r in self.roles])

    def _in_parallel(self, fns: Sequence[Callable[[], Any]]) -> list[Any]:
        results: list[Any] = [None] * len(fns)
        errors: list[BaseException | None] = [None] * len(fns)

        def target(i: int) -> None:
            try:
                results[i] = fns[i]()
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                errors[i] = e
                self.hub.fail(self.roles[i].rank, f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(len(fns))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # Report the root cause, not the peers that merely noticed it.
        first = [e for e in errors if e is not None and not isinstance(e, PeerError)] or \
                [e for e in errors if e is not None]
        if first:
            raise first[0]
        return results

    def run(self, program: Callable[..., Protocol], args0: Sequence[Any] = (),
            args1: Sequence[Any] | None = None) -> tuple[Any, Any, RunStats]:
        """Run `program(ctx, *args)` on all roles. The dealer gets meta copies of `args0`."""
        args1 = args0 if args1 is None else args1
        before = [dict(r.transport.bytes_sent) for r in self.roles]
        rounds_before = [r.engine.counter.rounds for r in self.roles[:2]]
        tags_before = {k: dict(v) for k, v in self.roles[0].engine.counter.by_tag.items()}
        out = self._in_parallel([
            lambda: self.roles[0].run(program, *args0),
            lambda: self.roles[1].run(program, *args1),
            lambda: self.roles[2].run(program, *args0),
        ])
        sent = {}
        for i in (P0, P1):
            peer = P1 if i == P0 else P0
            sent[i] = self.roles[i].transport.bytes_sent.get(peer, 0) - before[i].get(peer, 0)
        dealer = sum(self.roles[2].transport.bytes_sent.values()) - sum(before[2].values())
        by_tag = {}
        for k, v in self.roles[0].engine.counter.by_tag.items():
            b = tags_before.get(k, {"bytes_sent": 0, "rounds": 0})
            d = {"bytes_sent": v["bytes_sent"] - b["bytes_sent"], "rounds": v["rounds"] - b["rounds"]}
            if d["bytes_sent"] or d["rounds"]:
                by_tag[k] = d
        rounds = self.roles[0].engine.counter.rounds - rounds_before[0]
        return out[0], out[1], RunStats(sent, rounds, dealer, by_tag,
                                        replayed={r.rank: r.replayed for r in self.roles})
