"""Real deployment as subprocesses: compile -> share -> three `secformer party` -> `secformer infer`,
and the faults: a party that dies or stalls mid-run, a port in use, a wrong share file.
Every test checks that no party process is left behind."""

from __future__ import annotations

import json
import socket

import torch

from secformer_compiler.artifact import load_artifact, make_shares
from secformer_compiler.party import free_ports, write_config

from conftest import SEQ, cli

ULP = 2.0 ** -16


def _deploy(art_path, tmp_path, **timeouts):
    art = load_artifact(art_path)
    make_shares(art, tmp_path / "shares")
    t = {"startup": 120, "peer": 30, "connect": 5, "request": 120, **timeouts}
    return write_config(tmp_path / "parties.toml", art_path, tmp_path / "shares", free_ports(4), timeouts=t)


def test_compile_share_party_infer_equals_simulate(ckpt_dir, tmp_path, parties_factory):
    """The issue's end-to-end test, every step a `secformer` subprocess."""
    out, shares = tmp_path / "tiny.sfa", tmp_path / "shares"
    r = cli("compile", ckpt_dir, "-o", out, "--seq-len", SEQ, "--samples", 2)
    assert r.returncode == 0, r.stderr
    r = cli("share", out, "-o", shares)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in shares.iterdir()) == ["p0.safetensors", "p1.safetensors"]
    cfg = write_config(tmp_path / "parties.toml", out, shares, free_ports(4),
                       timeouts={"startup": 120, "peer": 30, "connect": 60, "request": 120})
    parties = parties_factory(cfg, tmp_path)
    parties.wait_ready()
    texts = ["the man is playing guitar", "hello world"]
    r = cli("infer", "--config", cfg, "--json", *[a for t in texts for a in ("--text", t)], timeout=240)
    assert r.returncode == 0, r.stderr + "\n".join(parties.log(x) for x in ("p0", "p1", "dealer"))
    got = torch.tensor(json.loads(r.stdout)["results"])
    # the reference: the artifact's program simulated in the clear (the parties' exact arithmetic)
    from secformer_compiler.demo import encode_texts

    art = load_artifact(out)
    cm = art.compiled()
    for i, t in enumerate(texts):
        want = cm.simulate(encode_texts(art, [t]))[0][0]
        # same fixed-point program; exact truncation's random 1-ulp carries, amplified by two
        # LayerNorms (measured: 10 ulps; tests/compiler/test_plugins.py allows 128)
        assert (got[i] - want).abs().max() <= 64 * ULP, (got[i] - want).abs().max()
    parties.stop()
    assert parties.wait_all(20) == {"p0": 0, "p1": 0, "dealer": 0}


def _infer_fails(cfg, parties, timeout=120):
    parties.wait_ready()
    r = cli("infer", "--config", cfg, "--text", "the cat is good", timeout=timeout)
    codes = parties.wait_all(30)
    logs = "\n".join(parties.log(x) for x in ("p0", "p1", "dealer"))
    assert r.returncode != 0, r.stdout
    assert all(c is not None for c in codes.values()), f"left running: {codes}\n{r.stderr}\n{logs}"
    return r.stderr, codes, logs


def test_party_dies_mid_run(artifact, tmp_path, parties_factory):
    cfg = _deploy(artifact, tmp_path, connect=60)
    parties = parties_factory(cfg, tmp_path, SECFORMER_FAULT="p1:die@5")
    err, codes, logs = _infer_fails(cfg, parties)
    assert "P1 died during the inference" in err, err + logs
    assert codes["p1"] == -9 and codes["p0"] == 1 and codes["dealer"] == 1, codes


def test_party_stalls_mid_run(artifact, tmp_path, parties_factory):
    cfg = _deploy(artifact, tmp_path, peer=3, connect=60)
    parties = parties_factory(cfg, tmp_path, SECFORMER_FAULT="p1:stall@5:6")
    err, codes, logs = _infer_fails(cfg, parties)
    assert "P1 at 127.0.0.1" in err and "stalled during the inference" in err, err + logs
    assert "timed out after 3 s waiting for P1" in err, err
    assert codes == {"p0": 1, "p1": 1, "dealer": 1}, f"{codes}\n{logs}"


def test_port_in_use_and_wrong_share_file(artifact, tmp_path, parties_factory):
    cfg = _deploy(artifact, tmp_path)
    from secformer_compiler.party import load_config

    c = load_config(cfg)
    with socket.socket() as s:  # someone else holds P0's client port
        s.bind(("127.0.0.1", c.parties["p0"].port))
        s.listen(1)
        parties = parties_factory(cfg, tmp_path, roles=("p0",))
        codes = parties.wait_all(60)
        assert codes == {"p0": 1}, parties.log("p0")
        assert "cannot listen for clients on 127.0.0.1" in parties.log("p0")
        assert "in use" in parties.log("p0")
    # someone else holds the rendezvous port that P0 must serve
    with socket.socket() as s:
        s.bind(("127.0.0.1", c.rendezvous_port))
        s.listen(1)
        r = cli("party", "--role", "p0", "--config", cfg, timeout=60)
        assert r.returncode == 1, r.stderr
        assert "could not serve the rendezvous on 127.0.0.1" in r.stderr and "port in use" in r.stderr, r.stderr
    # P1 given P0's share file: refused before joining anything
    text = cfg.read_text().replace("p1.safetensors", "p0.safetensors")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    r = cli("party", "--role", "p1", "--config", bad, timeout=60)
    assert r.returncode == 1 and "holds P0's weight share but this party is P1" in r.stderr, r.stderr
