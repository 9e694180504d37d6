"""Deployment: P0, P1 and the dealer as long-running servers, and the client that uses them.

Two planes (DESIGN.md "Transport and deployment"):

* Between the roles, the protocol runs over torch.distributed (gloo, TCP; runtime/dist.py):
  one group of three ranks, formed once at start-up at the `[rendezvous]` address (P0
  serves it). Every gloo send and receive has the `peer` timeout.
* Between the client and each role, a small TCP request/response protocol (`wire`):
  each message is one frame: a JSON header and a safetensors payload. The client sends P0
  and P1 their additive share of its encoded input (plus the public inputs: the padding
  mask), and the dealer a bare "infer" (it needs only the public shapes); P0 and P1 answer
  with their shares of the output, which only the client adds up.

Why not make the client a fourth gloo rank: a gloo group is fixed once formed, clients come
and go, and gloo's only idle-wait is a receive with a timeout that, once it fires, breaks
the pair. A plain socket can wait for the next client for ever; gloo is busy only while an
inference runs, and the TCP plane carries the (small) input and output shares.

One client at a time: while a client is connected, a second one is answered "busy" (the
parties must run inferences in the same order; the P0-P1 handshake before each run also
compares the request id). Any failure inside a run (a peer that died or stalled, an
exception) is reported to the client and ends the party with exit code 1: a gloo group
that saw an error is not reusable, so a supervisor restarts the three roles.

Config (TOML): see `PartyConfig` and README "Deploying on three hosts".
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .runtime.memory import configure_for_requests, release_if_over

ROLES = ("p0", "p1", "dealer")
RANK = {"p0": 0, "p1": 1, "dealer": 2}
NAME = {"p0": "P0", "p1": "P1", "dealer": "dealer"}
WIRE_VERSION = 1
MAGIC = b"SFW1"
MAX_HEADER = 1 << 20
MAX_PAYLOAD = 1 << 34


class PartyError(RuntimeError):
    """A role or the client cannot go on; the message says which party and why."""


class ConfigError(PartyError):
    """The parties' TOML config is malformed."""


# --- config ----------------------------------------------------------------------------------

@dataclass
class Endpoint:
    host: str
    port: int
    bind: str
    shares: Path | None = None


@dataclass
class PartyConfig:
    """parties.toml: where each role listens, the rendezvous, timeouts, artifact and shares."""

    path: Path
    artifact: Path
    rendezvous_host: str
    rendezvous_port: int
    parties: dict[str, Endpoint]
    startup_timeout: float = 300.0
    peer_timeout: float = 120.0
    connect_timeout: float = 10.0
    request_timeout: float = 600.0
    threads: int = 0
    dealer_ahead: bool = True
    dealer_chunk_mb: float = 0.0
    raw: dict = field(default_factory=dict, repr=False)


_TOP = {"artifact", "threads", "dealer_ahead", "dealer_chunk_mb", "rendezvous", "timeouts", *ROLES}
_SECTIONS = {"rendezvous": {"host", "port"}, "timeouts": {"startup", "peer", "connect", "request"},
             "p0": {"host", "port", "bind", "shares"}, "p1": {"host", "port", "bind", "shares"},
             "dealer": {"host", "port", "bind"}}


def load_config(path: str | Path) -> PartyConfig:
    """Parse and validate parties.toml; every problem is a `ConfigError` naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    where = str(path)

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{where}: {msg}")

    unknown = sorted(set(raw) - _TOP)
    need(not unknown, f"unknown key(s) {unknown}; known: {sorted(_TOP)}")
    for sec, keys in _SECTIONS.items():
        need(sec in raw, f"missing section [{sec}]")
        need(isinstance(raw[sec], dict), f"[{sec}] must be a table")
        bad = sorted(set(raw[sec]) - keys)
        need(not bad, f"unknown key(s) {bad} in [{sec}]; known: {sorted(keys)}")
    need(isinstance(raw.get("artifact"), str), "missing or non-string `artifact` (the artifact folder)")

    def port(sec: str) -> int:
        p = raw[sec].get("port")
        need(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535,
             f"[{sec}] port must be an integer in 1..65535, got {p!r}")
        return p

    def host(sec: str, key: str = "host", default: str | None = None) -> str:
        h = raw[sec].get(key, default)
        need(isinstance(h, str) and h != "", f"[{sec}] {key} must be a non-empty string, got {h!r}")
        return h

    def resolve(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (path.parent / q).resolve()

    parties = {}
    for r in ROLES:
        shares = None
        if r != "dealer":
            s = raw[r].get("shares")
            need(isinstance(s, str), f"[{r}] shares must be the path of {r}.safetensors")
            shares = resolve(s)
        h = host(r)
        parties[r] = Endpoint(h, port(r), host(r, "bind", h), shares)
    t = raw["timeouts"]
    for k, v in t.items():
        need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
             f"[timeouts] {k} must be a positive number of seconds, got {v!r}")
    threads = raw.get("threads", 0)
    need(isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0,
         f"threads must be an integer >= 0, got {threads!r}")
    ahead = raw.get("dealer_ahead", True)
    need(isinstance(ahead, bool), f"dealer_ahead must be true or false, got {ahead!r}")
    chunk = raw.get("dealer_chunk_mb", 0)
    need(isinstance(chunk, (int, float)) and not isinstance(chunk, bool) and chunk >= 0,
         f"dealer_chunk_mb must be a number >= 0, got {chunk!r}")
    addrs = [(parties[r].host, parties[r].port) for r in ROLES] + [(host("rendezvous"), port("rendezvous"))]
    need(len(set(addrs)) == len(addrs), f"two roles (or a role and the rendezvous) share an address: {addrs}")
    return PartyConfig(path, resolve(raw["artifact"]), host("rendezvous"), port("rendezvous"), parties,
                       float(t.get("startup", 300)), float(t.get("peer", 120)), float(t.get("connect", 10)),
                       float(t.get("request", 600)), threads, ahead, float(chunk), raw)


def write_config(path: Path, artifact: Path, shares: Path, ports: list[int], host: str = "127.0.0.1",
                 timeouts: dict | None = None, threads: int = 1, extra: str = "") -> Path:
    """A config for three roles on one host (used by `secformer run` and the tests)."""
    t = {"startup": 300, "peer": 120, "connect": 10, "request": 900, **(timeouts or {})}
    text = (f'artifact = "{artifact}"\nthreads = {threads}\n{extra}\n[rendezvous]\nhost = "{host}"\nport = {ports[0]}\n\n'
            "[timeouts]\n" + "".join(f"{k} = {v}\n" for k, v in t.items()) + "\n")
    for i, r in enumerate(ROLES):
        text += f'[{r}]\nhost = "{host}"\nport = {ports[i + 1]}\n'
        if r != "dealer":
            text += f'shares = "{shares / (r + ".safetensors")}"\n'
        text += "\n"
    path.write_text(text)
    return path


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# --- wire: one frame = magic, JSON header, safetensors payload ------------------------------

def send_frame(sock: socket.socket, header: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import save

    head = json.dumps(header).encode("utf-8")
    body = save({k: v.contiguous() for k, v in tensors.items()}) if tensors else b""
    sock.sendall(MAGIC + struct.pack(">IQ", len(head), len(body)) + head + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed by the other side")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[dict, dict[str, torch.Tensor]]:
    """One frame; raises ConnectionError (closed), TimeoutError (socket timeout), PartyError (garbage)."""
    from safetensors.torch import load

    pre = _recv_exact(sock, 16)
    if pre[:4] != MAGIC:
        raise PartyError(f"not a secformer message (got {pre[:4]!r}): is this port a secformer party?")
    hl, bl = struct.unpack(">IQ", pre[4:])
    if hl > MAX_HEADER or bl > MAX_PAYLOAD:
        raise PartyError(f"oversized message (header {hl} B, payload {bl} B)")
    try:
        header = json.loads(_recv_exact(sock, hl))
        body = _recv_exact(sock, bl) if bl else b""
        return header, (load(body) if body else {})
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PartyError(f"malformed message header: {e}") from e


# --- the program with per-node progress --------------------------------------------------------

def layer_of(module_path: str) -> str:
    """A node's layer for progress and cost tables: 'layer N', 'embeddings' or 'head'."""
    m = re.search(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)(?:\.|$)", module_path or "")
    if m:
        return f"layer {int(m.group(1))}"
    return "embeddings" if "embed" in (module_path or "") else "head"


def layer_groups(graph: Any) -> dict[str, int]:
    """Compute nodes per layer, in program order (sources excluded)."""
    out: dict[str, int] = {}
    for n in graph:
        if n.op not in ("input", "weight", "constant"):
            out[layer_of(n.module_path)] = out.get(layer_of(n.module_path), 0) + 1
    return out


def infer_with_progress(ctx: Any, graph: Any, inputs: dict, on_node: Callable | None = None):
    """`mpc_interp.infer_program` with a per-node callback; all three roles run this one
    program (only P0 passes a callback)."""
    from .mpc_interp import infer_program

    return infer_program(ctx, graph, inputs, on_node)


# --- the party server ------------------------------------------------------------------------

def _log(role: str, msg: str) -> None:
    print(f"[{NAME[role]} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def expected_inputs(graph: Any, vocab: dict[str, int]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a party receives per input node: (shape, dtype); secret ids come one-hot."""
    out = {}
    for name in graph.inputs:
        n = graph[name]
        if n.attrs["kind"] == "ids":
            out[name] = ((*n.shape, vocab[name]), torch.int64)
        elif n.attrs["kind"] == "float":
            out[name] = (tuple(n.shape), torch.int64)
        else:
            out[name] = (tuple(n.shape), torch.int64 if n.dtype == "i64" else
                         (torch.bool if n.dtype == "bool" else torch.float32))
    return out


def _bind(ep: Endpoint, role: str) -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in ep.bind else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ep.bind, ep.port))
    except OSError as e:
        s.close()
        raise PartyError(f"{NAME[role]} cannot listen for clients on {ep.bind}:{ep.port}: {e.strerror or e} "
                         "(is the port in use by another party or program?)") from e
    s.listen(8)
    return s


class _Server:
    """One role: join the group, load the weight shares once, then serve inferences."""

    def __init__(self, cfg: PartyConfig, role: str) -> None:
        from .artifact import load_artifact, load_share
        from .compiled import _vocab_of

        self.cfg, self.role, self.rank = cfg, role, RANK[role]
        _log(role, f"loading artifact {cfg.artifact}")
        self.art = load_artifact(cfg.artifact, weights=False)
        self.graph = self.art.graph
        self.shares = load_share(cfg.parties[role].shares, role, self.art) if role != "dealer" else None
        vocab = {n: _vocab_of(self.graph, n) for n in self.graph.inputs if self.graph[n].attrs["kind"] == "ids"}
        self.expected = expected_inputs(self.graph, vocab)
        self.listener = _bind(cfg.parties[role], role)
        self.transport = None
        self.role_obj = None
        self.served = 0
        self.ahead: list[torch.Tensor] | None = None

    # -- start-up --
    def join(self) -> None:
        from .runtime.dist import init_dist
        from .runtime.engine import Role

        cfg = self.cfg
        _log(self.role, f"joining the group at {cfg.rendezvous_host}:{cfg.rendezvous_port} "
                        f"(waiting up to {cfg.startup_timeout:g} s for the other roles)")
        self.transport = init_dist(self.rank, cfg.rendezvous_host, cfg.rendezvous_port, cfg.startup_timeout)
        self.transport.timeout = cfg.startup_timeout  # the load phase may wait on slow starters
        self.transport.in_inference = False
        self.role_obj = Role(self.rank, self.transport, self.art.fxp, self.art.trunc)
        self.role_obj.setup()
        if self.rank == 2 and cfg.dealer_chunk_mb:  # smaller chunks: P1 starts sooner (overlap)
            self.role_obj.ctx.corr.chunk_bytes = int(cfg.dealer_chunk_mb * (1 << 20))
        self._check_same_artifact()
        _inject_fault(self.role, self.transport)

    def _check_same_artifact(self) -> None:
        from .runtime.transport import PeerError

        order = {0: (1, 2), 1: (0, 2), 2: (0, 1)}[self.rank]
        for peer in order:
            try:
                self.transport.sync(peer, f"artifact:{self.art.sha256}")
            except PeerError as e:
                if "different program" in str(e):
                    raise PartyError(f"{NAME[self.role]} and {NAME[ROLES[peer]]} run different artifacts "
                                     f"(this one is {self.art.short}): give every role the same artifact") from e
                raise

    def load(self) -> dict:
        from .mpc_interp import load_program

        t0 = time.perf_counter()
        if self.role == "dealer":
            shares = {k: torch.empty(s, dtype=torch.int64, device="meta") for k, s in self.art.weight_shapes().items()}
        else:
            shares = self.shares
        stats = self._run(load_program, (self.graph, shares), f"load:{self.art.sha256}")
        self.shares = None
        self.transport.timeout = self.cfg.peer_timeout
        _log(self.role, f"weights loaded in {time.perf_counter() - t0:.1f} s")
        return stats

    def precompute(self) -> None:
        """Work ahead (DESIGN.md): the next inference's correlated randomness depends only on
        the public shapes, so it is made while the parties load or wait for a client. The
        dealer runs Role.run's dealer half, with the chunks kept (P1 is not receiving yet)
        instead of sent; P0 and P1 run their own offline phase (Role.prepare: A_i @ F of
        every fixed-weight product)."""
        t0 = time.perf_counter()
        if self.rank != 2:
            self.role_obj.prepare(infer_with_progress, self.graph, self._meta_inputs(), None)
            self.prepare_s = time.perf_counter() - t0
            _log(self.role, f"next inference prepared in {self.prepare_s:.1f} s")
            return
        ctx = self.role_obj.ctx
        chunks: list[torch.Tensor] = []
        flush, ctx.corr.flush = ctx.corr.flush, chunks.append
        try:
            self.role_obj.dealer_offline(infer_with_progress, self.graph, self._meta_inputs(), None)
        finally:
            ctx.corr.flush = flush
        last = ctx.corr.take_corrections()
        if last.numel():
            chunks.append(last)
        self.ahead = chunks
        self.ahead_s = time.perf_counter() - t0

    def _meta_inputs(self) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, dtype=d, device="meta") for k, (s, d) in self.expected.items()}

    def _send_ahead(self) -> dict:
        """The dealer's part of an inference worked ahead: send the chunks and the end marker."""
        t = self.transport
        sent0 = dict(t.bytes_sent)
        start = time.perf_counter()
        for chunk in self.ahead + [torch.zeros(0, dtype=torch.uint8)]:
            self.role_obj._send_chunk(chunk)
        t.drain()
        self.ahead = None
        stats = {"role": self.role, "seconds": self.ahead_s, "send_s": time.perf_counter() - start, "rounds": 0,
                 "sent_to": {NAME[ROLES[p]]: n - sent0.get(p, 0) for p, n in t.bytes_sent.items()}}
        stats["bytes_sent"] = sum(stats["sent_to"].values())
        self.last_out = None
        return stats

    def _run(self, program: Callable, args: tuple, label: str) -> dict:
        """Run one program like ProcessCluster does; returns this role's cost of it."""
        t, role = self.transport, self.role_obj
        prepared = role._prepared  # set by precompute() between requests
        sent0, rounds0 = dict(t.bytes_sent), role.engine.counter.rounds
        start = time.perf_counter()
        if self.rank != 2:
            if self.rank == 1:
                t.prefetch_blob(2)
            t.sync(1 - self.rank, label)
        out = role.run(program, *args)
        stats = {"role": self.role, "seconds": time.perf_counter() - start,
                 "sent_to": {NAME[ROLES[p]]: n - sent0.get(p, 0) for p, n in t.bytes_sent.items()},
                 "rounds": role.engine.counter.rounds - rounds0 if self.rank != 2 else 0}
        stats["bytes_sent"] = sum(stats["sent_to"].values())
        if self.rank != 2 and prepared:  # its own offline phase, done before the request
            stats["prepare_s"] = self.prepare_s
        self.last_out = out
        release_if_over()  # keep the request's freed pages for the next one (runtime/memory.py)
        return stats

    # -- serving --
    def serve(self) -> int:
        cfg = self.cfg
        ep = cfg.parties[self.role]
        _log(self.role, f"ready: serving clients on {ep.bind}:{ep.port} (artifact {self.art.short}, "
                        f"batch {self.art.batch} x seq {self.art.seq_len})")
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        active = None
        while True:
            for key, _ in sel.select():
                if key.fileobj is self.listener:
                    conn, addr = self.listener.accept()
                    conn.settimeout(cfg.peer_timeout)
                    if active is not None:
                        self._reply_error(conn, "busy: another client is connected; retry later", fatal=False)
                        conn.close()
                        continue
                    active = conn
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    header, tensors = recv_frame(active)
                except (ConnectionError, TimeoutError, OSError, PartyError):
                    sel.unregister(active)
                    active.close()
                    active = None
                    continue
                code = self._handle(active, header, tensors)
                if code is not None:
                    return code

    def _reply_error(self, conn: socket.socket, msg: str, fatal: bool, peer: int | None = None) -> None:
        try:
            send_frame(conn, {"type": "error", "role": self.role, "message": msg, "fatal": fatal, "peer": peer})
        except OSError:
            pass

    def _handle(self, conn: socket.socket, header: dict, tensors: dict) -> int | None:
        from .runtime.transport import PeerError

        kind = header.get("type")
        if kind == "hello":
            send_frame(conn, {"type": "hello", "role": self.role, "artifact": self.art.sha256,
                              "batch": self.art.batch, "seq_len": self.art.seq_len, "pid": os.getpid(),
                              "wire": WIRE_VERSION})
            return None
        if kind == "abort":  # the client saw another role fail: this session is over
            _log(self.role, f"session aborted by the client: {header.get('reason', '')}")
            return 1
        if kind != "infer":
            self._reply_error(conn, f"unknown request type {kind!r}", fatal=False)
            return None
        rid = str(header.get("id", ""))
        problem = self._check_inputs(tensors)
        if problem:
            self._reply_error(conn, f"{NAME[self.role]} rejected request {rid}: {problem}", fatal=False)
            return None
        progress = _Progress(conn) if header.get("progress") and self.rank == 0 else None
        try:
            self.transport.in_inference = True
            if self.rank == 2 and self.ahead is not None:
                stats = self._send_ahead()
            elif self.rank == 2:
                stats = self._run(infer_with_progress, (self.graph, self._meta_inputs(), None), f"infer:{rid}")
            else:
                stats = self._run(infer_with_progress, (self.graph, tensors, progress), f"infer:{rid}")
            self.transport.in_inference = False
        except BaseException as e:  # noqa: BLE001 - the session is over after any failure
            peer = getattr(e, "peer", None)
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            what = text if isinstance(e, PeerError) else f"{type(e).__name__}: {text}"
            _log(self.role, f"inference {rid} failed: {what}; leaving (restart all three roles)")
            self._reply_error(conn, f"{NAME[self.role]}: {what}", fatal=True, peer=peer)
            if isinstance(e, KeyboardInterrupt):
                raise
            return 1
        self.served += 1
        if progress is not None:
            progress.flush()
        outs = {} if self.rank == 2 else {f"out{i}": o for i, o in enumerate(self.last_out)}
        try:
            send_frame(conn, {"type": "result", "id": rid, "role": self.role, "stats": stats}, outs)
        except OSError:
            _log(self.role, f"client left before the result of {rid}")
        _log(self.role, f"inference {rid} done in {stats['seconds']:.2f} s")
        if self.rank != 2 or self.cfg.dealer_ahead:
            self.precompute()
        return None

    def _check_inputs(self, tensors: dict) -> str:
        if self.rank == 2:
            return "" if not tensors else "the dealer takes no input tensors"
        want = self.expected
        if set(tensors) != set(want):
            return f"inputs {sorted(tensors)} but the program takes {sorted(want)}"
        for k, (shape, dtype) in want.items():
            if tuple(tensors[k].shape) != shape or tensors[k].dtype != dtype:
                return (f"input {k}: {tensors[k].dtype} {tuple(tensors[k].shape)}, expected {dtype} {shape} "
                        "(client and party use different artifacts?)")
        return ""

    def close(self) -> None:
        try:
            self.listener.close()
        except OSError:
            pass
        if self.transport is not None:
            self.transport.close()


def _inject_fault(role: str, transport: Any) -> None:
    """Fault injection for the tests: SECFORMER_FAULT="<role>:die@<k>" kills this role (SIGKILL)
    at its k-th message of an inference; "<role>:stall@<k>:<seconds>" stops it that long."""
    spec = os.environ.get("SECFORMER_FAULT", "")
    m = re.fullmatch(r"(p0|p1|dealer):(die|stall)@(\d+)(?::([\d.]+))?", spec)
    if not m or m.group(1) != role:
        return
    what, at, secs = m.group(2), int(m.group(3)), float(m.group(4) or 3600)
    count = {"n": 0}
    for name in ("exchange", "send", "send_blob"):
        orig = getattr(transport, name)

        def hooked(*a, _orig=orig, **k):
            if transport.in_inference:
                count["n"] += 1
                if count["n"] == at:
                    _log(role, f"fault injection: {what} at message {at}")
                    if what == "die":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(secs)
            return _orig(*a, **k)

        setattr(transport, name, hooked)


class _Progress:
    """P0's callback: counts completed nodes per layer, sends a frame at most every 0.2 s."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn, self.done, self.last, self.ok = conn, {}, 0.0, True

    def __call__(self, node: Any) -> None:
        g = layer_of(node.module_path)
        self.done[g] = self.done.get(g, 0) + 1
        if time.monotonic() - self.last > 0.2:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if self.ok:
            try:
                send_frame(self.conn, {"type": "progress", "done": self.done})
            except OSError:
                self.ok = False  # the client left: the parties still finish the run


def _watch_parent() -> None:
    """Under a launcher (SECFORMER_PARENT_PID), exit when it is gone: no orphaned parties."""
    pid = os.environ.get("SECFORMER_PARENT_PID")
    if not pid or not pid.isdigit():
        return

    def loop() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != int(pid):
                os._exit(3)

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def run_party(config: str | Path, role: str) -> int:
    """`secformer party`: run one role until stopped (0) or until a run fails (1)."""
    if role not in ROLES:
        raise PartyError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    cfg = load_config(config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    configure_for_requests()  # a serving role keeps freed blocks between requests

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    _watch_parent()
    server = _Server(cfg, role)
    try:
        server.join()
        server.load()
        if cfg.dealer_ahead or role != "dealer":
            server.precompute()
        return server.serve()
    except KeyboardInterrupt:
        _log(role, f"stopped after {server.served} inference(s)")
        return 0
    finally:
        server.close()


# --- the client --------------------------------------------------------------------------------

@dataclass
class InferResult:
    outputs: tuple[torch.Tensor, ...]
    stats: dict[str, dict]
    seconds: float


class Client:
    """Talks to the three roles of one deployment. Use as a context manager."""

    def __init__(self, cfg: PartyConfig, art: Any) -> None:
        self.cfg, self.art = cfg, art
        self.socks: dict[str, socket.socket] = {}

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for s in self.socks.values():
            try:
                s.close()
            except OSError:
                pass
        self.socks = {}

    def _where(self, role: str) -> str:
        ep = self.cfg.parties[role]
        return f"{NAME[role]} at {ep.host}:{ep.port}"

    def connect(self, ready_timeout: float | None = None, alive: Callable[[str], str | None] | None = None) -> None:
        """Connect to every role and check its role and artifact. `ready_timeout`: keep retrying
        (parties still starting) that long; `alive(role)` returns why a local party is gone."""
        deadline = time.monotonic() + (ready_timeout or 0)
        for role in ROLES:
            ep = self.cfg.parties[role]
            while True:
                try:
                    s = socket.create_connection((ep.host, ep.port), timeout=self.cfg.connect_timeout)
                    break
                except OSError as e:
                    why = alive(role) if alive else None
                    if why:
                        raise PartyError(f"{self._where(role)} did not start: {why}") from e
                    if time.monotonic() < deadline:
                        time.sleep(0.2)
                        continue
                    reason = "connection refused" if isinstance(e, ConnectionRefusedError) else (
                        f"no answer within {self.cfg.connect_timeout:g} s" if isinstance(e, TimeoutError) else str(e))
                    raise PartyError(f"cannot reach {self._where(role)}: {reason} (is `secformer party --role "
                                     f"{role}` running with this config?)") from e
            self.socks[role] = s
            s.settimeout(max(self.cfg.connect_timeout, deadline - time.monotonic()))
            try:
                send_frame(s, {"type": "hello", "wire": WIRE_VERSION})
                header, _ = self._expect(role, s)
            except TimeoutError as e:
                raise PartyError(f"{self._where(role)} accepted the connection but did not answer (still "
                                 "loading, or stalled)") from e
            if header.get("role") != role:
                raise PartyError(f"the party at {self._where(role).split(' at ')[1]} is "
                                 f"{NAME.get(header.get('role'), header.get('role'))}, but the config says "
                                 f"{NAME[role]}: wrong role (check --role and the ports in {self.cfg.path})")
            if header.get("artifact") != self.art.sha256:
                raise PartyError(f"{self._where(role)} runs artifact {str(header.get('artifact'))[:12]}, but "
                                 f"this client's is {self.art.short}: use the same artifact everywhere")

    def _expect(self, role: str, s: socket.socket) -> tuple[dict, dict]:
        try:
            header, tensors = recv_frame(s)
        except ConnectionError as e:
            raise PartyError(f"{self._where(role)} closed the connection") from e
        except PartyError as e:
            raise PartyError(f"{self._where(role)}: {e}") from e
        if header.get("type") == "error":
            raise PartyError(header.get("message", "error"))
        return header, tensors

    def infer(self, inputs: dict[str, torch.Tensor], on_progress: Callable[[dict], None] | None = None
              ) -> InferResult:
        """One inference on plaintext inputs (by input name); returns the decoded outputs."""
        from .compiled import client_encode, split_shares

        graph, fxp = self.art.graph, self.art.fxp
        enc = client_encode(graph, fxp, inputs)
        secret = {k: v for k, v in enc.items() if graph[k].secret}
        public = {k: v for k, v in enc.items() if not graph[k].secret}
        s0, s1 = split_shares(secret)
        rid = secrets.token_hex(8)
        start = time.perf_counter()
        payload = {"p0": {**s0, **public}, "p1": {**s1, **public}, "dealer": {}}
        for role in ROLES:  # the dealer first: its offline phase starts at once
            try:
                send_frame(self.socks[role], {"type": "infer", "id": rid, "progress": on_progress is not None},
                           payload[role])
            except OSError as e:
                raise PartyError(f"lost the connection to {self._where(role)} while sending the request: {e}") from e
        replies = self._collect(rid, on_progress)
        seconds = time.perf_counter() - start
        o0, o1 = replies["p0"][1], replies["p1"][1]
        outs = tuple(fxp.decode(o0[f"out{i}"] + o1[f"out{i}"]).float() for i in range(len(graph.outputs)))
        return InferResult(outs, {r: replies[r][0]["stats"] for r in ROLES}, seconds)

    def _collect(self, rid: str, on_progress: Callable | None) -> dict[str, tuple[dict, dict]]:
        """Wait for the three results; on failure name the root cause and raise PartyError."""
        sel = selectors.DefaultSelector()
        for role, s in self.socks.items():
            s.settimeout(self.cfg.peer_timeout)
            sel.register(s, selectors.EVENT_READ, role)
        deadline = time.monotonic() + self.cfg.request_timeout
        replies: dict[str, tuple[dict, dict]] = {}
        failures: dict[str, dict] = {}
        failed_at = None
        grace = min(5.0, self.cfg.peer_timeout + 1)
        try:
            while len(replies) + len(failures) < len(ROLES):
                silent = [r for r in ROLES if r not in replies and r not in failures]
                blamed = {ROLES[f["peer"]] for f in failures.values() if isinstance(f.get("peer"), int)}
                if failures and set(silent) <= blamed:
                    break  # every silent role is the one the others timed out on
                ends = [deadline] + ([failed_at + grace] if failed_at else [])
                wait = min(ends) - time.monotonic()
                if wait <= 0:
                    break
                for key, _ in sel.select(wait):
                    role = key.data
                    try:
                        header, tensors = recv_frame(key.fileobj)
                    except (ConnectionError, OSError, PartyError) as e:
                        failures[role] = {"died": True, "message": f"{self._where(role)} closed the connection "
                                                                   f"during the inference (its process died?): {e}"}
                        sel.unregister(key.fileobj)
                        failed_at = failed_at or time.monotonic()
                        continue
                    kind = header.get("type")
                    if kind == "progress":
                        if on_progress:
                            on_progress(header.get("done", {}))
                        continue
                    sel.unregister(key.fileobj)
                    if kind == "result" and header.get("id") == rid:
                        replies[role] = (header, tensors)
                    else:
                        failures[role] = header if kind == "error" else {"message": f"unexpected reply {kind!r}"}
                        failed_at = failed_at or time.monotonic()
        finally:
            sel.close()
        if not failures and len(replies) == len(ROLES):
            return replies
        why = self._diagnose(failures, [r for r in ROLES if r not in replies and r not in failures])
        for role in ROLES:  # the roles still up hold a broken session: tell them to leave
            if role not in failures:
                try:
                    send_frame(self.socks[role], {"type": "abort", "reason": why})
                except OSError:
                    pass
        raise PartyError(why)

    def _diagnose(self, failures: dict[str, dict], silent: list[str]) -> str:
        notes = "; ".join(f["message"] for f in failures.values())
        for role, f in failures.items():  # a program error (not about a peer) is the root cause
            if not f.get("died") and f.get("peer") is None:
                return f"the inference failed in {NAME[role]}: {f['message']}" + \
                    (f" (others: {notes})" if len(failures) > 1 else "")
        for role, f in failures.items():
            if f.get("died"):
                return f"{NAME[role]} died during the inference: {f['message']}" + \
                    (f" (others: {notes})" if len(failures) > 1 else "")
        if silent:
            who = ", ".join(self._where(r) for r in silent)
            if failures:
                return f"{who} stalled during the inference: {notes}"
            return f"{who} did not answer within the request timeout ({self.cfg.request_timeout:g} s)"
        return f"the inference failed: {notes}"
