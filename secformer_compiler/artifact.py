"""The compiled artifact: a folder that holds everything needed to run a compiled model.

    OUT/
      program.onnx          the MPC IR (custom ONNX domain `ai.secformer`, see onnx_export)
      weights.safetensors   the float weights (secret: the model owner keeps this file)
      tokenizer/            the tokenizer files (save_pretrained)
      manifest.json         format and package versions, preset, approximation parameters
                            per node, fixed-point configuration, input and output spec,
                            and the sha256 of every other file

An artifact is written to a temporary folder next to OUT and renamed into place, so a
failure (or Ctrl-C) never leaves half an artifact. `load_artifact` verifies the manifest's
format version, every file's size and sha256, the ONNX checker and the IR verifier, and
says precisely what is wrong. The artifact's identity (`Artifact.sha256`) is the sha256 of
manifest.json, which covers every file; share files and parties carry it so that roles
running different artifacts are caught before any protocol starts.

The hashes detect corruption and accidental mixing, not a malicious editor (who could
rewrite the manifest too): ship artifacts over an authenticated channel.

Share files (`secformer share`): the ring encoding of the weights split into two additive
shares, `p0.safetensors` holding W - R and `p1.safetensors` holding R, R uniform from the
AES-CTR PRG. Each file alone is uniformly distributed, independent of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shutil
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import torch

from .passes.fuse import FUSED_WEIGHTS
from .passes.rounds import LN_FOLDS

FORMAT = "secformer-artifact"
FORMAT_VERSION = 1
SHARES_FORMAT = "secformer-shares"
PROGRAM, WEIGHTS, MANIFEST, TOKENIZER = "program.onnx", "weights.safetensors", "manifest.json", "tokenizer"
ROLES = ("p0", "p1")


class ArtifactError(Exception):
    """An artifact or share file is missing, corrupt, tampered with, or of another version."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    from . import __version__

    return __version__


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out`; on success rename it to `out`.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and `out`
    is untouched. With `force`, an existing `out` is replaced (old one moved aside first).
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- writing -------------------------------------------------------------------------------

def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def approximation_table(graph: Any) -> dict[str, dict]:
    """Per approximated node: op, method, params, declared bounds, domain, module path."""
    specs = graph.meta.get("approximations", {})
    table = {}
    for n in graph:
        if n.op not in ("gelu", "layernorm", "softmax", "tanh"):
            continue
        spec = specs.get(n.name)
        table[n.name] = {
            "op": n.op, "method": n.attrs.get("method") or "exact",
            "params": _jsonable(dict(n.attrs.get("params") or {})),
            "declared_max_abs_err": getattr(spec, "declared_max_abs_err", None),
            "declared_max_rel_err": getattr(spec, "declared_max_rel_err", None),
            "domain": _jsonable(getattr(spec, "domain", None)),
            "replacement": bool(getattr(spec, "replacement", False)),
            "source": getattr(spec, "source", ""),
            "module_path": n.module_path,
        }
    return table


def io_spec(graph: Any) -> tuple[list[dict], list[dict]]:
    from .compiled import _vocab_of

    inputs = []
    for name in graph.inputs:
        n = graph[name]
        row = {"name": n.attrs["name"], "node": n.name, "kind": n.attrs["kind"], "dtype": n.dtype,
               "shape": list(n.shape), "secret": n.secret}
        if n.attrs["kind"] == "ids":
            row["vocab"] = _vocab_of(graph, n.name)
        inputs.append(row)
    outputs = [{"node": o, "dtype": graph[o].dtype, "shape": list(graph[o].shape)} for o in graph.outputs]
    return inputs, outputs


def save_artifact(cm: Any, out: str | Path, *, tokenizer: Any = None, task: str = "embedding",
                  seq_len: int | None = None, batch: int | None = None, labels: dict | None = None,
                  source: dict | None = None, calibration: dict | None = None,
                  force: bool = False) -> Path:
    """Write `cm` (a CompiledModel) as an artifact folder at `out`, atomically."""
    from safetensors.torch import save_file

    from .onnx_export import check, graph_to_onnx

    graph = cm.graph
    model = graph_to_onnx(graph, doc=f"secformer {task} program, preset {cm.preset}")
    check(model)
    inputs, outputs = io_spec(graph)
    with atomic_dir(out, force) as tmp:
        (tmp / PROGRAM).write_bytes(model.SerializeToString())
        weights = {k: v.detach().float().contiguous() for k, v in graph.weights.items()}
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                rel = p.relative_to(tmp).as_posix()
                files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "secformer_version": _version(),
            "torch_version": torch.__version__.split("+")[0],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "task": task, "preset": cm.preset, "batch": batch, "seq_len": seq_len,
            "fixed_point": {"ring_bits": 64, "frac_bits": cm.fxp.frac_bits, "truncation": cm.trunc},
            "program": {"file": PROGRAM, "onnx_domain": "ai.secformer", "opset_version": 1,
                        "nodes": len(graph), "weights": len(graph.weights),
                        "parameters": int(sum(v.numel() for v in graph.weights.values()))},
            "inputs": inputs, "outputs": outputs, "labels": labels,
            "approximations": approximation_table(graph),
            "calibration": calibration,
            "assumptions": list(graph.meta.get("assumptions", [])),
            "approximation_notes": list(graph.meta.get("approximation_notes", [])),
            FUSED_WEIGHTS: graph.meta.get(FUSED_WEIGHTS, {}),
            LN_FOLDS: graph.meta.get(LN_FOLDS, {}),
            "source": source or {},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return Path(out)


# --- reading -------------------------------------------------------------------------------

@dataclass
class Artifact:
    """A verified artifact: its manifest, the reconstructed IR graph and (maybe) the weights."""

    path: Path
    manifest: dict
    graph: Any
    sha256: str
    has_weights: bool
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def batch(self) -> int:
        return int(self.manifest["batch"])

    @property
    def seq_len(self) -> int:
        return int(self.manifest["seq_len"])

    @property
    def fxp(self) -> Any:
        from .runtime.ring import FixedPoint

        return FixedPoint(int(self.manifest["fixed_point"]["frac_bits"]))

    @property
    def trunc(self) -> str:
        return self.manifest["fixed_point"]["truncation"]

    @property
    def short(self) -> str:
        return self.sha256[:12]

    def compiled(self) -> Any:
        """A `CompiledModel` (simulate, float, run, report); needs the weights."""
        from .compiled import CompiledModel

        if not self.has_weights:
            raise ArtifactError(f"{self.path}: {WEIGHTS} is not here (a party's copy of the artifact?); "
                                "this command needs the model owner's artifact")
        return CompiledModel(self.graph, self.fxp, self.trunc, self.manifest["preset"])

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            d = self.path / TOKENIZER
            if not d.is_dir():
                raise ArtifactError(f"{self.path}: the artifact has no tokenizer (compiled from a module, "
                                    "not a checkpoint): pass token ids instead of text")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(d))
        return self._tokenizer

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n.attrs["name"]: tuple(n.shape) for n in self.graph if n.op == "weight"}


def _fail(path: Path, msg: str) -> ArtifactError:
    return ArtifactError(f"{path}: {msg}")


def read_manifest(path: str | Path) -> tuple[dict, str]:
    """(manifest, sha256 of manifest.json) after checking the format and its version."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact folder")
    if not path.is_dir():
        raise ArtifactError(f"{path}: not a folder (an artifact is the folder `secformer compile` writes)")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise _fail(path, f"missing file {MANIFEST}: not a secformer artifact, or an incomplete copy")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(path, f"corrupt {MANIFEST}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(path, f"{MANIFEST} is not a secformer artifact manifest (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        newer = isinstance(fv, int) and fv > FORMAT_VERSION
        raise _fail(path, f"artifact format version {fv!r} (written by secformer "
                          f"{manifest.get('secformer_version', '?')}) but this secformer {_version()} reads "
                          f"version {FORMAT_VERSION}: " +
                    ("upgrade secformer-compiler" if newer else "recompile the checkpoint with this version"))
    missing = [k for k in ("task", "preset", "fixed_point", "inputs", "outputs", "files") if k not in manifest]
    if missing:
        raise _fail(path, f"corrupt {MANIFEST}: missing keys {missing}")
    return manifest, hashlib.sha256(raw).hexdigest()


def verify_files(path: Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Every file in the manifest exists with its size and sha256 (files in `skip` may be absent)."""
    for rel, want in manifest["files"].items():
        p = path / rel
        if not p.is_file():
            if rel in skip:
                continue
            raise _fail(path, f"missing file {rel} (listed in {MANIFEST})")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise _fail(path, f"{rel} has {size} bytes but {MANIFEST} says {want['bytes']}: truncated, "
                              "corrupt or replaced")
        got = sha256_file(p)
        if got != want["sha256"]:
            raise _fail(path, f"{rel} does not match its sha256 in {MANIFEST} (got {got[:16]}..., expected "
                              f"{want['sha256'][:16]}...): the file was modified or corrupted after compilation")


def load_artifact(path: str | Path, *, weights: bool = True) -> Artifact:
    """Verify and load an artifact. weights=False: the weights file may be absent (a party's copy)."""
    import onnx
    from google.protobuf.message import DecodeError

    from .onnx_export import ProgramFormatError, check, onnx_to_graph

    path = Path(path)
    manifest, digest = read_manifest(path)
    verify_files(path, manifest, skip=() if weights else (WEIGHTS,))
    try:
        model = onnx.load_from_string((path / PROGRAM).read_bytes())
    except (DecodeError, ValueError) as e:
        raise _fail(path, f"corrupt {PROGRAM}: cannot parse ({e})") from e
    tensors: dict[str, torch.Tensor] = {}
    has_weights = (path / WEIGHTS).is_file()
    if weights and has_weights:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path / WEIGHTS))
        except (SafetensorError, OSError) as e:
            raise _fail(path, f"corrupt {WEIGHTS}: {e}") from e
    try:
        check(model)
        graph = onnx_to_graph(model, tensors)
    except ProgramFormatError as e:
        raise _fail(path, str(e)) from e
    need = {n.attrs["name"]: tuple(n.shape) for n in graph if n.op == "weight"}
    if weights:
        absent = sorted(set(need) - set(tensors))
        if absent:
            raise _fail(path, f"{WEIGHTS} lacks {len(absent)} weight(s) the program uses: {absent[:5]}")
    else:  # verify against the weights' shapes only
        graph.weights = {k: torch.empty(s, device="meta") for k, s in need.items()}
    try:
        graph.verify("mpc")
    except Exception as e:  # VerifyError lists every problem
        raise _fail(path, f"the program in {PROGRAM} does not verify: {e}") from e
    if not weights:
        graph.weights = {}
    graph.meta["approximations"] = _specs(manifest.get("approximations") or {})
    graph.meta[FUSED_WEIGHTS] = manifest.get(FUSED_WEIGHTS) or {}
    graph.meta[LN_FOLDS] = manifest.get(LN_FOLDS) or {}
    return Artifact(path, manifest, graph, digest, has_weights and weights)


def _specs(table: dict) -> dict[str, Any]:
    """Approximation specs by node (registered spec with the stored params, else a record)."""
    out = {}
    for node, row in table.items():
        spec = None
        try:
            from .approx import get_approx

            base = get_approx(row["method"])
            spec = dataclasses.replace(base, params=row["params"], domain=tuple(row["domain"]),
                                       declared_max_abs_err=row["declared_max_abs_err"],
                                       declared_max_rel_err=row["declared_max_rel_err"])
        except Exception:  # noqa: BLE001 - exact methods and unknown plugins: keep the record
            spec = types.SimpleNamespace(name=row["method"], **{k: v for k, v in row.items() if k != "method"})
        out[node] = spec
    return out


# --- shares ----------------------------------------------------------------------------------

def make_shares(art: Artifact, out: str | Path, force: bool = False) -> Path:
    """Write p0.safetensors (W - R) and p1.safetensors (R), R uniform (AES-CTR PRG)."""
    from safetensors.torch import save_file

    from .compiled import split_shares

    if not art.has_weights:
        raise ArtifactError(f"{art.path}: {WEIGHTS} is not here: only the model owner's artifact can be shared")
    fxp = art.fxp
    ring = {k: fxp.encode(v.detach().double()) for k, v in art.graph.weights.items()}
    s0, s1 = split_shares(ring)
    with atomic_dir(out, force) as tmp:
        for role, share in zip(ROLES, (s0, s1)):
            meta = {"format": SHARES_FORMAT, "format_version": str(FORMAT_VERSION), "role": role,
                    "artifact_sha256": art.sha256, "frac_bits": str(fxp.frac_bits), "ring_bits": "64"}
            save_file({k: v.contiguous() for k, v in share.items()}, str(tmp / f"{role}.safetensors"),
                      metadata=meta)
    return Path(out)


def load_share(path: str | Path, role: str, art: Artifact) -> "ShareFile":
    """One party's weight share, checked against its role and the artifact (its header:
    every weight present with the artifact's shape, as int64). The tensors are read when
    used (`ShareFile`): a party loading BERT-large holds one load group's shares at a time,
    not all 2.4 GB of them beside the operands it builds."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such share file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            found = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: corrupt share file: {e}") from e
    if meta.get("format") != SHARES_FORMAT:
        raise ArtifactError(f"{path}: not a secformer share file (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: share format version {meta.get('format_version')!r}, this secformer "
                            f"reads {FORMAT_VERSION}")
    if meta.get("role") != role:
        raise ArtifactError(f"{path} holds {str(meta.get('role')).upper()}'s weight share but this party is "
                            f"{role.upper()}: wrong role or wrong share file")
    if meta.get("artifact_sha256") != art.sha256:
        raise ArtifactError(f"{path} was made from artifact {str(meta.get('artifact_sha256'))[:12]} but the "
                            f"artifact at {art.path} is {art.short}: re-run `secformer share`")
    shapes = art.weight_shapes()
    bad = [k for k, s in shapes.items() if found.get(k) != (s, "I64")]
    if bad:
        raise ArtifactError(f"{path}: {len(bad)} weight share(s) missing or of the wrong shape/dtype: {bad[:5]}")
    return ShareFile(path, shapes)


class ShareFile(Mapping):
    """A checked share file (`load_share`) whose tensors are read on access, each read a
    fresh int64 tensor. A file changed or damaged after the check fails the read with an
    ArtifactError naming it."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
        self.path, self._shapes = path, dict(shapes)

    def as_meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors of the shares' shapes, read from nothing (engine.meta_like: the dealer's
        and a party's offline passes see shapes only)."""
        return {k: torch.empty(s, dtype=torch.int64, device="meta") for k, s in self._shapes.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        if name not in self._shapes:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), "pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ArtifactError(f"{self.path}: reading the share of {name} failed: {e}") from e

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)
