"""`DistTransport`: the three roles as processes (or hosts) over torch.distributed (gloo, TCP).

Ranks are the role ids: 0 = P0, 1 = P1, 2 = the dealer. Every buffer is a uint8 tensor
sent with gloo's point-to-point ops. What gloo does (measured, torch 2.13 CPU):

* `work.wait(timeout=...)` honours its timeout for sends and receives and raises
  "Timed out waiting ...ms"; a timed-out operation closes that pair's connection, so the
  session is over after any timeout (`runtime.launch.ProcessCluster` then shuts down).
* A send is a rendezvous: it completes only once the peer has posted the matching
  receive (even for 12 bytes), so sends need the timeout as much as receives do.
* A peer process that dies is noticed at once (~0 s): the pending wait raises
  "Connection closed by peer" / "Connection reset by peer".
* A message *longer* than the posted receive aborts the receiving process
  (`gloo::EnforceNotMet`, SIGABRT, not catchable); a shorter one is accepted silently.
  Sizes are implied by the program, so this only happens when the roles run different
  programs; `sync` exchanges a program digest before each run to catch that early.

All of these become `PeerError`s naming the peer, so a stalled or dead peer never hangs a
role for longer than `timeout` seconds. The timeout covers a whole message (the peer's
lateness plus the transfer), so it must exceed the dealer's offline phase and the time to
move the largest blob.

One role per process (or host), e.g. without the launcher (rank 0 serves the rendezvous):

    t = init_dist(rank, "10.0.0.1", 29500, timeout=120)
    role = Role(rank, t, FixedPoint(16))
    out = role.run(program, *args)   # the dealer passes P0's args (it uses only shapes)
    t.close()
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from .context import ROLE_NAMES
from .transport import PeerError, Transport, blob_parts

WORLD_SIZE = 3
# How much the dealer's correction stream may run ahead of P1's receives (`send_blob(wait=False)`):
# 16 of its 16 MiB chunks. A gloo send is a rendezvous, so a blocking send kept the dealer at
# most one chunk ahead, idle until P1 asked for the next one (P1 then waited for it to be made).
MAX_IN_FLIGHT_BYTES = 256 << 20


class DistInitError(RuntimeError):
    """The rendezvous failed: port in use, master unreachable, or a rank never joined."""


def _peer_error(peer: int, op: str, timeout: float, err: BaseException) -> PeerError:
    """Turn gloo's error text into a PeerError that names the peer (and keeps gloo's words)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    name = ROLE_NAMES.get(peer, f"rank {peer}")
    if "Timed out" in text or "timed out" in text or "Application timeout" in text:
        msg = (f"timed out after {timeout:g} s waiting for {name} ({op}; stalled or dead) "
               f"[gloo: {text}]")
    else:
        msg = (f"lost the connection to {name} during a {op} (its process died or closed "
               f"the connection; timeout {timeout:g} s) [gloo: {text}]")
    pe = PeerError(msg)
    pe.peer = peer  # type: ignore[attr-defined]  # structured, for the launcher's diagnosis
    return pe


class DistTransport(Transport):
    """Point-to-point uint8 channels over the default torch.distributed (gloo) group."""

    def __init__(self, rank: int, timeout: float, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(rank, timeout)
        self.group = group
        self._prefetched: dict[int, list[torch.Tensor]] = {}
        self._in_flight: deque = deque()  # (work, peer, tensor) of sends not waited for yet
        self._in_flight_bytes = 0

    # --- the primitives -----------------------------------------------------------------

    def _wait(self, work, peer: int, op: str, deadline: float) -> None:
        # wait(timeout=0) would mean "the group's default", so never pass less than 1 ms.
        left = max(deadline - time.monotonic(), 0.001)
        try:
            work.wait(timeout=timedelta(seconds=left))
        except RuntimeError as e:
            raise _peer_error(peer, op, self.timeout, e) from e

    def _post_send(self, peer: int, data: torch.Tensor):
        try:
            return dist.isend(data.contiguous().view(torch.uint8), peer, group=self.group)
        except RuntimeError as e:  # the pair was already closed (peer died earlier)
            raise _peer_error(peer, "send", self.timeout, e) from e

    def _post_recv(self, peer: int, buf: torch.Tensor):
        try:
            return dist.irecv(buf, peer, group=self.group)
        except RuntimeError as e:
            raise _peer_error(peer, "receive", self.timeout, e) from e

    def _exchange_raw(self, peer: int, data: torch.Tensor | None, nbytes: int) -> torch.Tensor | None:
        """Post the send and the receive together, then wait for both (no counting)."""
        deadline = time.monotonic() + self.timeout
        sw = self._post_send(peer, data) if data is not None and data.numel() else None
        buf = torch.empty(nbytes, dtype=torch.uint8) if nbytes > 0 else None
        rw = self._post_recv(peer, buf) if buf is not None else None
        if rw is not None:
            self._wait(rw, peer, "receive", deadline)
        if sw is not None:
            self._wait(sw, peer, "send", deadline)
        return buf

    def _send(self, peer: int, data: torch.Tensor) -> None:
        self._exchange_raw(peer, data, 0)

    def _recv(self, peer: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:  # nothing is sent for empty buffers (see _exchange_raw)
            return torch.zeros(0, dtype=torch.uint8)
        return self._exchange_raw(peer, None, nbytes)

    def exchange(self, peer: int, data: torch.Tensor | None, nbytes: int) -> torch.Tensor | None:
        """Send and receive concurrently: both parties post isend + irecv, then wait."""
        if data is not None:
            self._count(peer, sent=data.numel())
        buf = self._exchange_raw(peer, data, nbytes)
        if nbytes > 0:
            self._count(peer, received=nbytes)
        return buf

    # --- blobs, prefetching and synchronisation ---------------------------------------------

    def send_blob(self, peer: int, data: torch.Tensor, wait: bool = True) -> None:
        """As `Transport.send_blob`; with wait=False the sends are only posted (the tensors
        kept alive until they complete), and this waits for the oldest ones only while more
        than MAX_IN_FLIGHT_BYTES are outstanding: the dealer goes on producing while P1
        computes. `drain` waits for the rest (a dead or stalled peer raises PeerError then)."""
        if wait:
            super().send_blob(peer, data)
            return
        for buf in blob_parts(data):
            buf = buf.contiguous().view(torch.uint8)
            self._count(peer, sent=buf.numel())
            self._in_flight.append((self._post_send(peer, buf), peer, buf))
            self._in_flight_bytes += buf.numel()
        while self._in_flight_bytes > MAX_IN_FLIGHT_BYTES:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        work, peer, buf = self._in_flight.popleft()
        self._in_flight_bytes -= buf.numel()
        self._wait(work, peer, "send", time.monotonic() + self.timeout)

    def drain(self) -> None:
        """Wait for every send posted by `send_blob(wait=False)` (each within the timeout)."""
        while self._in_flight:
            self._wait_oldest()

    def prefetch_blob(self, peer: int, until_end: bool = False) -> None:
        """Receive the next blob from `peer` now (with until_end, every blob up to and
        including the empty one that ends a program's stream); `recv_blob(peer)` returns them.

        Lets P1 take the dealer's corrections before the online clock starts (launch.py).
        """
        queue = self._prefetched.setdefault(peer, [])
        while True:
            blob = super().recv_blob(peer)
            queue.append(blob)
            if not until_end or blob.numel() == 0:
                return

    def recv_blob(self, peer: int) -> torch.Tensor:
        if self._prefetched.get(peer):
            return self._prefetched[peer].pop(0)
        return super().recv_blob(peer)

    def sync(self, peer: int, label: str = "") -> None:
        """Uncounted handshake with `peer`: both must call it with the same `label`.

        Marks a common start for timing, and catches roles running different programs
        before a size mismatch could abort a process inside gloo.
        """
        digest = hashlib.blake2b(label.encode(), digest_size=8).digest()
        mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
        theirs = self._exchange_raw(peer, mine, 8)
        if not torch.equal(mine, theirs):
            raise PeerError(f"{ROLE_NAMES[self.rank]} runs {label!r} but {ROLE_NAMES[peer]} runs "
                            "a different program")

    def close(self) -> None:
        """Destroy the process group (safe to call twice, and after a peer died)."""
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken pair must not block shutdown
                pass
        self._in_flight.clear()  # posted sends die with the group


def init_dist(rank: int, host: str = "127.0.0.1", port: int = 29500, timeout: float = 120.0,
              serve_store: bool | None = None, world_size: int = WORLD_SIZE) -> DistTransport:
    """Join the three-role gloo group and return this rank's transport.

    The rendezvous is a TCPStore at host:port, served by rank 0 unless `serve_store` says
    otherwise (`ProcessCluster` serves it from the launching process, on a free port, so no
    rank races for a port). `timeout` bounds the rendezvous and every later send/receive.
    """
    if dist.is_initialized():
        raise DistInitError("torch.distributed is already initialised in this process; "
                            "one process hosts one role")
    name = ROLE_NAMES.get(rank, f"rank {rank}")
    serve = rank == 0 if serve_store is None else serve_store
    td = timedelta(seconds=timeout)
    try:
        store = dist.TCPStore(host, port, world_size if serve else None, serve, td,
                              wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError is a RuntimeError
        text = str(e).splitlines()[0]
        if serve:
            raise DistInitError(f"{name} could not serve the rendezvous on {host}:{port}: {text} "
                                "(is the port in use by another cluster? pick another port, or "
                                "port 0 for a free one)") from e
        raise DistInitError(f"{name} could not reach the rendezvous at {host}:{port} within "
                            f"{timeout:g} s: {text} (is rank 0 / the launcher running and the "
                            "address reachable?)") from e
    try:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=td)
    except (RuntimeError, OSError) as e:
        raise DistInitError(f"{name} joined the rendezvous at {host}:{port} but the gloo group "
                            f"did not form within {timeout:g} s: {str(e).splitlines()[0]} "
                            "(a rank never started or cannot reach this host)") from e
    t = DistTransport(rank, timeout)
    t.store = store  # keep the store client alive as long as the group
    return t
