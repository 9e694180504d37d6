"""Fine-tune teachers and distill students on an accelerator, then bring them back compactly.

Fine-tuning all-MiniLM-L6-v2 and distilling 2Quad students on this 2-core CPU takes tens of
minutes per model on a few thousand rows; on a GPU the whole SST-2 training set fits in a
minute. This script does the training part of `benchmarks/accuracy.py` on `--device cuda`
(any torch device works; `--device cpu` is how it is tested) and measures each model in the
float modes there (`float`: the teacher; `float_approx`: each preset's student as the
approximated program in float64). Simulation and 2PC run here, on the CPU runtime, from the
unpacked checkpoints (`accuracy.py --steps simulate,2pc`).

    python benchmarks/train_gpu.py train --data-dir GLUE --model-path MINILM --out OUT \\
        --device cuda --tasks SST-2,MRPC --deadline-s 480
    python benchmarks/train_gpu.py unpack OUT --checkpoints benchmarks/checkpoints

`train` writes OUT/records.json (accuracy.json records) and, for the tasks in `--pack`, each
checkpoint as float16 safetensors pieces without the word-embedding table: the word
embeddings stay frozen at the base model's values (float16-rounded, here and there), so a
checkpoint is ~21 MB instead of 87 MB. `unpack` rebuilds full checkpoint folders from them
and the base model, and merges the records into benchmarks/results/accuracy.json.

Work is ordered (teacher, students, evaluations per task, tasks in the given order) and a
task is skipped when `--deadline-s` would be passed, so a time-boxed run returns what it
finished.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PIECE_BYTES = 15 << 20  # what comes back from the accelerator: files of at most 16 MiB
STUDENTS = ("secformer", "mpcformer")
TEACHER_PRESETS = ("puma", "crypten", "secformer-exact-softmax")  # evaluated on the teacher


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fp16_base(model_path: str, dest: Path) -> Path:
    """A copy of the base checkpoint with float16 weights (what travels to the accelerator)."""
    import shutil

    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(model_path).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.startswith("pytorch_model"):
            shutil.copy(f, dest / f.name)
    st = load_file(str(Path(model_path) / "model.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in st.items()},
              str(dest / "model.safetensors"))
    return dest


# -- packing -------------------------------------------------------------------------------------

def pack(ckpt: Path, out: Path, name: str) -> list[str]:
    """Checkpoint -> float16 pieces (word embeddings left out) + its secformer.json."""
    from safetensors.torch import save_file

    from secformer_compiler import distill as D

    model, _, meta = D.load_classifier(ckpt)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items() if "word_embeddings" not in k}
    pieces, cur, size = [], {}, 0
    for k, v in state.items():
        n = v.numel() * 2
        if cur and size + n > PIECE_BYTES:
            pieces.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += n
    pieces.append(cur)
    files = []
    for i, p in enumerate(pieces):
        f = out / f"{name}.{i}.safetensors"
        save_file(p, str(f), metadata={"meta": json.dumps(meta)})
        files.append(f.name)
    return files


def unpack(out: Path, checkpoints: Path, model_path: str | None) -> list[Path]:
    """Rebuild full checkpoints from the pieces in `out` (see the module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from secformer_compiler import distill as D

    made = []
    names = sorted({f.name.split(".")[0] for f in out.glob("*.0.safetensors")})
    for name in names:
        task, role = name.split("__")
        files = sorted(out.glob(f"{name}.*.safetensors"), key=lambda f: int(f.name.split(".")[1]))
        with safe_open(str(files[0]), "pt") as fh:
            meta = json.loads(fh.metadata()["meta"])
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        model, tok = D.new_classifier(int(meta["num_labels"]), meta.get("head", "mean"), model_path)
        model = model.float()
        full = model.state_dict()
        for k in full:
            if "word_embeddings" in k:  # frozen at the float16-rounded base values on the accelerator
                state[k] = full[k].half()
        missing = [k for k in full if k not in state]
        if missing:
            raise SystemExit(f"{name}: pieces lack {missing[:5]}")
        model.load_state_dict({k: v.float() for k, v in state.items()})
        meta["packed"] = "float16 weights from the accelerator (benchmarks/train_gpu.py unpack)"
        if meta.get("teacher"):
            meta["teacher"] = str(checkpoints / task / "teacher")
        dest = checkpoints / task / role
        D.save_classifier(model.eval(), tok, dest, meta)
        made.append(dest)
        log(f"unpacked {name} -> {dest}")
    return made


# -- training ------------------------------------------------------------------------------------

def train(args: argparse.Namespace) -> None:
    from secformer_compiler import distill as D

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    records: list[dict] = []
    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    machine = {"python": platform.python_version(), "torch": torch.__version__, "device": dev_name,
               "platform": platform.platform()}

    def save_records() -> None:
        (out / "records.json").write_text(json.dumps({"records": records, "machine": machine}, indent=1) + "\n")

    def left() -> float:
        return args.deadline_s - (time.time() - t_start)

    def evaluate(ckpt: Path, task: str, preset: str, mode: str, command: str) -> None:
        t = time.time()
        try:
            rec = D.evaluate(ckpt, task, preset, mode, args.n_eval, data_dir=args.data_dir,
                             batch_size=args.eval_batch, max_len=args.max_len, buckets=(args.max_len,),
                             device=args.device, log=log)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            traceback.print_exc()
            spec = D.glue.task_spec(task)
            rec = {"task": spec.name, "preset": preset, "mode": mode, "metric": spec.metric, "value": None,
                   "n_examples": args.n_eval, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        rec.update(command=command, device=dev_name, seconds=round(time.time() - t, 1),
                   checkpoint_path=f"benchmarks/checkpoints/{task}/{ckpt.name}",
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        records.append(rec)
        save_records()

    # Step times on this device (a short warm-up run of each kind), to size time-boxed budgets:
    # a budget {"teacher_s": 60} means as many rows as 60 s of steps allow.
    step_s = {"teacher": None, "student": None}
    if args.calibrate_speed:
        first = D.glue.task_spec(args.tasks.split(",")[0]).name
        probe = work / "_probe"
        n = args.batch * 8
        t = time.time()
        D.finetune(first, args.data_dir, probe / "teacher", max_len=args.max_len, train_subsample=n, epochs=1,
                   batch_size=args.batch, model_path=args.model_path, device=args.device, freeze_embeddings=True,
                   log=lambda *a: None)
        step_s["teacher"] = (time.time() - t) / 8
        t = time.time()
        D.distill(probe / "teacher", first, "secformer", data_dir=args.data_dir, out_dir=probe / "student",
                  max_len=args.max_len, train_subsample=n, layer_epochs=1, pred_epochs=1, batch_size=args.batch,
                  buckets=(args.max_len,), device=args.device, freeze_embeddings=True, log=lambda *a: None)
        step_s["student"] = (time.time() - t) / 16
        machine["step_seconds_upper_bound"] = step_s
        log(f"speed probe: teacher <= {step_s['teacher']:.3f} s/step, student <= {step_s['student']:.3f} s/step "
            f"(batch {args.batch}, length {args.max_len}; includes loading and compiling)")

    def rows_for(seconds: float | None, kind: str, epochs: float, given: int | None) -> int | None:
        if seconds is None or step_s[kind] is None:
            return given
        rows = int(seconds / step_s[kind] / epochs) * args.batch
        return max(args.batch, min(rows, given) if given else rows)

    base = " ".join(["python benchmarks/train_gpu.py train", f"--data-dir {shlex.quote(args.data_dir)}",
                     f"--device {args.device}", f"--max-len {args.max_len}"])
    for i, task in enumerate(D.glue.task_spec(t).name for t in args.tasks.split(",")):
        if i and left() < args.task_need_s:
            log(f"skipping {task} and after: {left():.0f} s left")
            break
        cfg = dict(json.loads(args.budgets).get(task, {}))
        t_ep = cfg.get("teacher_epochs", 3)
        l_ep, p_ep = cfg.get("layer_epochs", 2.0), cfg.get("pred_epochs", 1.0)
        t_sub = rows_for(cfg.get("teacher_s"), "teacher", t_ep, cfg.get("teacher_rows"))
        s_sub = rows_for(cfg.get("student_s"), "student", l_ep + p_ep, cfg.get("student_rows"))
        if t_sub is not None and t_sub >= len(D.glue.load_split(args.data_dir, task, "train")):
            t_sub = None  # all rows
        resolved = {"teacher_rows": t_sub, "teacher_epochs": t_ep, "student_rows": s_sub, "layer_epochs": l_ep,
                    "pred_epochs": p_ep}
        cmd = (f"{base} --tasks {task} --budgets '{json.dumps({task: resolved})}'")
        teacher = work / task / "teacher"
        try:
            log(f"{task}: fine-tuning the teacher ({t_sub or 'all'} rows, {t_ep} epochs)")
            D.finetune(task, args.data_dir, teacher, max_len=args.max_len, train_subsample=t_sub, epochs=t_ep,
                       batch_size=args.batch, lr=args.lr, model_path=args.model_path, device=args.device,
                       freeze_embeddings=True, log=log if args.verbose else (lambda *a: None))
            log(f"{task}: teacher done ({time.time() - t_start:.0f} s in)")
            for preset in STUDENTS:
                log(f"{task}: distilling the {preset} student ({s_sub or 'all'} rows, {l_ep} + {p_ep} epochs)")
                D.distill(teacher, task, preset, data_dir=args.data_dir, out_dir=work / task / preset,
                          max_len=args.max_len, train_subsample=s_sub, layer_epochs=l_ep, pred_epochs=p_ep,
                          batch_size=args.batch, lr=args.distill_lr, buckets=(args.max_len,), device=args.device,
                          freeze_embeddings=True, log=log if args.verbose else (lambda *a: None))
                log(f"{task}: {preset} student done ({time.time() - t_start:.0f} s in)")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            log(f"{task}: training failed; next task")
            continue
        if task in args.pack.split(","):
            for role in ("teacher", *STUDENTS):
                files = pack(work / task / role, out, f"{task}__{role}")
                log(f"packed {task}/{role}: {files}")
        evaluate(teacher, task, "float", "float", cmd)
        for preset in STUDENTS:
            evaluate(work / task / preset, task, preset, "float_approx", cmd)
        if task in args.all_presets.split(","):
            for preset in TEACHER_PRESETS:
                evaluate(teacher, task, preset, "float_approx", cmd)
        log(f"{task}: done ({time.time() - t_start:.0f} s in)")
    save_records()
    log(f"finished in {time.time() - t_start:.0f} s")


def merge(out: Path, results: Path) -> None:
    """Merge OUT/records.json into the accuracy JSON (replacing the same task/preset/mode)."""
    import accuracy

    data = json.loads((out / "records.json").read_text())
    for rec in data["records"]:
        rec.setdefault("machine", data["machine"])
        accuracy.save_record(results, rec)
    log(f"merged {len(data['records'])} records into {results}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--data-dir", required=True)
    t.add_argument("--model-path", default=None, help="base checkpoint (default: the packaged MiniLM)")
    t.add_argument("--out", required=True)
    t.add_argument("--work", default="/tmp/secformer-train")
    t.add_argument("--device", default="cuda")
    t.add_argument("--tasks", default="SST-2")
    t.add_argument("--pack", default="SST-2", help="tasks whose checkpoints are packed into OUT")
    t.add_argument("--all-presets", default="SST-2", help="tasks where puma/crypten/exact-softmax are evaluated")
    t.add_argument("--budgets", default="{}", help='JSON {task: {teacher_rows, teacher_epochs, student_rows, '
                                                   'layer_epochs, pred_epochs}}')
    t.add_argument("--max-len", type=int, default=64)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--distill-lr", type=float, default=5e-5)
    t.add_argument("--eval-batch", type=int, default=64)
    t.add_argument("--n-eval", type=int, default=None, help="dev rows (default all)")
    t.add_argument("--deadline-s", type=float, default=1e9)
    t.add_argument("--task-need-s", type=float, default=60, help="do not start a task with less left")
    t.add_argument("--verbose", action="store_true")
    t.add_argument("--calibrate-speed", action="store_true", help="time a few steps first; budgets may then "
                                                                  "give teacher_s / student_s (seconds)")
    u = sub.add_parser("unpack")
    u.add_argument("out")
    u.add_argument("--checkpoints", default=str(HERE / "checkpoints"))
    u.add_argument("--model-path", default=None)
    u.add_argument("--json", default=str(HERE / "results" / "accuracy.json"))
    b = sub.add_parser("base-fp16", help="write the float16 base checkpoint that travels")
    b.add_argument("dest")
    b.add_argument("--model-path", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        train(args)
    elif args.cmd == "unpack":
        unpack(Path(args.out), Path(args.checkpoints), args.model_path)
        merge(Path(args.out), Path(args.json))
    else:
        from secformer_compiler.distill import default_model_path
        fp16_base(str(args.model_path or default_model_path()), Path(args.dest))


if __name__ == "__main__":
    main()
