"""`secformer` commands and their bad inputs: clear message, non-zero exit, nothing left behind.

Most run in this process through typer's CliRunner (fast); `secformer run` runs as a
subprocess (it starts the three party processes itself)."""

from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

from secformer_compiler.cli import app
from secformer_compiler.party import ConfigError, free_ports, load_config, write_config

from conftest import SEQ, cli, make_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_compile_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    r = invoke("compile", tmp_path / "notes", "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert "is not a HuggingFace checkpoint: no config.json" in r.output
    r = invoke("compile", tmp_path / "nowhere", "-o", tmp_path / "out")
    assert r.exit_code == 1 and "no such folder" in r.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_compile_unsupported_ops_full_report(tmp_path):
    ck = make_checkpoint(tmp_path / "silu", "silu")
    r = invoke("compile", ck, "-o", tmp_path / "out", "--seq-len", SEQ, "--samples", 1)
    assert r.exit_code == 1, r.output
    assert "unsupported op(s) on secret values" in r.output
    assert "aten.silu.default has no MPC lowering (2x)" in r.output
    assert "encoder.layer.0.intermediate.intermediate_act_fn" in r.output
    assert "supported ATen ops on secret values: " in r.output and "aten.gelu.default" in r.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_compile_refuses_to_overwrite_and_checks_flags(artifact, ckpt_dir, tmp_path):
    r = invoke("compile", ckpt_dir, "-o", artifact)
    assert r.exit_code == 1 and "already exists (pass --force" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--preset", "fastest")
    assert r.exit_code == 1 and "unknown preset 'fastest'" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--calibrate", tmp_path / "missing.txt")
    assert r.exit_code == 1 and "no such calibration file" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--range-margin", "0.5")
    assert r.exit_code == 1 and "--range-margin must be >= 1" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--goldschmidt-target", "0")
    assert r.exit_code == 1 and "--goldschmidt-target must be a relative error in (0, 0.5)" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--override", "gelu")
    assert r.exit_code == 1 and "--override takes OP=METHOD" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--override", "relu=gelu.secformer")
    assert r.exit_code == 1 and "'relu' is not one of gelu, layernorm, softmax, tanh" in r.output
    r = invoke("compile", ckpt_dir, "-o", tmp_path / "o", "--override", "gelu=gelu.fast")
    assert r.exit_code == 1 and "'gelu.fast' is neither a preset" in r.output and "gelu.secformer_erf" in r.output
    assert not (tmp_path / "o").exists()


def test_compile_override_picks_the_erf_gelu(ckpt_dir, tmp_path):
    """--override gelu=gelu.secformer_erf compiles the paper's erf-series GeLU into the artifact."""
    from secformer_compiler.artifact import load_artifact

    out = tmp_path / "erf.sfa"
    r = invoke("compile", ckpt_dir, "-o", out, "--seq-len", SEQ, "--samples", 1,
               "--override", "gelu=gelu.secformer_erf", "--override", "softmax=secformer")
    assert r.exit_code == 0, r.output
    graph = load_artifact(out).graph
    gelus = [n for n in graph if n.op == "gelu"]
    assert gelus and all(n.attrs["method"] == "gelu.secformer_erf" and n.attrs["params"]["form"] == "erf"
                         for n in gelus)
    assert all(n.attrs["method"] == "softmax.2quad" for n in graph if n.op == "softmax")


def test_compile_fewer_rounds_is_kept_in_the_artifact(compiled, ckpt_dir, tmp_path):
    """--fewer-rounds folds the LayerNorms' gains into the linear layers after them and marks
    the LayerNorms (passes/rounds.py); the loaded artifact's 2PC run takes the fewer rounds its
    cost model says, for more bytes, with the same outputs: on Goldschmidt LayerNorms
    (--no-table-seeds) and on the default's table-seeded ones, whose tables' parameters and
    folds survive the artifact."""
    from secformer_compiler.artifact import load_artifact
    from secformer_compiler.cost import program_cost
    from secformer_compiler.demo import encode_texts

    default = compiled[1]
    assert all(n.attrs["params"]["table_bits"] for n in default.graph if n.op == "layernorm")
    arts = {}
    for name, flags in (("plain", ["--no-table-seeds"]),
                        ("fewer", ["--no-table-seeds", "--fewer-rounds", "--no-gelu-lookup"]),
                        ("fewer_tables", ["--fewer-rounds"])):
        out = tmp_path / f"{name}.sfa"
        r = invoke("compile", ckpt_dir, "-o", out, "--seq-len", SEQ, "--samples", 4, *flags)
        assert r.exit_code == 0, r.output
        arts[name] = load_artifact(out)
    art, plain = arts["fewer"], arts["plain"].compiled()
    assert not any(n.attrs["params"].get("table_bits") for n in art.graph if n.op in ("layernorm", "softmax"))
    assert all(n.attrs.get("commute") == 1 for n in art.graph if n.op == "layernorm")
    from secformer_compiler.passes.rounds import LN_FOLDS  # the folds' recipes survive too
    assert art.graph.meta[LN_FOLDS] and set(art.graph.meta[LN_FOLDS]) <= set(art.graph.weights)
    cm = art.compiled()
    fewer, base = program_cost(cm.graph), program_cost(plain.graph)
    # the embeddings' LayerNorm (into Q/K/V), and per layer the one into FFN1; the next
    # layer's Q/K/V, but not after the last layer (a graph output)
    assert fewer.rounds == base.rounds - 4 and fewer.bytes_per_party > base.bytes_per_party
    x = encode_texts(art, ["the man is playing guitar"])
    res = cm.run(x)
    assert res.stats.rounds == fewer.rounds and res.stats.bytes_sent[0] == fewer.bytes_per_party
    assert (res.outputs[0] - plain.run(x).outputs[0]).abs().max() < 0.01
    # with table seeds (the default) --fewer-rounds folds the gains and implies --gelu-lookup
    tables = arts["fewer_tables"].compiled()
    assert all(n.attrs["params"].get("lookup") == 1 for n in tables.graph if n.op == "gelu")
    assert sum(bool(n.meta.get("commute_into")) for n in tables.graph) == 2 * 2  # 2 layers
    cost = program_cost(tables.graph)
    assert cost.rounds < program_cost(default.graph).rounds
    res = tables.run(x)
    assert res.stats.rounds == cost.rounds and res.stats.bytes_sent[0] == cost.bytes_per_party
    assert (res.outputs[0] - default.run(x).outputs[0]).abs().max() < 0.01


def test_compile_gelu_lookup_is_kept_in_the_artifact(ckpt_dir, tmp_path):
    """--gelu-lookup marks the GeLUs (params lookup=1, kept in the artifact); where the bound
    allows, the loaded program's GeLUs take 2 rounds, and its 2PC run takes what the cost
    model says."""
    from secformer_compiler.artifact import load_artifact
    from secformer_compiler.cost import program_cost
    from secformer_compiler.demo import encode_texts
    from secformer_compiler.runtime.protocols.nonlinear import gelu_table_from_params

    out = tmp_path / "gelu.sfa"
    r = invoke("compile", ckpt_dir, "-o", out, "--seq-len", SEQ, "--samples", 4, "--gelu-lookup")
    assert r.exit_code == 0, r.output
    art = load_artifact(out)
    gelus = [n for n in art.graph if n.op == "gelu"]
    assert gelus and all(n.attrs["params"].get("lookup") == 1 for n in gelus)
    cm = art.compiled()
    cost = program_cost(cm.graph)
    tabled = [n for n in gelus if gelu_table_from_params(n.attrs["params"], 16)]
    assert tabled and all(cost.by_node[n.name].rounds == 2 for n in tabled)
    res = cm.run(encode_texts(art, ["the man is playing guitar"]))
    assert res.stats.rounds == cost.rounds and res.stats.bytes_sent[0] == cost.bytes_per_party


def test_calibration_file_formats(tmp_path):
    from secformer_compiler.cli import read_texts

    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\nit 's good \t1\nbad\t0\n")
    assert read_texts(tmp_path / "sst.tsv") == ["it 's good", "bad"]
    (tmp_path / "cola.tsv").write_text("gj04\t1\t\tthe sailors rode the breeze clear of the rocks .\n"
                                       "gj04\t0\t*\tthe weights made the rope stretch over the pulley .\n")
    assert read_texts(tmp_path / "cola.tsv")[0].startswith("the sailors")


def test_report_json_and_text(artifact):
    r = invoke("report", artifact, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    inf = rep["inference"]
    assert inf["rounds"] > 0 and inf["bytes_per_party"] > 0
    assert {"embeddings", "layer 0", "layer 1"} <= set(inf["by_layer"])
    assert sum(t["bytes"] for t in inf["by_layer"].values()) == inf["bytes_per_party"]
    assert any(k.startswith("gelu:") for k in inf["by_op"])
    assert inf["wan_s"] > inf["lan_s"] > 0
    assert all("declared_max_abs_err" in a for a in rep["approximations"].values())
    r = invoke("report", artifact)
    assert r.exit_code == 0 and "per layer" in r.output and "gelu.secformer" in r.output
    r = invoke("report", artifact / "manifest.json")
    assert r.exit_code == 1 and "not a folder" in r.output


@pytest.mark.parametrize("edit,want", [
    (lambda t: t.replace("[p1]", "[p7]"), "unknown key(s) ['p7']"),
    (lambda t: re.sub(r"(\[p0\]\nhost = \"127.0.0.1\"\nport = )\d+", r"\g<1>70000", t), "[p0] port must be"),
    (lambda t: t.replace("peer = 30", "peer = -1"), "[timeouts] peer must be a positive number"),
    (lambda t: t.replace("[dealer]\n", "[dealer]\nshares = \"x\"\n"), "unknown key(s) ['shares'] in [dealer]"),
    (lambda t: t.replace("[rendezvous]", "rendezvous"), "not valid TOML"),
    (lambda t: t.replace('artifact = "', 'artefact = "'), "unknown key(s) ['artefact']"),
    (lambda t: re.sub(r"(\[p1\]\nhost = \"127.0.0.1\"\nport = )\d+", r"\g<1>{P0}", t), "share an address"),
])
def test_malformed_party_config(tmp_path, edit, want):
    ports = free_ports(4)
    good = write_config(tmp_path / "good.toml", tmp_path / "a.sfa", tmp_path / "sh", ports,
                        timeouts={"peer": 30})
    load_config(good)
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(good.read_text()).replace("{P0}", str(ports[1])))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert want in str(e.value), str(e.value)
    r = invoke("party", "--role", "p0", "--config", bad)
    assert r.exit_code == 1 and want in r.output
    r = invoke("infer", "--config", bad, "--text", "hi")
    assert r.exit_code == 1 and want in r.output


def test_wrong_role_and_missing_config(tmp_path):
    r = invoke("party", "--role", "p2", "--config", tmp_path / "x.toml")
    assert r.exit_code == 2 and "p2" in r.output
    r = invoke("party", "--role", "p0", "--config", tmp_path / "x.toml")
    assert r.exit_code == 1 and "no such config file" in r.output


def test_infer_without_parties_and_too_long_text(artifact, tmp_path):
    from secformer_compiler.artifact import load_artifact, make_shares

    make_shares(load_artifact(artifact), tmp_path / "sh")
    cfg = write_config(tmp_path / "p.toml", artifact, tmp_path / "sh", free_ports(4), timeouts={"connect": 2})
    r = invoke("infer", "--config", cfg, "--text", "hello")
    assert r.exit_code == 1 and "cannot reach P0 at 127.0.0.1" in r.output and "connection refused" in r.output
    long = " ".join(["the cat"] * 20)
    r = invoke("run", artifact, "--text", "hello", "--text", long)
    assert r.exit_code == 1
    assert f"text 2 has 42 tokens, but the program was compiled for {SEQ} tokens: pass --truncate" in r.output


def test_run_classifier_locally(cls_artifact):
    """`secformer run`: three local parties, progress per layer, result beside float, costs."""
    texts = ["the movie was great", "terrible food", " ".join(["good"] * 30)]
    before = {d for d in os.listdir("/tmp") if d.startswith("secformer-run-")}
    r = cli("run", cls_artifact, "--truncate", *[a for t in texts for a in ("--text", t)], timeout=240)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("2PC:   ") == 3 and out.count("float: ") == 3
    pairs = re.findall(r"2PC:   (NEG|POS)  scores ([\d. ]+)\n   float: (NEG|POS)  scores ([\d. ]+)", out)
    assert len(pairs) == 3
    for a, sa, b, sb in pairs:
        assert a == b
        assert max(abs(float(x) - float(y)) for x, y in zip(sa.split(), sb.split())) < 0.02
    assert "cost (2 inferences, measured)" in out  # batch 2: three texts -> two runs
    assert "estimated online latency, LAN" in out and "WAN" in out and "dealer" in out
    for layer in ("layer 0", "layer 1", "embeddings"):
        assert layer in r.stderr
    assert {d for d in os.listdir("/tmp") if d.startswith("secformer-run-")} <= before  # removed


def _fake_party(port, reply):
    """A one-shot server on `port` answering the first frame with `reply` (bytes or a header)."""
    import socket
    import threading

    from secformer_compiler.party import recv_frame, send_frame

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        with conn:
            try:
                recv_frame(conn)
                conn.sendall(reply) if isinstance(reply, bytes) else send_frame(conn, reply)
            except Exception:  # noqa: BLE001
                pass
        srv.close()

    threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize("reply,want", [
    ({"type": "hello", "role": "p1", "artifact": "x"}, "is P1, but the config says P0: wrong role"),
    ({"type": "hello", "role": "p0", "artifact": "0" * 64}, "runs artifact 000000000000, but this client's is"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not a secformer message"),
])
def test_client_checks_who_answers(artifact, tmp_path, reply, want):
    from secformer_compiler.artifact import load_artifact, make_shares

    make_shares(load_artifact(artifact), tmp_path / "sh")
    ports = free_ports(4)
    cfg = write_config(tmp_path / "p.toml", artifact, tmp_path / "sh", ports, timeouts={"connect": 5})
    _fake_party(ports[1], reply)
    r = invoke("infer", "--config", cfg, "--text", "hello")
    assert r.exit_code == 1 and want in r.output, r.output
