#!/usr/bin/env python3
"""CrypTen side of the secformer-compiler benchmarks (issues 2 and 5).

Runs inside the separate venv made by ``benchmarks/crypten/setup.sh``::

    benchmarks/crypten/.venv/bin/python benchmarks/crypten/run_crypten.py --ops \
        --json benchmarks/results/crypten_ops.json
    benchmarks/crypten/.venv/bin/python benchmarks/crypten/run_crypten.py --bert base --seq 128 \
        --json benchmarks/results/crypten_bert_base.json

Two CrypTen parties (RANK 0 and 1, WORLD_SIZE 2, gloo over TCP on 127.0.0.1) are started
by this script as separate processes (multiprocessing, spawn), each with one torch thread.
With ``--provider TTP`` a third process runs CrypTen's TTPServer (the dealer).

What is counted, per party (see ``Counters`` below; CrypTen's own
``get_communication_stats()`` is recorded beside it under ``crypten_logged``):

* ``rounds``: communication calls on the parties' group (one all_reduce = one round,
  exactly what CrypTen logs as a round);
* ``bytes_sent_per_party``: bytes this party puts on the wire on the parties' group
  (an opening of n int64 shares = 8n bytes per party; CrypTen's own log counts an
  all_reduce as 2n elements, i.e. sent plus received);
* ``dealer_bytes``: bytes sent by the TTP to party 0 (0 with TFP: there party 0 makes the
  correlated randomness itself, so there is no dealer traffic and no real dealer).

SecFormer's operators are built from CrypTensor operations:

* GeLU: x/2 (1 + erf(x/sqrt2)); erf = -1 / Fourier series / +1 on z<-2.5 / |z|<=2.5 / z>2.5,
  series sum_k beta_k sin(k pi z/10) (SecFormer's 7 coefficients, period 20). The two
  segment comparisons are one batched CrypTen comparison. The sine series uses the
  one-round secure-sine protocol with the period bug fixed: u = z/20 (so the period is 1,
  a power of two in fixed point), the parties open (u + t) mod 1 (i.e. the low 16 bits of
  the shares) with a fresh uniform mask t in [0, 1) per call, and finish locally with
  sin(a - b) = sin a cos b - cos a sin b from shares of sin/cos(2 pi k t). The mask and
  its sin/cos shares come from the provider's trust model: TFP = party 0 makes them (as
  CrypTen's TFP does for Beaver triples), TTP = the TTP process (a custom TTP function).
* LayerNorm: Goldschmidt inverse square root (m = (3-x)/2, x <- x m^2, y <- y m) with a
  public power-of-4 pre-scale s chosen by a calibration pass so that s*var <= 1.5.
* 2Quad softmax: (x+5)^2 / sum (x+5)^2, division by Goldschmidt reciprocal
  (m = 2-y, x <- x m, y <- y m) with a public power-of-2 pre-scale c, c*rowsum in (0.5, 1].

The ``crypten`` BERT configuration uses CrypTen's own functions (library defaults):
GeLU in tanh form with CrypTen's tanh (2 sigmoid(2x) - 1, sigmoid via exp and reciprocal),
``MPCTensor.softmax`` (max tree, exp limit approximation, Newton reciprocal) and LayerNorm
with ``MPCTensor.inv_sqrt`` (Newton, 3 iterations).
"""

import argparse
import json
import math
import os
import platform
import queue as queue_mod
import shlex
import socket
import statistics
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

# SecFormer's published erf Fourier coefficients: erf(z) ~ sum_k beta_k sin(k pi z / 10).
SECFORMER_BETAS = [1.25772, -0.0299154, 0.382155, -0.0519123, 0.196033, -0.0624557, 0.118029]
ERF_CUT = 2.5
QUAD_C = 5.0
FRAC_BITS = 16  # CrypTen's default fixed-point precision
SINE_BITS = FRAC_BITS  # the sine opening is mod 1, i.e. mod 2^16 in the ring
LN_EPS = 1e-12


# ----------------------------------------------------------------------------------------
# Communication accounting (installed in each party before crypten.init()).
# ----------------------------------------------------------------------------------------
class Counters:
    def __init__(self):
        self.reset()

    def reset(self):
        self.rounds = 0
        self.bytes_sent = 0
        self.dealer_bytes = 0  # bytes received from the TTP (party 0 only)
        self.dealer_requests = 0
        self.dealer_request_bytes = 0

    def snapshot(self):
        return dict(
            rounds=self.rounds,
            bytes_sent=self.bytes_sent,
            dealer_bytes=self.dealer_bytes,
            dealer_requests=self.dealer_requests,
            dealer_request_bytes=self.dealer_request_bytes,
        )


COUNT = Counters()


def _install_counters():
    import pickle

    from crypten.communicator.distributed_communicator import DistributedCommunicator as DC

    def nel(x):
        if isinstance(x, (list, tuple)):
            return sum(nel(t) for t in x)
        return x.nelement() if hasattr(x, "nelement") else 0

    def group_of(self, args, kwargs, pos):
        g = kwargs.get("group", args[pos] if len(args) > pos else None)
        return "main" if (g is None or g is self.main_group) else "ttp"

    def make(name, fn):
        orig = getattr(DC, name)

        def wrapper(self, *args, **kwargs):
            fn(self, args, kwargs)
            result = orig(self, *args, **kwargs)
            if name == "broadcast" and group_of(self, args, kwargs, 2) == "ttp":
                src = args[1] if len(args) > 1 else kwargs["src"]
                if src != self.get_rank():  # a dealer correction arriving at party 0
                    COUNT.dealer_bytes += 8 * nel(args[0])
            return result

        wrapper.__name__ = name
        setattr(DC, name, wrapper)

    ws = lambda self: self.get_world_size()  # noqa: E731

    def on_main(self, args, kwargs, sent):
        COUNT.rounds += 1
        COUNT.bytes_sent += sent

    def all_reduce(self, a, k):
        # 2 parties: each sends its n-element share once (ring all-reduce: n/2 + n/2)
        on_main(self, a, k, 8 * nel(a[0]) * 2 * (ws(self) - 1) // ws(self))

    def broadcast(self, a, k):
        if group_of(self, a, k, 2) == "main":
            src = a[1] if len(a) > 1 else k["src"]
            on_main(self, a, k, 8 * nel(a[0]) * (ws(self) - 1) if src == self.get_rank() else 0)

    def send(self, a, k):
        on_main(self, a, k, 8 * nel(a[0]))

    def recv(self, a, k):
        on_main(self, a, k, 0)

    def reduce(self, a, k):
        dst = a[1] if len(a) > 1 else k["dst"]
        on_main(self, a, k, 0 if dst == self.get_rank() else 8 * nel(a[0]))

    def gather(self, a, k):
        on_main(self, a, k, 0 if a[1] == self.get_rank() else 8 * nel(a[0]))

    def all_gather(self, a, k):
        on_main(self, a, k, 8 * nel(a[0]) * (ws(self) - 1))

    def scatter(self, a, k):
        src = a[1]
        sent = sum(nel(t) for i, t in enumerate(a[0]) if i != src) * 8 if src == self.get_rank() else 0
        on_main(self, a, k, sent)

    def barrier(self, a, k):
        on_main(self, a, k, 0)

    def send_obj(self, a, k):
        nbytes = len(pickle.dumps(a[0]))
        if group_of(self, a, k, 2) == "main":
            on_main(self, a, k, nbytes)
        else:
            COUNT.dealer_requests += 1
            COUNT.dealer_request_bytes += nbytes

    def recv_obj(self, a, k):
        if group_of(self, a, k, 1) == "main":
            on_main(self, a, k, 0)

    def broadcast_obj(self, a, k):
        if group_of(self, a, k, 2) == "main":
            src = a[1]
            nbytes = len(pickle.dumps(a[0])) if src == self.get_rank() else 0
            on_main(self, a, k, nbytes * (ws(self) - 1))

    for name, fn in dict(
        all_reduce=all_reduce, broadcast=broadcast, send=send, isend=send, recv=recv,
        irecv=recv, reduce=reduce, gather=gather, all_gather=all_gather, scatter=scatter,
        barrier=barrier, send_obj=send_obj, recv_obj=recv_obj, broadcast_obj=broadcast_obj,
    ).items():
        make(name, fn)


# ----------------------------------------------------------------------------------------
# Backends: the same approximation code runs on CrypTensors (MPC) and on float64 torch
# tensors (the "float model running the same approximations").
# ----------------------------------------------------------------------------------------
def pow4_scale(max_val, target=1.5):
    """Public power-of-4 factor s with max_val * s <= target (sqrt(s) is then exact)."""
    j = math.ceil(math.log(max_val / target, 4))
    return 4.0 ** (-j)


def pow2_scale(max_val):
    """Public power-of-2 factor c with max_val * c in (0.5, 1]."""
    return 2.0 ** (-math.ceil(math.log2(max_val)))


class PlainBackend:
    """float64 torch; `calibrate=True` measures the pre-scales of each site."""

    is_mpc = False

    def __init__(self, calibrate=False, scales=None):
        self.calibrate = calibrate
        self.scales = {} if scales is None else scales

    def scale(self, key, kind, v):
        if self.calibrate:
            m = float(v.max())
            self.scales[key] = pow4_scale(m) if kind == "rsqrt" else pow2_scale(m)
            self.scales[key + "/calibration_max"] = m
        return self.scales[key]

    def lt0(self, x):
        return (x < 0).double()

    def stack(self, xs):
        return torch.stack(xs)

    def sine_series(self, u, betas):
        k = torch.arange(1, len(betas) + 1, dtype=torch.float64).view(-1, *([1] * u.dim()))
        b = torch.tensor(betas, dtype=torch.float64).view_as(k)
        return (b * torch.sin(2 * math.pi * k * u.unsqueeze(0))).sum(0)

    # CrypTen's library functions (0.4.1 defaults), re-implemented in float64.
    @staticmethod
    def _exp(x, iters=8):
        r = 1 + x / 2 ** iters
        for _ in range(iters):
            r = r * r
        return r

    def _reciprocal_pos(self, x, iters=10, initial=None):
        r = 3 * self._exp(1 - 2 * x) + 0.003 if initial is None else torch.full_like(x, initial)
        for _ in range(iters):
            r = 2 * r - r * r * x
        return r

    def exp(self, x):
        return self._exp(x)

    def sigmoid(self, x):
        ltz = (x < 0).double()
        pos = x * (1 - 2 * ltz)
        den = self._exp(-pos, 9) + 1
        out = self._reciprocal_pos(den, 3, 0.75)
        return torch.where(ltz == 0, out, 1 - out)

    def tanh(self, x):
        return 2 * self.sigmoid(2 * x) - 1

    def inv_sqrt(self, x):
        y = self._exp(-(x / 2 + 0.2)) * 2.2 + 0.2 - x / 1024
        for _ in range(3):
            y = y * (3 - x * y * y) / 2
        return y

    def softmax(self, x, dim):
        z = x - x.max(dim, keepdim=True)[0]
        e = self._exp(z)
        return e * self._reciprocal_pos(e.sum(dim, keepdim=True))


class MPCBackend:
    """CrypTensors; the provider decides who makes the secure-sine mask."""

    is_mpc = True

    def __init__(self, scales, provider):
        self.scales = scales
        self.provider = provider

    def scale(self, key, kind, v):
        return self.scales[key]

    def lt0(self, x):
        return x < 0

    def stack(self, xs):
        import crypten

        return crypten.stack(xs)

    def _sine_mask(self, size, K):
        """Shares of t (ring element; t mod 2^16 is the mask) and of cos/sin(2 pi k t)."""
        import crypten
        import crypten.communicator as comm
        from crypten.common.rng import generate_random_ring_element
        from crypten.mpc.primitives import ArithmeticSharedTensor

        size = tuple(size)
        full = (2 * K + 1,) + size
        rank = comm.get().get_rank()
        if self.provider == "TFP":
            # Party 0 plays the dealer, exactly as CrypTen's TFP does for Beaver triples.
            if rank == 0:
                gen = crypten.generators["local"][torch.device("cpu")]
                tau = torch.randint(0, 2 ** SINE_BITS, size, generator=gen, dtype=torch.long)
                trig = _sine_table(tau, K)
                payload = torch.cat([tau.unsqueeze(0), trig])
                ast = ArithmeticSharedTensor(payload, precision=0, src=0)
            else:
                ast = ArithmeticSharedTensor(None, size=full, precision=0, src=0)
            share = ast.share
            return share[0], share[1:]
        # TTP: the t shares come from each party's PRG shared with the TTP; the TTP sends
        # party 0 its share of the sin/cos table (see _ttp_sine_mask below).
        from crypten.mpc.provider.ttp_provider import TTPClient

        gen = TTPClient.get().get_generator()
        t = generate_random_ring_element(size, generator=gen)
        if rank == 0:
            trig = TTPClient.get().ttp_request("secformer_sine_mask", None, size, K)
        else:
            trig = generate_random_ring_element((2 * K,) + size, generator=gen)
        return t, trig

    def sine_series(self, u, betas):
        """sum_k beta_k sin(2 pi k u): one opening of (u + t) mod 1 (low 16 bits)."""
        import crypten.communicator as comm
        from crypten.mpc import MPCTensor

        assert u.encoder.scale == 2 ** FRAC_BITS
        K = len(betas)
        t_share, trig = self._sine_mask(u.size(), K)
        low = (1 << SINE_BITS) - 1
        d = (u._tensor.share + t_share) & low
        d = comm.get().all_reduce(d) & low  # the only round
        delta = d.double() / 2 ** SINE_BITS  # uniform in [0, 1), hides u
        k = torch.arange(1, K + 1, dtype=torch.float64).view(-1, *([1] * delta.dim()))
        b = torch.tensor(betas, dtype=torch.float64).view_as(k)
        ang = 2 * math.pi * k * delta.unsqueeze(0)
        # sin(2pi k (delta - t)) = sin(2pi k delta) cos(2pi k t) - cos(2pi k delta) sin(2pi k t)
        A = (b * torch.sin(ang)).float()
        Bc = (-b * torch.cos(ang)).float()
        C = MPCTensor.from_shares(trig[:K], precision=FRAC_BITS)
        S = MPCTensor.from_shares(trig[K:], precision=FRAC_BITS)
        return (C * A).sum(0) + (S * Bc).sum(0)

    def exp(self, x):
        return x.exp()

    def tanh(self, x):
        return x.tanh()

    def inv_sqrt(self, x):
        return x.inv_sqrt()

    def softmax(self, x, dim):
        return x.softmax(dim)


def _sine_table(tau, K):
    """Fixed-point cos(2 pi k tau/2^16), then sin(...), k = 1..K: shape (2K, *tau)."""
    k = torch.arange(1, K + 1, dtype=torch.float64).view(-1, *([1] * tau.dim()))
    ang = 2 * math.pi * k * (tau.double() / 2 ** SINE_BITS).unsqueeze(0)
    return torch.round(torch.cat([torch.cos(ang), torch.sin(ang)]) * 2 ** FRAC_BITS).long()


def _ttp_sine_mask(self, size, K):
    """TTPServer function: party 0's share of the cos/sin table for t = sum of PRG shares."""
    t = self._get_additive_PRSS(size)
    tau = t & ((1 << SINE_BITS) - 1)
    table = _sine_table(tau, K)
    return table - self._get_additive_PRSS(table.size(), remove_rank=True)


# ----------------------------------------------------------------------------------------
# The operators, written once for both backends.
# ----------------------------------------------------------------------------------------
def sf_gelu(B, x):
    """SecFormer GeLU: x/2 (1 + erf(x/sqrt2)), erf by segments + Fourier series."""
    z = x * (1 / math.sqrt(2))
    b = B.lt0(B.stack([z + ERF_CUT, z.neg() + ERF_CUT]))  # [z < -2.5, z > 2.5], one comparison
    b1, b2 = b[0], b[1]
    S = B.sine_series(x * (1 / (20 * math.sqrt(2))), SECFORMER_BETAS)  # u = z / 20
    erf = (b2 - b1) + ((b1 + b2).neg() + 1) * S
    return (x * 0.5) * (erf + 1)


def gs_rsqrt(B, v, s, iters):
    """1/sqrt(v) by Goldschmidt on s*v (s public, s*v in (0, 3)); returns sqrt(s)/sqrt(s v)."""
    x = v * s
    y = None
    for i in range(iters):
        m = (x * -0.5) + 1.5
        last = i == iters - 1
        if y is None:
            y = m
            if not last:
                x = x * m.square()
        elif last:
            y = y * m
        else:
            xy = B.stack([x, y]) * B.stack([m.square(), m])
            x, y = xy[0], xy[1]
    return y * math.sqrt(s)


def gs_reciprocal(B, d, c, iters):
    """1/(c d) by Goldschmidt (c public, c d in (0, 2))."""
    y = d * c
    x = None
    for i in range(iters):
        m = y.neg() + 2
        last = i == iters - 1
        if x is None:
            x = m
            if not last:
                y = y * m
        elif last:
            x = x * m
        else:
            xy = B.stack([x, y]) * m
            x, y = xy[0], xy[1]
    return x


def sf_layernorm(B, x, key, iters, gamma=None, beta=None):
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    var = d.square().mean(-1, keepdim=True) + LN_EPS
    s = B.scale(key, "rsqrt", var)
    y = d * gs_rsqrt(B, var, s, iters)
    if gamma is not None:
        y = y * gamma + beta
    return y


def sf_2quad(B, x, key, iters):
    q = (x + QUAD_C).square()
    den = q.sum(-1, keepdim=True)
    c = B.scale(key, "recip", den)
    return (q * c) * gs_reciprocal(B, den, c, iters)


def ct_gelu(B, x):
    """GeLU, tanh form, with CrypTen's tanh."""
    inner = (x + (x * x.square()) * 0.044715) * math.sqrt(2 / math.pi)
    return (x * 0.5) * (B.tanh(inner) + 1)


def ct_layernorm(B, x, gamma=None, beta=None):
    mu = x.mean(-1, keepdim=True)
    d = x - mu
    var = d.square().mean(-1, keepdim=True)
    y = d * B.inv_sqrt(var + 1e-5)  # CrypTen's nn.LayerNorm default eps
    if gamma is not None:
        y = y * gamma + beta
    return y


# exact float64 references
def exact_gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def exact_layernorm(x, gamma=None, beta=None, eps=LN_EPS):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y if gamma is None else y * gamma + beta


def exact_2quad(x):
    q = (x + QUAD_C) ** 2
    return q / q.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------------------
# BERT encoder (no embeddings, no mask, batch 1), generic over the backend.
# ----------------------------------------------------------------------------------------
BERT_CONFIGS = {
    "base": dict(layers=12, hidden=768, heads=12, ffn=3072),
    "large": dict(layers=24, hidden=1024, heads=16, ffn=4096),
}


class Section:
    """Accumulates time / rounds / bytes per layer type (party-local)."""

    def __init__(self):
        self.acc = {}
        self.name = None

    def __call__(self, name):
        self.name = name
        return self

    def __enter__(self):
        self._t = time.perf_counter()
        self._c = COUNT.snapshot()
        return self

    def __exit__(self, *exc):
        a = self.acc.setdefault(self.name, dict(wall_s=0.0, rounds=0, bytes_sent=0))
        a["wall_s"] += time.perf_counter() - self._t
        a["rounds"] += COUNT.rounds - self._c["rounds"]
        a["bytes_sent"] += COUNT.bytes_sent - self._c["bytes_sent"]
        return False


def make_bert_weights(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    H, F = cfg["hidden"], cfg["ffn"]
    n = lambda *s, std=0.02: torch.randn(*s, generator=g, dtype=torch.float64) * std  # noqa: E731
    layers = []
    for _ in range(cfg["layers"]):
        layers.append(dict(
            wq=n(H, H), bq=n(H), wk=n(H, H), bk=n(H), wv=n(H, H), bv=n(H),
            wo=n(H, H), bo=n(H), g1=1 + n(H, std=0.1), b1=n(H, std=0.1),
            wi=n(F, H), bi=n(F), wo2=n(H, F), bo2=n(H), g2=1 + n(H, std=0.1), b2=n(H, std=0.1),
        ))
    return layers


def bert_forward(B, layers, h, cfg, mode, iters, sec=None):
    """mode: 'secformer' | 'crypten' | 'exact' (exact only with torch tensors)."""
    nh = cfg["heads"]
    S, H = h.shape[0], cfg["hidden"]
    dh = H // nh
    sec = sec or Section()

    def lin(x, w, b):  # w held (out, in) and used as w.t(), as torch / crypten.nn.Linear do
        return x.matmul(w.t()) + b

    for i, L in enumerate(layers):
        with sec("linear"):
            q = lin(h, L["wq"], L["bq"]) * (1 / math.sqrt(dh))
            k = lin(h, L["wk"], L["bk"])
            v = lin(h, L["wv"], L["bv"])
            q = q.reshape(S, nh, dh).transpose(0, 1)
            k = k.reshape(S, nh, dh).transpose(0, 1)
            v = v.reshape(S, nh, dh).transpose(0, 1)
        with sec("attention_matmul"):
            scores = q.matmul(k.transpose(1, 2))
        with sec("softmax"):
            if mode == "secformer":
                p = sf_2quad(B, scores, f"L{i}.softmax", iters["div"])
            elif mode == "crypten":
                p = B.softmax(scores, -1)
            else:
                p = torch.softmax(scores, -1)
        with sec("attention_matmul"):
            ctx = p.matmul(v).transpose(0, 1).reshape(S, H)
        with sec("linear"):
            a = lin(ctx, L["wo"], L["bo"]) + h
        with sec("layernorm"):
            if mode == "secformer":
                h1 = sf_layernorm(B, a, f"L{i}.ln1", iters["rsqrt"], L["g1"], L["b1"])
            elif mode == "crypten":
                h1 = ct_layernorm(B, a, L["g1"], L["b1"])
            else:
                h1 = exact_layernorm(a, L["g1"], L["b1"])
        with sec("linear"):
            f = lin(h1, L["wi"], L["bi"])
        with sec("gelu"):
            if mode == "secformer":
                f = sf_gelu(B, f)
            elif mode == "crypten":
                f = ct_gelu(B, f)
            else:
                f = exact_gelu(f)
        with sec("linear"):
            o = lin(f, L["wo2"], L["bo2"]) + h1
        with sec("layernorm"):
            if mode == "secformer":
                h = sf_layernorm(B, o, f"L{i}.ln2", iters["rsqrt"], L["g2"], L["b2"])
            elif mode == "crypten":
                h = ct_layernorm(B, o, L["g2"], L["b2"])
            else:
                h = exact_layernorm(o, L["g2"], L["b2"])
    return h


# ----------------------------------------------------------------------------------------
# Party process
# ----------------------------------------------------------------------------------------
def _party(rank, world_size, port, provider, args, q):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), DISTRIBUTED_BACKEND="gloo",
        RENDEZVOUS=f"tcp://127.0.0.1:{port}", GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    if args.int64_matmul in ("colmajor", "rowmajor"):
        _patch_int64_matmul(args.int64_matmul)
    try:
        import crypten
        from crypten.config import cfg

        cfg.mpc.provider = provider
        cfg.communicator.verbose = True  # so CrypTen's own stats are logged too
        _install_counters()
        if rank == world_size:  # the TTP
            from crypten.mpc.provider.ttp_provider import TTPServer

            TTPServer.secformer_sine_mask = _ttp_sine_mask
            TTPServer()
            return
        crypten.init()
        res = run_ops(args, provider) if args.ops else run_bert(args, provider)
        q.put((rank, "ok", res))
        crypten.uninit()
    except Exception:  # noqa: BLE001
        q.put((rank, "error", traceback.format_exc()))
        raise


def _patch_int64_matmul(layout: str = "colmajor"):
    """Opt-in (--int64-matmul colmajor / rowmajor): torch.matmul on int64 with the second
    operand made column-major (or contiguous row-major) first. Bit-identical results; on the
    family 23 host torch 2.13's CPU int64 matmul kernel was 6-10x faster column-major (e.g.
    (128x768)@(768x3072): 3.1 s -> 0.55 s, one thread; float32: 0.03 s); on the family 25
    host (2026-11-27) contiguous row-major beats column-major by 1.3-1.7x for our runtime's
    shapes (runtime/ring.py), so both are offered. CrypTen calls getattr(torch, "matmul")
    for triples and Beaver products."""
    orig = torch.matmul

    def matmul(a, b, *args, **kwargs):
        if (torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == torch.long
                and b.dtype == torch.long and b.dim() >= 2 and not args and not kwargs):
            b = b.transpose(-1, -2).contiguous().transpose(-1, -2) if layout == "colmajor" else b.contiguous()
        return orig(a, b, *args, **kwargs)

    torch.matmul = matmul


def _sync():
    import crypten.communicator as comm
    import torch.distributed as dist

    dist.barrier(group=comm.get().main_group)  # not counted


def _measure(fn, repeats, warmup=1):
    """Runs fn repeatedly; returns (last output, per-run walls, per-run counters)."""
    import crypten

    walls, stats = [], []
    out = None
    for r in range(warmup + repeats):
        _sync()
        COUNT.reset()
        crypten.reset_communication_stats()
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        if r >= warmup:
            walls.append(t1 - t0)
            s = COUNT.snapshot()
            s["crypten_logged"] = {k: v for k, v in crypten.comm.get().get_communication_stats().items()}
            stats.append(s)
    return out, walls, stats


def _plain(y):
    """Reveal and decode exactly (float64). CrypTen 0.4.1's FixedPointEncoder.decode divides
    negative values by scale - 1 and so decodes some of them 1.0 too low (about |x| in
    2^16 negative values); the revealed ring elements themselves are right."""
    return y._tensor.reveal().double() / y.encoder.scale


def _stats_record(walls, stats):
    s = stats[-1]
    assert all(x["rounds"] == s["rounds"] and x["bytes_sent"] == s["bytes_sent"] for x in stats), \
        "communication differs between runs"
    cl = s["crypten_logged"]
    return dict(
        wall_runs=walls, wall_median=statistics.median(walls), rounds=s["rounds"],
        bytes_sent=s["bytes_sent"], dealer_bytes=s["dealer_bytes"],
        dealer_requests=s["dealer_requests"], dealer_request_bytes=s["dealer_request_bytes"],
        crypten_logged=dict(rounds=cl["rounds"], bytes=int(cl["bytes"]), comm_time_s=cl["time"]),
    )


def run_ops(args, provider):
    import crypten

    iters = dict(rsqrt=args.rsqrt_iters, div=args.div_iters)
    out = []
    rows = 16 if args.quick else 128
    heads = 2 if args.quick else 12
    want = lambda op: not args.only or op in args.only  # noqa: E731

    def gen(seed, shape, std):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    if want("gelu"):  # (128, 3072), x ~ N(0, 3^2)
        x = gen(1, (rows, 3072), 3.0)
        X = crypten.cryptensor(x.float(), src=0)
        B = MPCBackend({}, provider)
        y, walls, stats = _measure(lambda: sf_gelu(B, X), args.repeats)
        yp = _plain(y)
        out.append(dict(op="gelu", config="secformer", shape=list(x.shape), input="N(0, 3^2)",
                        max_abs_err=float((yp - exact_gelu(x)).abs().max()),
                        max_abs_err_vs_same_approx=float((yp - sf_gelu(PlainBackend(), x)).abs().max()),
                        **_stats_record(walls, stats)))

    # (128, 768), N(0, 5^2) and N(0, 0.2^2); the pre-scale comes from a calibration sample
    for std in (5.0, 0.2) if want("layernorm") else ():
        x = gen(2, (rows, 768), std)
        gamma, beta = 1 + gen(6, (768,), 0.1), gen(7, (768,), 0.1)
        cal = PlainBackend(calibrate=True)
        sf_layernorm(cal, gen(102, (rows, 768), std), "ln", iters["rsqrt"])
        X = crypten.cryptensor(x.float(), src=0)
        G, Bt = crypten.cryptensor(gamma.float(), src=1), crypten.cryptensor(beta.float(), src=1)
        B = MPCBackend(cal.scales, provider)
        y, walls, stats = _measure(
            lambda: sf_layernorm(B, X, "ln", iters["rsqrt"], G, Bt), args.repeats)
        yp = _plain(y)
        ref = sf_layernorm(PlainBackend(scales=cal.scales), x, "ln", iters["rsqrt"], gamma, beta)
        out.append(dict(op="layernorm", config="secformer", shape=list(x.shape),
                        input=f"N(0, {std}^2); secret weight 1 + 0.1 N(0,1), secret bias 0.1 N(0,1)",
                        prescale=cal.scales["ln"], iterations=iters["rsqrt"],
                        max_abs_err=float((yp - exact_layernorm(x, gamma, beta)).abs().max()),
                        max_abs_err_vs_same_approx=float((yp - ref).abs().max()),
                        **_stats_record(walls, stats)))

    if want("softmax_2quad"):  # (12, 128, 128), scores ~ N(0, 3^2)
        x = gen(3, (heads, 128, 128), 3.0)
        cal = PlainBackend(calibrate=True)
        sf_2quad(cal, gen(103, (heads, 128, 128), 3.0), "sm", iters["div"])
        X = crypten.cryptensor(x.float(), src=0)
        B = MPCBackend(cal.scales, provider)
        y, walls, stats = _measure(lambda: sf_2quad(B, X, "sm", iters["div"]), args.repeats)
        yp = _plain(y)
        ref = sf_2quad(PlainBackend(scales=cal.scales), x, "sm", iters["div"])
        out.append(dict(op="softmax_2quad", config="secformer", shape=list(x.shape),
                        input="N(0, 3^2)", prescale=cal.scales["sm"], iterations=iters["div"],
                        max_abs_err=float((yp - exact_2quad(x)).abs().max()),
                        max_abs_err_vs_same_approx=float((yp - ref).abs().max()),
                        **_stats_record(walls, stats)))

    # secret x secret; the weight is held (out, in) and used as W.t(), as crypten.nn.Linear does
    for n in (768, 3072) if want("matmul") else ():
        a = gen(4, (rows, 768), 1.0)
        w = gen(5, (n, 768), 1 / math.sqrt(768))
        A = crypten.cryptensor(a.float(), src=0)
        W = crypten.cryptensor(w.float(), src=1)
        y, walls, stats = _measure(lambda: A.matmul(W.t()), args.repeats)
        yp = _plain(y)
        out.append(dict(op="matmul", config="secret x secret", shape=[[rows, 768], [768, n]],
                        input="A ~ N(0,1), W ~ N(0, 1/768), W held (out, in) as in nn.Linear",
                        max_abs_err=float((yp - a @ w.t()).abs().max()),
                        max_abs_err_crypten_decode=float(
                            (y.get_plain_text().double() - a @ w.t()).abs().max()),
                        **_stats_record(walls, stats)))
    return out


def run_bert(args, provider):
    import crypten

    cfg = dict(BERT_CONFIGS[args.bert])
    if args.layers:
        cfg["layers"] = args.layers
    iters = dict(rsqrt=args.rsqrt_iters, div=args.div_iters)
    layers = make_bert_weights(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(args.seq, cfg["hidden"], generator=g, dtype=torch.float64)
    h_cal = torch.randn(args.seq, cfg["hidden"], generator=torch.Generator().manual_seed(2),
                        dtype=torch.float64)

    # calibration pass for the SecFormer pre-scales (float model, separate input)
    cal = PlainBackend(calibrate=True)
    bert_forward(cal, layers, h_cal, cfg, "secformer", iters)
    exact = bert_forward(None, layers, h0, cfg, "exact", iters)

    # encrypt: weights from party 1 (model owner), input from party 0 (client)
    enc_layers = [{k: crypten.cryptensor(v.float(), src=1) for k, v in L.items()} for L in layers]
    H0 = crypten.cryptensor(h0.float(), src=0)

    out = []
    for config in args.configs:
        B = MPCBackend(cal.scales, provider)
        sec = Section()
        y, walls, stats = _measure(
            lambda: bert_forward(B, enc_layers, H0, cfg, config, iters, sec), args.repeats, warmup=0)
        yp = _plain(y)
        ref = bert_forward(PlainBackend(scales=cal.scales), layers, h0, cfg, config, iters)
        for v in sec.acc.values():
            v["wall_s"] /= args.repeats
            v["rounds"] //= args.repeats
            v["bytes_sent"] //= args.repeats
        rec = dict(model=f"bert-{args.bert}", config=config, seq_len=args.seq, batch=1,
                   layers=cfg["layers"], hidden=cfg["hidden"], heads=cfg["heads"], ffn=cfg["ffn"],
                   max_abs_err=float((yp - ref).abs().max()),
                   max_abs_err_vs_exact=float((yp - exact).abs().max()),
                   max_abs_err_crypten_decode=float((y.get_plain_text().double() - ref).abs().max()),
                   ref_vs_exact_max_abs_err=float((ref - exact).abs().max()),
                   finite=bool(torch.isfinite(yp).all()), breakdown=sec.acc,
                   **_stats_record(walls, stats))
        if config == "secformer":
            rec["prescales"] = {k: v for k, v in cal.scales.items() if "/" not in k}
            rec["iterations"] = iters
        out.append(rec)
    return out


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_description():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    try:
        import importlib.metadata as md

        crypten_version = md.version("crypten")
    except Exception:  # noqa: BLE001
        crypten_version = "?"
    return dict(cpu=cpu, cores=os.cpu_count(), memory=mem, os=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, crypten=crypten_version,
                threads_per_party=1, transport="gloo over TCP on 127.0.0.1 (loopback)")


def _torch_float_time(args):
    """Float32 torch, exact functions, one thread: median of 5 (BERT mode)."""
    torch.set_num_threads(1)
    cfg = dict(BERT_CONFIGS[args.bert])
    if args.layers:
        cfg["layers"] = args.layers
    layers = [{k: v.float() for k, v in L.items()} for L in make_bert_weights(cfg, seed=0)]
    h0 = torch.randn(args.seq, cfg["hidden"], generator=torch.Generator().manual_seed(1))
    ts = []
    with torch.no_grad():
        for _ in range(6):
            t0 = time.perf_counter()
            bert_forward(None, layers, h0, cfg, "exact", None)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--ops", action="store_true", help="per-op records (issue 2)")
    mode.add_argument("--bert", choices=sorted(BERT_CONFIGS), help="BERT encoder end to end")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--configs", nargs="+", default=["secformer", "crypten"],
                    choices=["secformer", "crypten"], help="BERT configurations")
    ap.add_argument("--provider", choices=["TFP", "TTP"], default="TFP")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs (median reported); default 5 for --ops, 1 for --bert")
    ap.add_argument("--rsqrt-iters", type=int, default=7)
    ap.add_argument("--div-iters", type=int, default=7)
    ap.add_argument("--int64-matmul", choices=["torch", "colmajor", "rowmajor"], default="torch",
                    help="torch: CrypTen as installed (default); colmajor: give torch's int64 "
                    "matmul a column-major second operand (same results, faster kernel)")
    ap.add_argument("--quick", action="store_true", help="--ops on smaller shapes (smoke test)")
    ap.add_argument("--only", nargs="+", choices=["gelu", "layernorm", "softmax_2quad", "matmul"],
                    help="--ops: run only these ops")
    ap.add_argument("--layers", type=int, help="override the number of BERT layers (smoke test)")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    if args.repeats is None:
        args.repeats = 5 if args.ops else 1

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    nproc = 3 if args.provider == "TTP" else 2
    procs = [ctx.Process(target=_party, args=(r, 2, port, args.provider, args, q), daemon=False)
             for r in range(nproc)]
    t_start = time.time()
    load_before = os.getloadavg()
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = time.time() + args.timeout
    while len(results) + len(errors) < 2:
        try:
            rank, status, payload = q.get(timeout=5)
        except queue_mod.Empty:
            if any(p.exitcode not in (None, 0) for p in procs[:2]) or time.time() > deadline:
                errors.append("a party died or timed out: exit codes "
                              + str([p.exitcode for p in procs]))
                break
            continue
        (results.__setitem__(rank, payload) if status == "ok" else errors.append(f"rank {rank}:\n{payload}"))
    for p in procs:
        p.join(timeout=5 if errors else 120)
        if p.is_alive():
            p.terminate()
    if errors:
        sys.exit("\n".join(errors))

    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
    machine = machine_description()
    torch_wall = _torch_float_time(args) if args.bert else None
    records = []
    for r0, r1 in zip(results[0], results[1]):
        rec = {k: v for k, v in r0.items() if k not in (
            "wall_runs", "wall_median", "bytes_sent", "crypten_logged", "breakdown")}
        rec.update(
            wall_s=max(r0["wall_median"], r1["wall_median"]),
            wall_s_per_party=[r0["wall_median"], r1["wall_median"]],
            wall_runs_per_party=[r0["wall_runs"], r1["wall_runs"]],
            runs=len(r0["wall_runs"]),
            rounds=r0["rounds"],
            rounds_per_party=[r0["rounds"], r1["rounds"]],
            bytes_sent_per_party=max(r0["bytes_sent"], r1["bytes_sent"]),
            bytes_sent_by_party=[r0["bytes_sent"], r1["bytes_sent"]],
            dealer_bytes=r0["dealer_bytes"] + r1["dealer_bytes"],
            provider=args.provider,
            int64_matmul=args.int64_matmul,
            crypten_logged_per_party=[r0["crypten_logged"], r1["crypten_logged"]],
            machine=machine,
            load_average_1_5_15min_before_after=[list(load_before), list(os.getloadavg())],
            command=command,
        )
        if "breakdown" in r0:
            rec["breakdown_party0"] = r0["breakdown"]
        if torch_wall is not None:
            rec["torch_wall_s"] = torch_wall
        records.append(rec)

    _print_table(records, args)
    print(f"total wall (incl. setup): {time.time() - t_start:.1f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {args.json}")


def _print_table(records, args):
    MiB = 2 ** 20
    print(f"\nCrypTen 0.4.1, two parties, provider {args.provider}, gloo on loopback, "
          f"1 torch thread per party, int64 matmul: {args.int64_matmul}; per party:")
    hdr = "| what | config | shape | wall s | rounds | MiB sent | dealer MiB | max abs err |"
    print(hdr)
    print("|" + "---|" * 8)
    for r in records:
        what = r.get("op") or r.get("model")
        shape = r.get("shape") if "shape" in r else f"seq {r['seq_len']}"
        if r.get("input"):
            shape = f"{shape} {r['input']}"
        err = f"{r['max_abs_err']:.2e}"
        if "max_abs_err_vs_exact" in r:
            err += f" (vs exact {r['max_abs_err_vs_exact']:.2e})"
        print(f"| {what} | {r['config']} | {shape} | {r['wall_s']:.3f} | {r['rounds']} | "
              f"{r['bytes_sent_per_party'] / MiB:.2f} | {r['dealer_bytes'] / MiB:.2f} | {err} |")
    for r in records:
        if "breakdown_party0" in r:
            parts = ", ".join(f"{k} {v['wall_s']:.1f} s / {v['rounds']} rounds / "
                              f"{v['bytes_sent'] / MiB:.0f} MiB"
                              for k, v in r["breakdown_party0"].items())
            print(f"  {r['config']} breakdown (party 0): {parts}")
    if records and "torch_wall_s" in records[0]:
        print(f"  float32 torch, exact functions, 1 thread: {records[0]['torch_wall_s']:.3f} s")


if __name__ == "__main__":
    main()
