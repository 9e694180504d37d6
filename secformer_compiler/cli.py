"""The `secformer` command line: compile, share, party, infer, run, demo, report.

    secformer compile CHECKPOINT_DIR -o OUT     checkpoint -> artifact folder
    secformer share OUT -o SHARES               weights -> p0/p1 share files
    secformer party --role p0 --config parties.toml   one computing role (any host)
    secformer infer --config parties.toml --text ...  the client
    secformer run OUT --text ...                all roles on this machine, with costs
    secformer demo                              private sentence similarity, all-MiniLM-L6-v2
    secformer report OUT [--json]               static cost per layer / op, approximations
    secformer finetune TASK --data-dir GLUE -o T   a GLUE teacher from all-MiniLM-L6-v2
    secformer distill T --task TASK --data-dir GLUE -o S   a preset's student (MPCFormer-style)
    secformer eval MODEL --task TASK --mode 2pc --data-dir GLUE   the GLUE metric, any mode

Every failure the user can cause (bad folder, bad config, port in use, text too long, a
party that dies) prints one `error:` paragraph and exits non-zero; nothing half-written
is left behind. Heavy imports (torch, transformers) happen inside the commands, so
`--help` is instant.
"""

from __future__ import annotations

import json
import signal
import time
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile HuggingFace Transformers for private two-party inference (SecFormer).")


class Task(str, Enum):
    auto = "auto"
    embedding = "embedding"
    classification = "classification"


class RoleName(str, Enum):
    p0 = "p0"
    p1 = "p1"
    dealer = "dealer"


class CheckpointError(Exception):
    """The checkpoint folder cannot be loaded."""


class UserError(Exception):
    """Anything else the user can fix (bad flag combination, missing file)."""


BUILTIN_SENTENCES = [
    "A man is playing a guitar on the stage.",
    "The new movie is awesome, I loved every minute of it.",
    "Stock markets fell sharply after the announcement.",
    "A woman is slicing an onion in the kitchen.",
    "This was the worst service I have ever had.",
    "Children are playing football in the park.",
    "The weather will be sunny and warm tomorrow.",
    "Scientists discovered a new species of frog in the rainforest.",
    "I am not sure whether the train leaves at noon.",
    "Please send me the report by Friday.",
    "The cat sleeps on the sofa all afternoon.",
    "An old bridge collapsed during the storm last night.",
    "She plays the piano beautifully.",
    "How do I reset my password?",
    "The restaurant was quiet, cheap and surprisingly good.",
    "Two dogs are running through the snow.",
]


def _err(msg: str, code: int = 1) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _note(msg: str) -> None:
    typer.echo(msg, err=True)


def guarded(fn: Callable) -> Callable:
    """Turn the errors users cause into `error: ...` and a non-zero exit (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .artifact import ArtifactError
        from .errors import CompileError
        from .party import PartyError

        known: tuple = (ArtifactError, CompileError, PartyError, CheckpointError, UserError, FileExistsError)
        try:
            from .runtime.dist import DistInitError
            from .runtime.transport import PeerError

            known += (DistInitError, PeerError)
        except ImportError:  # pragma: no cover
            pass
        try:
            return fn(*args, **kwargs)
        except known as e:
            _err(str(e))
        except KeyboardInterrupt:
            _err("interrupted", 130)

    return wrapper


# --- checkpoints and texts -------------------------------------------------------------------

def load_checkpoint(path: Path, task: str) -> tuple[Any, Any, str, dict | None, dict]:
    """(module to compile, tokenizer, task, labels, source info) from a HF checkpoint folder."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a checkpoint is a folder written by save_pretrained)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a HuggingFace checkpoint: no config.json (a checkpoint folder holds "
                              "config.json and model.safetensors, as written by save_pretrained)")
    weights = [p for p in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                           "pytorch_model.bin.index.json") if (path / p).is_file()]
    if not weights:
        raise CheckpointError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)")
    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()  # load reports and progress bars are noise here
    transformers.utils.logging.disable_progress_bar()

    from .models import SentenceEncoder

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise CheckpointError(f"{path}/config.json cannot be read as a transformers config: {e}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if task == "auto":
        task = "classification" if any("ForSequenceClassification" in a for a in archs) else "embedding"
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} has no usable tokenizer (tokenizer.json / vocab.txt ...): "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    labels = None
    try:
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
            labels = {str(k): v for k, v in (model.config.id2label or {}).items()}
        else:
            try:
                enc = AutoModel.from_pretrained(str(path), add_pooling_layer=False)
            except (TypeError, ValueError):
                enc = AutoModel.from_pretrained(str(path))
            model = SentenceEncoder(enc.eval()).eval()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: transformers could not load the model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from e
    model.requires_grad_(False)  # inference only (a global set_grad_enabled would leak into callers)
    source = {"checkpoint": str(path.resolve()), "model_type": getattr(config, "model_type", None),
              "architectures": archs}
    return model, tok, task, labels, source


def read_texts(path: Path) -> list[str]:
    """Texts for calibration: one per line, or a (GLUE) TSV's sentence column."""
    if not path.is_file():
        raise UserError(f"{path}: no such calibration file")
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    if path.suffix.lower() == ".tsv" and lines:
        head = lines[0].split("\t")
        names = ["sentence", "sentence1", "#1 String", "question", "question1", "text"]
        col = next((head.index(n) for n in names if n in head), None)
        rows = [ln.split("\t") for ln in (lines[1:] if col is not None else lines)]
        if col is None:  # no header (CoLA): the column with the longest texts
            width = max(len(r) for r in rows)
            col = max(range(width), key=lambda c: sum(len(r[c]) for r in rows if c < len(r)))
        lines = [r[col].strip() for r in rows if col < len(r) and r[col].strip()]
    if not lines:
        raise UserError(f"{path}: no texts in the calibration file")
    return lines


def tokenize(tok: Any, texts: list[str], seq_len: int, names: list[str]) -> dict:
    """input_ids / attention_mask (and what else the program takes), padded to seq_len, truncated."""
    enc = tok(texts, padding="max_length", max_length=seq_len, truncation=True, return_tensors="pt")
    return {n: enc[n] for n in names}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """["gelu=gelu.secformer_erf", ...] -> {"gelu": "gelu.secformer_erf"}; each OP must be an
    approximated op and each METHOD a preset name or an approximation of that op."""
    from .errors import CompileError
    from .passes.approximate import check_override

    out: dict[str, str] = {}
    for item in items:
        op, sep, method = item.partition("=")
        op, method = op.strip(), method.strip()
        if not sep or not op or not method:
            raise UserError(f"--override takes OP=METHOD (e.g. gelu=gelu.secformer_erf), got {item!r}")
        try:
            check_override(op, method)
        except CompileError as e:
            raise UserError(f"--override {item!r}: {e}") from None
        out[op] = method
    return out


def compile_checkpoint(ckpt: Path, out: Path, *, task: str = "auto", preset: str = "secformer", seq_len: int = 128,
                       batch: int = 1, calibrate: Path | None = None, samples: int = 16, frac_bits: int = 16,
                       trunc: str = "exact", force: bool = False, range_margin: float | None = None,
                       goldschmidt_target: float | None = None, overrides: list[str] | None = None,
                       fewer_rounds: bool = False, table_seeds: bool = True, gelu_lookup: bool | None = None,
                       log: Callable[[str], None] = _note) -> Any:
    """Checkpoint -> compiled program -> artifact folder at `out` (written atomically).

    overrides: "OP=METHOD" strings (e.g. "gelu=gelu.secformer_erf", "softmax=puma"): per-op
    approximations over the preset's, checked before the checkpoint is loaded."""
    from . import compile as sf_compile
    from .artifact import save_artifact

    _check_preset(preset)
    per_op = parse_overrides(overrides or [])
    if seq_len < 2 or batch < 1:
        raise UserError("--seq-len must be >= 2 and --batch >= 1")
    from .calibrate import resolve_margin
    try:
        margin = resolve_margin(range_margin, "--range-margin")
    except ValueError as e:
        raise UserError(str(e)) from None
    if goldschmidt_target is not None and not 0 < goldschmidt_target < 0.5:
        raise UserError(f"--goldschmidt-target must be a relative error in (0, 0.5), got {goldschmidt_target}")
    if Path(out).exists() and not force:
        raise UserError(f"{out} already exists (pass --force to replace it)")
    t0 = time.perf_counter()
    log(f"loading checkpoint {ckpt}")
    model, tok, task, labels, source = load_checkpoint(ckpt, task)
    texts = read_texts(calibrate) if calibrate else list(BUILTIN_SENTENCES)
    texts = texts[:max(samples, 1)]
    while len(texts) % batch:
        texts.append(texts[len(texts) % max(len(texts), 1)])
    names = ["input_ids", "attention_mask"]
    chunks = [tokenize(tok, texts[i:i + batch], seq_len, names) for i in range(0, len(texts), batch)]
    log(f"compiling ({task}, preset {preset}, batch {batch} x seq {seq_len}; calibrating on {len(texts)} "
        f"text(s) from {calibrate or 'built-in sentences'})")
    cm = sf_compile(model, chunks[0], preset=preset, calibration=chunks, frac_bits=frac_bits, trunc=trunc,
                    range_margin=margin, goldschmidt_target=goldschmidt_target, overrides=per_op or None,
                    fewer_rounds=fewer_rounds, table_seeds=table_seeds, gelu_lookup=gelu_lookup)
    calib = {"source": str(calibrate) if calibrate else "built-in sentences", "texts": len(texts),
             "range_margin": margin, "goldschmidt_target": cm.graph.meta.get("goldschmidt_target")}
    save_artifact(cm, out, tokenizer=tok, task=task, seq_len=seq_len, batch=batch, labels=labels,
                  source=source, calibration=calib, force=force)
    n_params = sum(v.numel() for v in cm.graph.weights.values())
    log(f"wrote {out}: {len(cm.graph)} IR nodes, {n_params / 1e6:.2f} M weights, "
        f"{time.perf_counter() - t0:.1f} s")
    return cm


# --- commands ----------------------------------------------------------------------------------

@app.command("compile")
@guarded
def compile_cmd(
    checkpoint: Path = typer.Argument(..., help="HuggingFace checkpoint folder (save_pretrained)."),
    out: Path = typer.Option(..., "-o", "--out", help="Artifact folder to write."),
    preset: str = typer.Option("secformer", help="Approximation preset: secformer, mpcformer, puma, crypten, "
                                                 "secformer-exact-softmax, exact."),
    calibrate: Optional[Path] = typer.Option(None, help="Calibration texts: one per line, or a GLUE TSV."),
    samples: int = typer.Option(16, help="How many calibration texts to use."),
    seq_len: int = typer.Option(128, help="Static sequence length of the program."),
    batch: int = typer.Option(1, help="Static batch size of the program."),
    task: Task = typer.Option(Task.auto, help="embedding (mean-pooled encoder), classification (logits), "
                                              "or auto (from the checkpoint's architecture)."),
    frac_bits: int = typer.Option(16, help="Fixed-point fractional bits."),
    trunc: str = typer.Option("exact", help="Truncation after products: exact or local."),
    range_margin: Optional[float] = typer.Option(None, help="Goldschmidt must converge up to this factor times "
                                                           "the largest calibrated value (default 2.5)."),
    goldschmidt_target: Optional[float] = typer.Option(None, help="Relative error each calibrated Goldschmidt "
                                                                  "step must meet (default 1e-4; 1e-3 saves about a "
                                                                  "round per LayerNorm, with less margin off-range)."),
    override: Optional[list[str]] = typer.Option(None, help="Per-op approximation over the preset's, OP=METHOD; "
                                                            "repeatable. E.g. gelu=gelu.secformer_erf (the "
                                                            "paper's erf series), softmax=puma."),
    fewer_rounds: bool = typer.Option(False, help="Trade bytes and CPU for rounds: LayerNorms fold their gain into "
                                                  "the linear layers after them and compute those (one round fewer "
                                                  "each), and GeLU's tests by lookup unless --no-gelu-lookup. For "
                                                  "high-latency links (README, Fewer rounds)."),
    table_seeds: bool = typer.Option(True, help="Let 2Quad's division and LayerNorm's 1/sqrt start from a "
                                                "dealer's lookup table and one Newton step where that meets the "
                                                "target (fewer rounds, more dealer traffic); --no-table-seeds "
                                                "keeps Goldschmidt."),
    gelu_lookup: Optional[bool] = typer.Option(None, "--gelu-lookup/--no-gelu-lookup",
                                               help="GeLU's segment tests by one table lookup where its bound "
                                                    "allows (2 rounds instead of 4, more bytes and dealer "
                                                    "traffic): for high-latency links. Default: as --fewer-rounds."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Compile a checkpoint into an artifact folder (program.onnx, weights, tokenizer, manifest)."""
    compile_checkpoint(checkpoint, out, task=task.value, preset=preset, seq_len=seq_len, batch=batch,
                       calibrate=calibrate, samples=samples, frac_bits=frac_bits, trunc=trunc, force=force,
                       range_margin=range_margin, goldschmidt_target=goldschmidt_target, overrides=override,
                       fewer_rounds=fewer_rounds, table_seeds=table_seeds, gelu_lookup=gelu_lookup)


@app.command()
@guarded
def share(
    artifact: Path = typer.Argument(..., help="Artifact folder from `secformer compile`."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for p0.safetensors and p1.safetensors."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Split the weights into two additive shares, one file per computing party."""
    from .artifact import load_artifact, make_shares

    art = load_artifact(artifact)
    make_shares(art, out, force=force)
    _note(f"wrote {out}/p0.safetensors and {out}/p1.safetensors (artifact {art.short}); give each party "
          "only its own file")


@app.command()
@guarded
def party(
    role: RoleName = typer.Option(..., help="Which role this process plays."),
    config: Path = typer.Option(..., help="parties.toml"),
) -> None:
    """Run one role (P0, P1 or the dealer) until stopped."""
    from .party import run_party

    raise typer.Exit(run_party(config, role.value))


@app.command()
@guarded
def infer(
    config: Path = typer.Option(..., help="parties.toml"),
    text: list[str] = typer.Option(..., help="Input text (repeat for several)."),
    truncate: bool = typer.Option(False, help="Cut texts longer than the compiled sequence length."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """The client: secret-share the input to P0 and P1, reconstruct and print the output."""
    from .artifact import load_artifact
    from .demo import format_result, run_texts
    from .party import Client, load_config

    cfg = load_config(config)
    art = load_artifact(cfg.artifact, weights=False)
    with Client(cfg, art) as client:
        client.connect()
        rows, stats = run_texts(client, art, text, truncate=truncate)
    if as_json:
        typer.echo(json.dumps({"task": art.task, "results": [r.tolist() for r in rows], "stats": stats}))
    else:
        typer.echo(format_result(art, text, rows))


@app.command()
@guarded
def run(
    artifact: Path = typer.Argument(..., help="Artifact folder from `secformer compile`."),
    text: list[str] = typer.Option(..., help="Input text (repeat for several)."),
    truncate: bool = typer.Option(False, help="Cut texts longer than the compiled sequence length."),
    threads: int = typer.Option(1, help="torch threads per party process."),
    timeout: float = typer.Option(120.0, help="Seconds a party waits for a peer's message."),
) -> None:
    """P0, P1 and the dealer as local processes: the result beside the float model's, and the cost."""
    from .demo import run_command

    run_command(artifact, text, truncate=truncate, threads=threads, timeout=timeout)


@app.command()
@guarded
def demo(
    threads: int = typer.Option(1, help="torch threads per party process."),
    preset: str = typer.Option("secformer-exact-softmax", help="Approximation preset (secformer's 2Quad "
                                                               "needs a distilled model; MiniLM is not)."),
) -> None:
    """Private sentence similarity with all-MiniLM-L6-v2 under 2PC, beside the float model."""
    from .demo import run_demo

    run_demo(threads=threads, preset=preset)


@app.command()
@guarded
def report(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Static cost per layer and per op type, approximation parameters and bounds."""
    from .demo import cost_report, format_report

    rep = cost_report(artifact)
    typer.echo(json.dumps(rep, indent=1) if as_json else format_report(rep))


# --- accuracy: fine-tune, distill, evaluate (secformer_compiler.distill) ------------------------


def _glue_dir(data_dir: Path, task: str) -> None:
    from . import glue

    try:
        spec = glue.task_spec(task)
    except (KeyError, ValueError) as e:
        raise UserError(str(e)) from e
    if not (data_dir / spec.name).is_dir():
        raise UserError(f"{data_dir / spec.name}: no such folder; --data-dir is the GLUE folder holding "
                        f"<TASK>/train.tsv and <TASK>/dev.tsv")


def _check_preset(preset: str) -> None:
    from .passes.approximate import PRESETS

    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")


def _check_checkpoint(path: Path, made_by: str) -> None:
    from .distill import META_FILE

    if not (path / META_FILE).is_file():
        raise UserError(f"{path}: not a checkpoint from {made_by} (no {META_FILE})")


def _log_line(msg: str) -> None:
    typer.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=True)


@app.command()
@guarded
def finetune(
    task: str = typer.Argument(..., help="GLUE task: SST-2, MRPC, RTE, STS-B, CoLA, QNLI."),
    data_dir: Path = typer.Option(..., help="GLUE folder: <dir>/<TASK>/{train,dev}.tsv."),
    out: Path = typer.Option(..., "-o", "--out", help="Checkpoint folder to write."),
    max_len: int = typer.Option(64, help="Tokens per example (longer ones are cut)."),
    train_subsample: Optional[int] = typer.Option(4000, help="Seeded subsample of train.tsv (0: all rows)."),
    epochs: int = typer.Option(1),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-4),
    device: str = typer.Option("cpu", help="torch device to train on (e.g. cuda)."),
    threads: int = typer.Option(1, help="torch threads."),
    model_path: Optional[Path] = typer.Option(None, help="Base encoder checkpoint (default all-MiniLM-L6-v2)."),
) -> None:
    """Fine-tune a teacher: all-MiniLM-L6-v2 with a mean-pooling head on a GLUE task."""
    from . import distill as D

    _glue_dir(data_dir, task)
    path = D.finetune(task, data_dir, out, max_len=max_len, train_subsample=train_subsample or None, epochs=epochs,
                      batch_size=batch_size, lr=lr, device=device, threads=threads, model_path=model_path,
                      log=_log_line)
    typer.echo(f"teacher saved to {path}")


@app.command("distill")
@guarded
def distill_cmd(
    teacher: Path = typer.Argument(..., help="Teacher checkpoint from `secformer finetune`."),
    task: str = typer.Option(..., help="GLUE task the teacher was trained on."),
    data_dir: Path = typer.Option(..., help="GLUE folder: <dir>/<TASK>/{train,dev}.tsv."),
    out: Path = typer.Option(..., "-o", "--out", help="Student checkpoint folder to write."),
    preset: str = typer.Option("secformer", help="Preset whose approximations the student learns."),
    train_subsample: Optional[int] = typer.Option(2000, help="Seeded subsample of train.tsv (0: all rows)."),
    layer_epochs: float = typer.Option(1.0, help="Stage 1: attention and hidden-state MSE."),
    pred_epochs: float = typer.Option(1.0, help="Stage 2: soft cross-entropy on the logits."),
    batch_size: int = typer.Option(16),
    lr: float = typer.Option(5e-5),
    max_len: int = typer.Option(64),
    device: str = typer.Option("cpu", help="torch device to train on (e.g. cuda)."),
    threads: int = typer.Option(1, help="torch threads."),
) -> None:
    """Distill a student whose nonlinearities are PRESET's approximations (MPCFormer-style)."""
    from . import distill as D

    _glue_dir(data_dir, task)
    _check_preset(preset)
    _check_checkpoint(teacher, "`secformer finetune`")
    path = D.distill(teacher, task, preset, data_dir=data_dir, out_dir=out, max_len=max_len,
                     train_subsample=train_subsample or None, layer_epochs=layer_epochs, pred_epochs=pred_epochs,
                     batch_size=batch_size, lr=lr, device=device, threads=threads, log=_log_line)
    typer.echo(f"student saved to {path}")


class Mode(str, Enum):
    float = "float"
    float_approx = "float_approx"
    simulate = "simulate"
    two_pc = "2pc"


@app.command("eval")
@guarded
def eval_cmd(
    model: Path = typer.Argument(..., help="Checkpoint from `secformer finetune` or `secformer distill`."),
    task: str = typer.Option(..., help="GLUE task."),
    data_dir: Path = typer.Option(..., help="GLUE folder: <dir>/<TASK>/dev.tsv."),
    preset: str = typer.Option("secformer", help="Preset to compile with (ignored in float mode)."),
    mode: Mode = typer.Option(Mode.float, help="float | float_approx | simulate | 2pc."),
    n: Optional[int] = typer.Option(None, "-n", help="First n dev rows (default all)."),
    batch_size: int = typer.Option(16, help="Static batch of the compiled program."),
    max_len: int = typer.Option(64),
    as_json: bool = typer.Option(False, "--json", help="Print the whole record as JSON."),
    threads: int = typer.Option(1, help="torch threads."),
) -> None:
    """The GLUE metric of a checkpoint: float, the approximated program, the simulator or real 2PC."""
    from . import distill as D

    _glue_dir(data_dir, task)
    if mode != Mode.float:
        _check_preset(preset)
    _check_checkpoint(model, "`secformer finetune` or `secformer distill`")
    rec = D.evaluate(model, task, preset, mode.value, n, data_dir=data_dir, batch_size=batch_size, max_len=max_len,
                     threads=threads, log=_log_line)
    if as_json:
        typer.echo(json.dumps(rec, indent=1))
        return
    line = f"{rec['task']} {rec['preset']} {rec['mode']}: {rec['metric']} = {rec['value']:.2f} on {rec['n_examples']} rows"
    if rec.get("disagreements") is not None:
        line += f"; 2PC predictions differing from the simulator's: {rec['disagreements']}"
    typer.echo(line)


def main() -> None:
    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C (temporary folders, parties)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    app()


if __name__ == "__main__":
    main()
