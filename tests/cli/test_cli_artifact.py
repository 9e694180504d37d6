"""The artifact folder: ONNX round trip, verification errors, atomic writes, weight shares."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch

from secformer_compiler.artifact import (ArtifactError, atomic_dir, load_artifact, load_share, make_shares,
                                         save_artifact, sha256_file)
from secformer_compiler.onnx_export import DOMAIN, OPSET_VERSION

from conftest import SEQ


def _inputs(art, texts):
    from secformer_compiler.demo import encode_texts

    return encode_texts(art, texts)


def _copy(src, tmp_path):
    dst = tmp_path / "copy.sfa"
    shutil.copytree(src, dst)
    return dst


def _rehash(path, rel):
    m = json.loads((path / "manifest.json").read_text())
    m["files"][rel] = {"sha256": sha256_file(path / rel), "bytes": (path / rel).stat().st_size}
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip_text_and_simulation(compiled):
    """Loaded graph prints the same text and simulates to the same outputs as the compiled one."""
    path, cm = compiled
    art = load_artifact(path)
    x = _inputs(art, ["the man is playing guitar"])
    assert art.graph.to_text() == cm.graph.to_text()
    a, b = cm.simulate(x), art.compiled().simulate(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    artifact = path
    # the ONNX file: one node per IR node, custom domain and version, passes the checker
    model_proto = onnx.load(str(artifact / "program.onnx"))
    onnx.checker.check_model(model_proto)
    assert len(model_proto.graph.node) == len(art.graph)
    assert {n.domain for n in model_proto.graph.node} == {DOMAIN}
    assert {o.domain: o.version for o in model_proto.opset_import}[DOMAIN] == OPSET_VERSION
    m = art.manifest
    assert m["seq_len"] == SEQ and m["batch"] == 1 and m["task"] == "embedding"
    assert m["fixed_point"] == {"ring_bits": 64, "frac_bits": 16, "truncation": "exact"}
    assert {i["name"] for i in m["inputs"]} == {"input_ids", "attention_mask"}
    assert set(m["files"]) >= {"program.onnx", "weights.safetensors", "tokenizer/tokenizer.json"}
    assert any(a["method"] == "gelu.secformer" for a in m["approximations"].values())
    assert m["calibration"]["range_margin"] == 2.5 and m["calibration"]["texts"] == 4
    assert m["calibration"]["goldschmidt_target"] == 1e-4


def test_classifier_artifact_has_labels(cls_artifact):
    art = load_artifact(cls_artifact)
    assert art.task == "classification" and art.batch == 2
    assert art.manifest["labels"] == {"0": "NEG", "1": "POS"}
    assert art.manifest["outputs"][0]["shape"] == [2, 2]


@pytest.mark.parametrize("case", ["missing", "tampered", "truncated", "manifest_json", "version", "newer_opset",
                                  "corrupt_onnx", "unknown_public_fn", "not_a_folder"])
def test_load_errors_are_precise(artifact, tmp_path, case):
    p = _copy(artifact, tmp_path)
    if case == "missing":
        (p / "program.onnx").unlink()
        want = "missing file program.onnx"
    elif case == "tampered":
        w = bytearray((p / "weights.safetensors").read_bytes())
        w[-3] ^= 1
        (p / "weights.safetensors").write_bytes(bytes(w))
        want = "weights.safetensors does not match its sha256"
    elif case == "truncated":
        (p / "tokenizer" / "tokenizer.json").write_text("{}")
        want = "tokenizer/tokenizer.json has 2 bytes"
    elif case == "manifest_json":
        (p / "manifest.json").write_text("{ not json")
        want = "corrupt manifest.json: not valid JSON"
    elif case == "version":
        m = json.loads((p / "manifest.json").read_text())
        m["format_version"] = 99
        (p / "manifest.json").write_text(json.dumps(m))
        want = "artifact format version 99"
    elif case == "newer_opset":
        model = onnx.load(str(p / "program.onnx"))
        for o in model.opset_import:
            if o.domain == DOMAIN:
                o.version = OPSET_VERSION + 1
        onnx.save(model, str(p / "program.onnx"))
        _rehash(p, "program.onnx")
        want = "newer than this secformer reads"
    elif case == "corrupt_onnx":  # consistent hashes, garbage content
        (p / "program.onnx").write_bytes(b"\x08\x07garbage" * 10)
        _rehash(p, "program.onnx")
        want = "program.onnx"
    elif case == "unknown_public_fn":
        model = onnx.load(str(p / "program.onnx"))
        node = next(n for n in model.graph.node if n.op_type == "public_fn")
        attr = next(a for a in node.attribute if a.name == "fn")
        d = json.loads(attr.s)
        d["kind"] = "EvilFn"
        attr.s = json.dumps(d).encode()
        onnx.save(model, str(p / "program.onnx"))
        _rehash(p, "program.onnx")
        want = "unknown public function kind 'EvilFn'"
    else:
        p = p / "manifest.json"
        want = "not a folder"
    with pytest.raises(ArtifactError, match=None) as e:
        load_artifact(p)
    assert want in str(e.value), str(e.value)


def test_public_fn_targets_must_be_aten(artifact, tmp_path):
    """A tampered-but-rehashed program cannot make a party call arbitrary functions."""
    p = _copy(artifact, tmp_path)
    model = onnx.load(str(p / "program.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "public_fn")
    attr = next(a for a in node.attribute if a.name == "fn")
    d = json.loads(attr.s)
    d["steps"][0][1] = "os.system.default"
    attr.s = json.dumps(d).encode()
    onnx.save(model, str(p / "program.onnx"))
    _rehash(p, "program.onnx")
    with pytest.raises(ArtifactError, match="is not an ATen op"):
        load_artifact(p)


def test_atomic_write_leaves_nothing_on_failure(artifact, tmp_path):
    art = load_artifact(artifact)
    cm = art.compiled()

    class BadTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    out = tmp_path / "out.sfa"
    with pytest.raises(OSError, match="disk full"):
        save_artifact(cm, out, tokenizer=BadTokenizer(), seq_len=SEQ, batch=1)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError):
        with atomic_dir(artifact):
            pass


def test_shares_reconstruct_and_look_uniform(artifact, tmp_path):
    art = load_artifact(artifact)
    make_shares(art, tmp_path / "sh")
    s0 = load_share(tmp_path / "sh" / "p0.safetensors", "p0", art)
    s1 = load_share(tmp_path / "sh" / "p1.safetensors", "p1", art)
    for k, w in art.graph.weights.items():
        assert torch.equal(s0[k] + s1[k], art.fxp.encode(w.double()))
    # each share alone: its bits are fair coins (the weights themselves are small numbers
    # whose top bits are all equal), and two sharings of the same weights are unrelated
    for share in (s0, s1):
        flat = torch.cat([v.flatten() for v in share.values()])
        bits = torch.stack([(flat >> b) & 1 for b in (0, 20, 40, 62, 63)]).double().mean(1)
        assert ((bits - 0.5).abs() < 0.02).all(), bits
    make_shares(art, tmp_path / "sh2")
    again = load_share(tmp_path / "sh2" / "p0.safetensors", "p0", art)
    assert not any(torch.equal(again[k], s0[k]) for k in s0 if s0[k].numel() > 4)
    with pytest.raises(ArtifactError, match="holds P1's weight share but this party is P0"):
        load_share(tmp_path / "sh" / "p1.safetensors", "p0", art)
    with pytest.raises(FileExistsError):
        make_shares(art, tmp_path / "sh")


def test_share_of_another_artifact_is_refused(artifact, cls_artifact, tmp_path):
    art, other = load_artifact(artifact), load_artifact(cls_artifact)
    make_shares(other, tmp_path / "sh")
    with pytest.raises(ArtifactError, match="was made from artifact"):
        load_share(tmp_path / "sh" / "p0.safetensors", "p0", art)


def test_a_share_file_is_checked_from_its_header_and_read_when_used(artifact, tmp_path):
    """load_share checks every weight's shape and dtype from the header, reads each tensor
    when asked (a party holds one load group's shares at a time), and a file damaged after
    the check fails the read with an error naming it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    art = load_artifact(artifact)
    make_shares(art, tmp_path / "sh")
    path = tmp_path / "sh" / "p0.safetensors"
    share = load_share(path, "p0", art)
    meta = share.as_meta()
    assert set(meta) == set(art.weight_shapes()) == set(share)
    assert all(m.device.type == "meta" and tuple(m.shape) == art.weight_shapes()[k] for k, m in meta.items())
    name = next(iter(share))
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert torch.equal(share[name], tensors[name])
    # a share of the wrong shape is refused at the check, naming it
    bad = dict(tensors)
    bad[name] = bad[name].flatten()[:1].clone()
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=header)
    with pytest.raises(ArtifactError, match="wrong shape/dtype"):
        load_share(tmp_path / "bad.safetensors", "p0", art)
    # damaged after the check: the read fails cleanly
    path.write_bytes(path.read_bytes()[:64])
    with pytest.raises(ArtifactError, match="reading the share of"):
        share[name]
