"""ProcessCluster / DistTransport: real processes over gloo agree with LocalCluster, and fail fast.

The first cluster of a session starts the preloaded fork server (~5 s: torch imports);
later clusters start in ~0.1 s, so the failure tests each get a fresh cluster.
"""

import os
import signal
import socket
import time

import pytest
import torch

from secformer_compiler.runtime.context import DEALER, P0, P1
from secformer_compiler.runtime.dist import DistInitError, init_dist
from secformer_compiler.runtime.launch import ProcessCluster
from secformer_compiler.runtime.local import LocalCluster
from secformer_compiler.runtime.protocols import arith
from secformer_compiler.runtime.protocols.trunc import trunc, trunc_cost
from secformer_compiler.runtime.ring import FixedPoint
from secformer_compiler.runtime.transport import PeerError

FX = FixedPoint(16)
TIMEOUT = 2.0  # seconds a role waits for a peer in the failure tests


# Programs must be top-level functions: they are pickled to the role processes.

def mul_program(ctx, x, y, shape):
    a = yield from arith.share(ctx, x, 0, shape)
    b = yield from arith.share(ctx, y, 1, shape)
    z = yield from arith.mul(ctx, a, b)
    z = yield from trunc(ctx, z)
    return (yield from arith.reveal(ctx, z))


def stall_program(ctx, x, shape, who, seconds):
    a = yield from arith.share(ctx, x, 0, shape)
    if ctx.party == who and not ctx.recording:  # ctx.party is 2 in the dealer (and in a
        time.sleep(seconds)  # party's offline pass, which mirrors the dealer)
    return (yield from arith.reveal(ctx, a))


def suicide_program(ctx, x, shape, who):
    a = yield from arith.share(ctx, x, 0, shape)  # one round done: the kill is mid-run
    if ctx.party == who and not ctx.recording:
        os.kill(os.getpid(), signal.SIGKILL)
    return (yield from arith.reveal(ctx, a))


def failing_program(ctx, x, shape):
    a = yield from arith.share(ctx, x, 0, shape)
    if ctx.party == P0:
        raise ValueError("bad input in P0")
    return (yield from arith.reveal(ctx, a))


def _inputs(seed, n):
    # the edges of a comfortable product range, zero, and random values in between
    xf = torch.cat([torch.tensor([-1000.0, 1000.0, 0.0, -1.5, 2.0 ** -8]),
                    (torch.rand(n - 5, dtype=torch.float64) - 0.5) * 200])
    yf = torch.cat([torch.tensor([1000.0, -1000.0, 123.25, 0.0, -3.0]),
                    (torch.rand(n - 5, dtype=torch.float64) - 0.5) * 200])
    return xf, yf


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.add(int(pid))
            except (OSError, IndexError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster():
    with ProcessCluster(FX, timeout=30.0) as c:
        yield c


def test_process_cluster_matches_local(cluster, seed):
    local = LocalCluster(FX)
    for n in (16, 40):  # two runs in one session: seeds are set up once and stay in sync
        xf, yf = _inputs(seed, n)
        x, y = FX.encode(xf), FX.encode(yf)
        shape = (n,)
        p0, p1, ps = cluster.run(mul_program, (x, None, shape), (None, y, shape))
        l0, l1, ls = local.run(mul_program, (x, None, shape), (None, y, shape))
        assert torch.equal(p0, p1) and torch.equal(l0, l1)
        # Different randomness, same value up to exact truncation's 1 ulp.
        assert int((p0 - l0).abs().max()) <= 1
        exact = x * y  # products of encodings fit: |xy| * 2^32 < 2^62
        for out in (p0, l0):
            assert int((out - torch.div(exact, 1 << 16, rounding_mode="floor")).abs().max()) <= 1
        ref = xf * yf
        err = (FX.decode(p0) - ref).abs()
        bound = 2.0 ** -16 * (2 + xf.abs() + yf.abs())  # 1 ulp trunc + input rounding
        assert bool((err <= bound).all()), float(err.max())
        # Identical cost accounting, and it matches the declared costs.
        assert ps.bytes_sent == ls.bytes_sent
        assert ps.rounds == ls.rounds
        assert ps.dealer_bytes == ls.dealer_bytes
        assert ps.by_tag == ls.by_tag
        declared = (arith.share_cost(shape) + arith.beaver_cost(shape, shape) + trunc_cost(shape)
                    + arith.reveal_cost(shape))
        assert ps.rounds == declared.rounds + 1  # share(x) and share(y) are separate rounds
        assert ps.bytes_sent[P0] == ps.bytes_sent[P1] == declared.bytes
        # Per-role stats and timings of the processes.
        assert ps.sent_to[P0] == {P1: ps.bytes_sent[P0]} and ps.sent_to[P1] == {P0: ps.bytes_sent[P1]}
        assert ps.sent_to[DEALER] == {P1: ps.dealer_bytes}
        assert set(ps.online_s) == {P0, P1} and all(0 < t < 10 for t in ps.online_s.values())
        assert ps.offline_s is not None and 0 < ps.offline_s < 10
        print(f"n={n}: online {ps.online_s}, offline {ps.offline_s:.4f} s, {ps.bytes_sent} B")


def test_killed_party_is_named_fast():
    x = FX.encode(torch.arange(8.0))
    with ProcessCluster(FX, timeout=TIMEOUT) as c:
        c.run(mul_program, (x, None, (8,)), (None, x, (8,)))
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="P1 died") as info:
            c.run(suicide_program, (x, (8,), P1), (None, (8,), P1))
        took = time.monotonic() - t0
    print(f"killed P1 noticed in {took:.3f} s: {info.value}")
    assert info.value.peer == P1
    assert "SIGKILL" in str(info.value)
    assert took < TIMEOUT  # a dead peer is seen at once, not at the timeout
    with pytest.raises(RuntimeError, match="closed after a failure"):
        c.run(mul_program, (x, None, (8,)), (None, x, (8,)))


def test_dealer_killed_between_runs_is_named():
    x = FX.encode(torch.arange(8.0))
    with ProcessCluster(FX, timeout=TIMEOUT) as c:
        os.kill(c.pids[DEALER], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="dealer died") as info:
            c.run(mul_program, (x, None, (8,)), (None, x, (8,)))
        took = time.monotonic() - t0
    print(f"killed dealer noticed in {took:.3f} s: {info.value}")
    assert info.value.peer == DEALER and took < TIMEOUT


@pytest.mark.parametrize("who, name", [(P1, "P1"), (DEALER, "dealer")])
def test_stalled_role_times_out_naming_it(who, name):
    x = FX.encode(torch.arange(8.0))
    with ProcessCluster(FX, timeout=TIMEOUT) as c:
        pids = dict(c.pids)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match=f"{name} stalled") as info:
            c.run(stall_program, (x, (8,), who, 60.0), (None, (8,), who, 60.0))
        took = time.monotonic() - t0
    print(f"stalled {name} reported after {took:.3f} s: {info.value}")
    assert info.value.peer == who
    assert f"timed out after {TIMEOUT:g} s" in str(info.value)
    assert TIMEOUT * 0.9 < took < TIMEOUT + 3.0
    assert not any(_alive(p) for p in pids.values())  # the sleeper was killed, not waited for


def test_program_error_names_role_and_keeps_type():
    x = FX.encode(torch.arange(8.0))
    with ProcessCluster(FX, timeout=TIMEOUT) as c:
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="^P0: bad input in P0") as info:
            c.run(failing_program, (x, (8,)), (None, (8,)))
        took = time.monotonic() - t0
    assert took < TIMEOUT  # the failing role exits, so its peers fail at once
    assert any("raised in P0" in n for n in info.value.__notes__)
    with ProcessCluster(FX, timeout=TIMEOUT) as c, pytest.raises(TypeError, match="top-level"):
        c.run(lambda ctx: None)


def test_close_leaves_no_processes():
    before = _children()
    x = FX.encode(torch.arange(4.0))
    c = ProcessCluster(FX, timeout=TIMEOUT)
    pids = list(c.pids.values())
    assert all(_alive(p) for p in pids)
    c.run(mul_program, (x, None, (4,)), (None, x, (4,)))
    c.close()
    c.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    # Only multiprocessing's shared helpers (fork server, resource tracker) may remain.
    assert _children() <= before | _helpers()
    assert all(not p.is_alive() for p in c.procs)


def _helpers() -> set[int]:
    from multiprocessing import forkserver, resource_tracker
    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None),
            getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {p for p in pids if p}


def test_init_dist_errors_are_clear():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(DistInitError, match=f"P0 could not serve the rendezvous on 127.0.0.1:{port}.*in use"):
            init_dist(0, "127.0.0.1", port, timeout=1.0)
    finally:
        busy.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(DistInitError, match=f"P1 could not reach the rendezvous at 127.0.0.1:{port} within 1 s"):
        init_dist(1, "127.0.0.1", port, timeout=1.0)
    assert time.monotonic() - t0 < 5.0


def fixed_program(ctx, x, w, load):
    """Load a fixed weight in one program, use it in the next (the deployed pattern)."""
    if load:
        ws = yield from arith.share(ctx, w, 1, (8, 5))
        ctx.state["fw"] = yield from arith.fix_operand(ctx, ws, "fw")
        return None
    a = yield from arith.share(ctx, x, 0, (4, 8))
    z = yield from trunc(ctx, (yield from arith.matmul_fixed(ctx, a, ctx.state["fw"])))
    return (yield from arith.reveal(ctx, z))


@pytest.mark.parametrize("offline", ["stream", "ahead"])
def test_offline_modes_prepare_before_the_online_clock(offline, seed):
    """The parties' offline phase (A_i @ F) and, with offline="ahead", the dealer's whole
    stream finish before the online clock; outputs and counted bytes do not change."""
    xf, wf = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    with ProcessCluster(FX, timeout=60.0, offline=offline) as c:
        c.run(fixed_program, (None, None, True), (None, FX.encode(wf), True))
        o0, o1, st = c.run(fixed_program, (FX.encode(xf), None, False), (None, None, False))
    assert torch.equal(o0, o1) and (FX.decode(o0) - xf @ wf).abs().max() < 1e-3
    assert set(st.prepare_s) == {P0, P1} and all(v >= 0 for v in st.prepare_s.values())
    local = LocalCluster(FX)
    local.run(fixed_program, (None, None, True), (None, FX.encode(wf), True))
    _, _, lst = local.run(fixed_program, (FX.encode(xf), None, False), (None, None, False))
    assert st.bytes_sent == lst.bytes_sent and st.rounds == lst.rounds and st.dealer_bytes > 0
    with pytest.raises(ValueError, match="'stream' or 'ahead'"):
        ProcessCluster(FX, offline="later")


def test_process_session_replays_its_offline_passes_from_the_second_request(seed):
    """Every request ships a fresh unpickled copy of the graph to the roles; the dealer and the
    parties still replay their recorded offline passes from the second request on (keyed by
    Graph.fingerprint), with the same outputs as the simulator and the same counted cost."""
    import secformer_compiler as sc

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8),
                                torch.nn.LayerNorm(8)).eval()
    x = torch.randn(3, 8)
    cm = sc.compile(model, (x,))
    with cm.session(processes=True, timeout=60.0) as sess:
        runs = [sess.infer(x + i) for i in range(3)]
    assert [r.stats.replayed for r in runs] == [{0: False, 1: False, 2: False}] + [{0: True, 1: True, 2: True}] * 2
    for i, r in enumerate(runs):
        assert (r.outputs[0] - cm.simulate(x + i)[0]).abs().max() < 5e-3
        assert r.stats.rounds == runs[0].stats.rounds and r.stats.bytes_sent == runs[0].stats.bytes_sent
        assert r.stats.dealer_bytes == runs[0].stats.dealer_bytes
    # each role says how it keeps its weight operands (a tiny model: full limbs, if limbs)
    from secformer_compiler.runtime.ring import KERNELS
    assert set(runs[-1].stats.operand_form) == {0, 1, 2}
    assert all(form in KERNELS + ("none",) for form in runs[-1].stats.operand_form.values())
    assert runs[-1].stats.operand_form[0] in KERNELS  # a party's linear layers chose one


def streaming_program(ctx, path, n):
    """The dealer streams n small chunks of corrections while P1 sleeps before using any:
    each role writes when it got there (CLOCK_MONOTONIC is shared by the processes)."""
    from secformer_compiler.runtime.correlations import RING

    if ctx.party == DEALER:
        ctx.corr.chunk_bytes = 1024  # one chunk per draw below
    if ctx.party == P1 and not ctx.recording:
        time.sleep(1.0)
        with open(os.path.join(path, "p1_woke"), "w") as fh:
            fh.write(repr(time.monotonic()))
    total = None
    for _ in range(n):  # a Beaver triple's product: P1's share of it comes from the dealer
        a, b, c = ctx.corr.correlated([((128,), RING), ((128,), RING)], lambda a, b: [a * b], [RING])
        total = c if total is None else total + c
    if ctx.party == DEALER:
        with open(os.path.join(path, "dealer_done"), "w") as fh:
            fh.write(repr(time.monotonic()))
    return total
    yield  # a generator, like every program


def test_dealer_streams_ahead_of_p1(tmp_path):
    """The dealer's chunks are posted, not waited for (DistTransport.send_blob(wait=False)):
    it makes all of them while P1 is busy, instead of one at a time as P1 asks; P1 still
    gets every byte (its shares of the products match the dealer's draws)."""
    with ProcessCluster(FX, timeout=30.0) as c:
        o0, o1, st = c.run(streaming_program, (str(tmp_path), 20))
    done = float((tmp_path / "dealer_done").read_text())
    woke = float((tmp_path / "p1_woke").read_text())
    assert done < woke, "the dealer waited for P1 between chunks"
    assert st.dealer_bytes >= 20 * 1024
