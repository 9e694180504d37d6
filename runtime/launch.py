"""`ProcessCluster`: P0, P1 and the dealer as three local processes talking over gloo/TCP.

Same API as `runtime.local.LocalCluster` (`run(program, args0, args1) -> (out0, out1,
RunStats)`), but every role is its own process with its own torch thread pool, so timings
and byte counts are those of a real deployment on loopback. The processes are persistent:
one session (seeds, fixed weight masks) serves every `run` until `close()`.

The launcher serves the rendezvous store itself (on a free port, so no role races for one)
and talks to each role over a pipe: it sends the pickled program and arguments, the role
answers with its output and its counters. A program must therefore be a picklable
top-level function (as for `multiprocessing`).

Failure model: the roles enforce `timeout` on every send and receive (runtime/dist.py), so a
stalled or dead role makes its peers fail within `timeout`. A role that fails reports and
exits at once, which drops its connections, so the others fail immediately too. The
launcher then waits `grace` seconds for the remaining reports, names the root cause (a
program exception, else a role that died, else the stalled role that the others timed out
on), kills whatever is left and raises. A gloo pair does not survive a timeout, so the
cluster is closed after any failure: create a new one.
"""

from __future__ import annotations

import atexit
import os
import pickle
import resource
import signal
import time
import traceback
import weakref
from datetime import timedelta
from multiprocessing import connection as mpconn
from multiprocessing import get_all_start_methods, get_context
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from .context import DEALER, P0, P1, ROLE_NAMES
from .dist import init_dist
from .engine import Role, meta_like
from .local import RunStats
from .memory import configure_for_requests, release_if_over
from .messages import Protocol
from .ring import FixedPoint
from .transport import PeerError

RANKS = (P0, P1, DEALER)
_RUN, _CLOSE = b"R", b"C"


class RoleError(RuntimeError):
    """A role raised an exception that could not be re-raised as its own type."""


def _label(program: Callable) -> str:
    return f"{getattr(program, '__module__', '?')}.{getattr(program, '__qualname__', repr(program))}"


# --- the role's side ---------------------------------------------------------------------

def _describe(rank: int, e: BaseException) -> dict:
    try:
        exc = pickle.dumps(e)
        pickle.loads(exc)
    except Exception:  # noqa: BLE001 - fall back to the text
        exc = None
    return {"rank": rank, "type": type(e).__name__, "text": str(e), "exc": exc,
            "tb": traceback.format_exc(), "is_peer": isinstance(e, PeerError),
            "peer": getattr(e, "peer", None), "pid": os.getpid()}


def _run_one(role: Role, payload: bytes | memoryview, offline: str = "stream") -> tuple[Any, dict]:
    """Run one program in this role and measure what it cost (deltas over this run)."""
    t = role.transport
    program, args = pickle.loads(payload)
    sent0 = dict(t.bytes_sent)
    rounds0 = role.engine.counter.rounds
    tags0 = {k: dict(v) for k, v in role.engine.counter.by_tag.items()}
    stats: dict[str, Any] = {}
    cpu0 = time.process_time()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    if role.rank == DEALER:
        start = time.perf_counter()
        out = role.run(program, *args)
        stats["offline_s"] = time.perf_counter() - start
        stats["cpu_s"] = time.process_time() - cpu0
    else:
        if role.rank == P1 and offline == "ahead":  # all of the dealer's work first
            t.prefetch_blob(DEALER, until_end=True)
        start = time.perf_counter()  # the party's own offline phase (no input, no messages)
        role.prepare(program, *args)
        stats["prepare_s"] = time.perf_counter() - start
        if role.rank == P1 and offline == "stream":  # the online clock starts once P1 holds
            t.prefetch_blob(DEALER)  # the dealer's first blob of corrections
        t.sync(P1 if role.rank == P0 else P0, _label(program))
        start, cpu1 = time.perf_counter(), time.process_time()
        out = role.run(program, *args)
        stats["online_s"] = time.perf_counter() - start
        stats["online_cpu_s"] = time.process_time() - cpu1
        stats["cpu_s"] = time.process_time() - cpu0
    stats["sent_to"] = {p: n - sent0.get(p, 0) for p, n in t.bytes_sent.items() if n - sent0.get(p, 0)}
    ru = resource.getrusage(resource.RUSAGE_SELF)
    stats["peak_rss_mib"] = ru.ru_maxrss / 1024  # peak resident memory so far (Linux: KiB)
    stats["minor_faults"] = ru.ru_minflt - faults0  # fresh pages touched (zeroed by the kernel)
    stats["operand_form"] = role.operand_form()
    stats["rounds"] = role.engine.counter.rounds - rounds0
    stats["replayed"] = role.replayed
    by_tag = {}
    for k, v in role.engine.counter.by_tag.items():
        b = tags0.get(k, {"bytes_sent": 0, "rounds": 0})
        d = {"bytes_sent": v["bytes_sent"] - b["bytes_sent"], "rounds": v["rounds"] - b["rounds"]}
        if d["bytes_sent"] or d["rounds"]:
            by_tag[k] = d
    stats["by_tag"] = by_tag
    release_if_over()  # keep this program's freed pages for the next one (runtime/memory.py)
    return out, stats


def _worker(rank: int, host: str, port: int, timeout: float, fxp: FixedPoint, trunc: str,
            threads: int, conn, offline: str = "stream") -> None:
    """Body of one role's process: join the group, set up the session, serve commands."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    torch.set_num_threads(threads)
    configure_for_requests()  # freed blocks stay for the next request (runtime/memory.py)
    try:
        transport = init_dist(rank, host, port, timeout, serve_store=False)
        role = Role(rank, transport, fxp, trunc)
        role.setup()
        # The first meta-tensor op imports torch._dynamo (~2 s): pay it here, not in run 1.
        torch.empty(1, dtype=torch.int64, device="meta") * 1
        conn.send_bytes(pickle.dumps(("ready", os.getpid())))
    except BaseException as e:  # noqa: BLE001 - reported to the launcher
        conn.send_bytes(pickle.dumps(("err", _describe(rank, e))))
        os._exit(1)
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):  # the launcher is gone
            break
        if msg[:1] == _CLOSE:
            break
        try:
            # a view, not msg[1:]: no second copy of a payload that may hold weight shares
            reply = pickle.dumps(("ok", *_run_one(role, memoryview(msg)[1:], offline)))
        except BaseException as e:  # noqa: BLE001 - reported to the launcher
            conn.send_bytes(pickle.dumps(("err", _describe(rank, e))))
            # Exit at once: the closed sockets make the peers fail now rather than at
            # their timeout, and a gloo group that saw an error is not reusable anyway.
            os._exit(1)
        conn.send_bytes(reply)
    transport.close()
    conn.close()


# --- the launcher's side -----------------------------------------------------------------

_LIVE: "weakref.WeakSet[ProcessCluster]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for c in list(_LIVE):
        c.close()


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# Imported once by the fork server, so each role starts in ~0.1 s instead of paying the
# imports (torch ~2 s, and torch._dynamo ~2 s that the first meta-tensor op pulls in).
_PRELOAD = ["torch", "torch._dynamo", "torch.distributed", __name__, f"{__package__}.dist",
            f"{__package__}.protocols.arith", f"{__package__}.protocols.trunc"]


def _mp_context(method: str | None):
    """forkserver (preloaded) where available, else spawn. Never plain fork: the launcher
    holds the store's server thread and maybe torch's thread pools."""
    if method is None:
        method = "forkserver" if "forkserver" in get_all_start_methods() else "spawn"
    ctx = get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # no effect if the fork server already runs
    return ctx


class ProcessCluster:
    """P0, P1 and the dealer in three processes (gloo over loopback TCP).

    timeout: seconds any role waits for a peer's message (stall/death detection).
    offline: "stream" (default): the online phase starts once P1 holds the dealer's first
    blob of correlations and the dealer keeps generating beside it (sharing this machine's
    cores); "ahead": the dealer's whole offline phase finishes first (P1 buffers all of
    it), as when the dealer runs ahead of requests on its own host.
    threads: torch intra-op threads per role. start_method: multiprocessing's (default:
    forkserver, whose helper process lives until this interpreter exits). run_timeout: optional bound on a whole run
    (None: a run may take any time as long as messages keep flowing). grace: seconds to
    wait for the other roles' reports after the first failure.
    """

    def __init__(self, fxp: FixedPoint | None = None, trunc: str = "exact", timeout: float = 120.0,
                 threads: int = 1, start_method: str | None = None, start_timeout: float = 120.0,
                 host: str = "127.0.0.1", run_timeout: float | None = None,
                 grace: float | None = None, offline: str = "stream") -> None:
        if offline not in ("stream", "ahead"):
            raise ValueError(f"offline must be 'stream' or 'ahead', got {offline!r}")
        self.timeout = timeout
        self.run_timeout = run_timeout
        self.grace = min(1.0, timeout) if grace is None else grace
        self.closed = False
        self.failure: str | None = None
        self.procs: list = []
        self.conns: list = []
        self.pids: dict[int, int] = {}
        # The launcher serves the rendezvous on a free port (port 0): no race for a port.
        self.store = dist.TCPStore(host, 0, None, True, timedelta(seconds=start_timeout),
                                   wait_for_workers=False)
        ctx = _mp_context(start_method)
        _LIVE.add(self)
        try:
            for rank in RANKS:
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=_worker, name=f"secformer-{ROLE_NAMES[rank]}", daemon=True,
                                args=(rank, host, self.store.port, timeout, fxp or FixedPoint(),
                                      trunc, threads, theirs, offline))
                p.start()
                theirs.close()
                self.procs.append(p)
                self.conns.append(mine)
            replies = self._collect("start-up", start_timeout)
            self.pids = {r: replies[r][1] for r in RANKS}
        except BaseException:
            self._kill()
            raise

    # --- running ---------------------------------------------------------------------------

    def run(self, program: Callable[..., Protocol], args0: Sequence[Any] = (),
            args1: Sequence[Any] | None = None) -> tuple[Any, Any, RunStats]:
        """Run `program(ctx, *args)` on all roles. The dealer gets meta copies of `args0`."""
        if self.closed:
            raise RuntimeError("ProcessCluster is closed" +
                               (f" after a failure ({self.failure})" if self.failure else "") +
                               "; create a new one")
        args1 = args0 if args1 is None else args1
        try:
            payloads = [pickle.dumps((program, tuple(args0))), pickle.dumps((program, tuple(args1))),
                        pickle.dumps((program, meta_like(tuple(args0))))]
        except Exception as e:  # noqa: BLE001 - PicklingError, AttributeError, TypeError
            raise TypeError("ProcessCluster.run: the program must be a top-level function and its "
                            f"arguments picklable: {e}") from e
        for conn, payload in zip(self.conns, payloads):
            try:
                conn.send_bytes(_RUN + payload)
            except OSError:
                pass  # that role is dead: _collect names it
        try:
            replies = self._collect(f"the run of {_label(program)}", self.run_timeout)
        except KeyboardInterrupt:  # the roles are mid-run: the session cannot continue
            self.failure = "interrupted"
            self._kill()
            raise
        st = {r: replies[r][2] for r in RANKS}
        sent_to = {r: st[r]["sent_to"] for r in RANKS}
        stats = RunStats(
            bytes_sent={P0: sent_to[P0].get(P1, 0), P1: sent_to[P1].get(P0, 0)},
            rounds=st[P0]["rounds"],
            dealer_bytes=sum(sent_to[DEALER].values()),
            by_tag=st[P0]["by_tag"],
            online_s={P0: st[P0]["online_s"], P1: st[P1]["online_s"]},
            prepare_s={P0: st[P0]["prepare_s"], P1: st[P1]["prepare_s"]},
            offline_s=st[DEALER]["offline_s"],
            sent_to=sent_to,
            peak_rss_mib={r: st[r].get("peak_rss_mib") for r in RANKS},
            replayed={r: st[r].get("replayed", False) for r in RANKS},
            cpu_s={r: st[r]["cpu_s"] for r in RANKS},
            minor_faults={r: st[r]["minor_faults"] for r in RANKS},
            operand_form={r: st[r]["operand_form"] for r in RANKS},
            online_cpu_s={P0: st[P0]["online_cpu_s"], P1: st[P1]["online_cpu_s"]},
        )
        return replies[P0][1], replies[P1][1], stats

    def _collect(self, what: str, limit: float | None) -> dict[int, tuple]:
        """Wait for one reply per role; on any failure diagnose it, shut down and raise."""
        pending = set(RANKS)
        replies: dict[int, tuple] = {}
        order: list[int] = []  # failures in the order they arrived
        deadline = None if limit is None else time.monotonic() + limit
        failed_at = None
        while pending:
            ends = [d for d in (deadline, failed_at and failed_at + self.grace) if d]
            wait_s = None if not ends else max(min(ends) - time.monotonic(), 0)
            objs = [self.conns[r] for r in pending] + [self.procs[r].sentinel for r in pending]
            ready = mpconn.wait(objs, wait_s)
            if not ready:
                break
            for r in sorted(pending):
                conn, proc = self.conns[r], self.procs[r]
                if conn not in ready and proc.sentinel not in ready:
                    continue
                if conn.poll():
                    try:
                        replies[r] = pickle.loads(conn.recv_bytes())
                    except (EOFError, OSError):
                        proc.join(1.0)
                        replies[r] = ("dead", proc.exitcode)
                elif not proc.is_alive():
                    proc.join(1.0)
                    replies[r] = ("dead", proc.exitcode)
                else:
                    continue
                pending.discard(r)
                if replies[r][0] not in ("ok", "ready"):
                    order.append(r)
                    failed_at = failed_at or time.monotonic()
            # Stop waiting early when every silent role is one the others timed out on.
            named = {replies[r][1]["peer"] for r in order if replies[r][0] == "err"}
            if failed_at and pending <= named:
                break
        if not order and not pending:
            return replies
        err = self._diagnose(what, replies, order, pending, limit)
        self.failure = str(err).splitlines()[0]
        self._kill()
        raise err

    def _diagnose(self, what: str, replies: dict[int, tuple], order: list[int],
                  silent: set[int], limit: float | None) -> BaseException:
        """Pick the root cause: a program error, else a dead role, else the stalled one."""
        errs = {r: replies[r][1] for r in order if replies[r][0] == "err"}
        dead = [r for r in order if replies[r][0] == "dead"]
        notices = "; ".join(f"{ROLE_NAMES[r]}: {errs[r]['text']}" for r in errs)
        for r, info in errs.items():
            if not info["is_peer"]:
                return self._rebuild(info, what)
        if dead:
            r = dead[0]
            return self._peer_error(r, f"{ROLE_NAMES[r]} died ({_exit_text(replies[r][1])}) during "
                                       f"{what}" + (f"; {notices}" if notices else ""))
        for r, info in errs.items():
            q = info["peer"]
            if q is not None and q not in errs:  # the role it waited on did not fail itself
                state = "stalled" if q in silent else "did not answer in time"
                return self._peer_error(q, f"{ROLE_NAMES[q]} {state} during {what}; {notices}")
        if errs:
            return self._rebuild(errs[order[0]], what)
        names = ", ".join(ROLE_NAMES[r] for r in sorted(silent))
        return PeerError(f"{names} did not finish {what} within run_timeout={limit:g} s")

    @staticmethod
    def _peer_error(peer: int, msg: str) -> PeerError:
        e = PeerError(msg)
        e.peer = peer  # type: ignore[attr-defined]
        return e

    @staticmethod
    def _rebuild(info: dict, what: str) -> BaseException:
        """Re-raise a role's exception as its own type, its message prefixed by the role."""
        name = ROLE_NAMES[info["rank"]]
        note = f"--- raised in {name} (pid {info['pid']}) during {what} ---\n{info['tb']}"
        exc = None
        if info["exc"] is not None:
            try:
                exc = pickle.loads(info["exc"])
            except Exception:  # noqa: BLE001
                exc = None
        if isinstance(exc, BaseException) and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{name}: {exc.args[0]}",) + exc.args[1:]
        else:
            exc = RoleError(f"{name} raised {info['type']}: {info['text']}")
        exc.add_note(note)
        return exc

    # --- shutting down ----------------------------------------------------------------------

    def _kill(self) -> None:
        """Stop every role now (after a failure): SIGTERM, then SIGKILL."""
        self.closed = True
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        self._release()

    def _release(self) -> None:
        for c in self.conns:
            c.close()
        self.conns = []
        self.store = None
        _LIVE.discard(self)

    def close(self, wait: float = 5.0) -> None:
        """Ask the roles to leave the group and exit; kill any that do not. Idempotent."""
        if self.closed:
            if self.conns:
                self._release()
            return
        self.closed = True
        for c in self.conns:
            try:
                c.send_bytes(_CLOSE)
            except OSError:
                pass
        end = time.monotonic() + wait
        for p in self.procs:
            p.join(max(end - time.monotonic(), 0.01))
        self._kill()

    def __enter__(self) -> "ProcessCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close(wait=1.0)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
