"""Transports move uint8 buffers between the three roles and count every byte.

`ThreadTransport` connects roles that are threads of one process (tests, quick runs);
`runtime.dist.DistTransport` connects processes or hosts over torch.distributed (gloo).
Every receive has a timeout; a peer that stalls or dies raises `PeerError` naming it.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod

import torch

from .context import ROLE_NAMES


class PeerError(RuntimeError):
    """A peer stalled, died or sent something unexpected. The message names the peer."""


def blob_parts(data: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """What a blob sends: its 8-byte length header, then its bytes unless it is empty (the
    empty blob, a header alone, ends a program's correction stream)."""
    header = torch.tensor([data.numel()], dtype=torch.int64).view(torch.uint8)
    return (header, data) if data.numel() else (header,)


class Transport(ABC):
    """Point-to-point channels from `rank` to the other roles, with byte counts."""

    def __init__(self, rank: int, timeout: float) -> None:
        self.rank = rank
        self.timeout = timeout
        self.bytes_sent: dict[int, int] = {}
        self.bytes_received: dict[int, int] = {}

    def _count(self, peer: int, sent: int = 0, received: int = 0) -> None:
        self.bytes_sent[peer] = self.bytes_sent.get(peer, 0) + sent
        self.bytes_received[peer] = self.bytes_received.get(peer, 0) + received

    def send(self, peer: int, data: torch.Tensor) -> None:
        self._count(peer, sent=data.numel())
        self._send(peer, data)

    def recv(self, peer: int, nbytes: int) -> torch.Tensor:
        data = self._recv(peer, nbytes)
        if data.numel() != nbytes:
            raise PeerError(f"{ROLE_NAMES[peer]} sent {data.numel()} bytes where {nbytes} were "
                            "expected: the roles are running different programs")
        self._count(peer, received=nbytes)
        return data

    def exchange(self, peer: int, data: torch.Tensor | None, nbytes: int) -> torch.Tensor | None:
        """Send `data` (if any) and receive `nbytes` (if > 0) from `peer`, concurrently."""
        if data is not None:
            self.send(peer, data)
        return self.recv(peer, nbytes) if nbytes > 0 else None

    def send_blob(self, peer: int, data: torch.Tensor, wait: bool = True) -> None:
        """Send a buffer whose size the receiver does not know (8-byte length header).

        wait=False may return before the peer has taken it (`drain` waits for every such
        send); here, as for threads, sends never block anyway."""
        for buf in blob_parts(data):
            self.send(peer, buf)

    def drain(self) -> None:
        """Wait until every blob sent with wait=False has been taken (nothing to do here)."""

    def recv_blob(self, peer: int) -> torch.Tensor:
        n = int(self.recv(peer, 8).view(torch.int64)[0])
        return self.recv(peer, n) if n else torch.zeros(0, dtype=torch.uint8)

    @abstractmethod
    def _send(self, peer: int, data: torch.Tensor) -> None: ...

    @abstractmethod
    def _recv(self, peer: int, nbytes: int) -> torch.Tensor: ...

    def close(self) -> None:
        """Release connections (no-op for threads)."""


class ThreadHub:
    """Queues between roles living in one process; a failed role is visible to the others."""

    def __init__(self) -> None:
        self.queues = {(s, d): queue.Queue() for s in range(3) for d in range(3) if s != d}
        self.failed: dict[int, str] = {}
        self.lock = threading.Lock()

    def fail(self, rank: int, why: str) -> None:
        with self.lock:
            self.failed.setdefault(rank, why)


class ThreadTransport(Transport):
    """In-process transport; buffers are copied so no role shares memory with another."""

    def __init__(self, hub: ThreadHub, rank: int, timeout: float = 60.0) -> None:
        super().__init__(rank, timeout)
        self.hub = hub

    def _send(self, peer: int, data: torch.Tensor) -> None:
        self.hub.queues[(self.rank, peer)].put(data.clone())

    def _recv(self, peer: int, nbytes: int) -> torch.Tensor:
        q = self.hub.queues[(peer, self.rank)]
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return q.get(timeout=0.05)
            except queue.Empty:
                if peer in self.hub.failed:
                    raise PeerError(f"{ROLE_NAMES[peer]} failed: {self.hub.failed[peer]}") from None
                if time.monotonic() > deadline:
                    raise PeerError(f"timed out after {self.timeout:g} s waiting for "
                                    f"{ROLE_NAMES[peer]} (stalled or dead)") from None
