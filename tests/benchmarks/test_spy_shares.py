"""benchmarks/spy_shares.py: a py-spy recording's online samples, per role and category."""

from __future__ import annotations


def test_spy_shares_files_online_samples_by_innermost_own_frame(tmp_path, bench):
    """py-spy raw lines: only a request's program counts (not prepare, not setup), each
    sample under the innermost frame in this repository's code, per process."""
    spy_shares = bench("spy_shares")
    head = 'process 1:"python e2e.py";process 7:"worker";_run_one (runtime/launch.py:9)'
    online = head + ";infer_program (secformer_compiler/mpc_interp.py:1)"
    raw = tmp_path / "spy.txt"
    raw.write_text("\n".join([
        online + ";ring_matmul (runtime/ring.py:276);matmul (torch/x.py:1) 30",
        online + ";and_share (runtime/protocols/trunc.py:148) 10",
        online + ";bytes (runtime/prg.py:1);PRG.bytes (runtime/prg.py:56) 5",
        online + ";x_cos_series (runtime/protocols/sine.py:262) 5",
        head + ";Role.prepare (runtime/engine.py:1);ring_matmul (runtime/ring.py:276) 50",
        head + ";Role.setup (runtime/engine.py:2) 7",
        "garbage line without a count",
    ]) + "\n")
    got = spy_shares.shares(str(raw))
    n, cats = got['process 7']
    assert n == 50 and list(got) == ['process 7']
    assert cats == {"ring matmul kernels": 30, "exact truncation": 10, "AES-CTR keystream": 5,
                    "GeLU's series (sine.py)": 5}
