"""Fixtures for the CLI tests: tiny random BERT checkpoints (with a tokenizer), artifacts
compiled once per session, and a runner for `secformer` subprocesses and party processes
that never leaves a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORDS = ("the a man woman cat dog is are playing plays guitar music food good bad movie great terrible "
         "hello world this that was it on in of and to").split()
SEQ = 8


def make_checkpoint(out: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A 2-layer, hidden-32 BERT (`bert`: encoder, `cls`: 2-label classifier, `silu`: an
    activation without MPC lowering) with a WordPiece tokenizer, via save_pretrained."""
    import transformers as T

    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    T.BertTokenizerFast(vocab_file=str(out / "vocab.txt")).save_pretrained(str(out))
    common = dict(vocab_size=len(vocab), num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                  intermediate_size=64, max_position_embeddings=64)
    if kind == "cls":
        model = T.BertForSequenceClassification(T.BertConfig(**common, num_labels=2, id2label={0: "NEG", 1: "POS"},
                                                             label2id={"NEG": 0, "POS": 1}))
    else:
        model = T.BertModel(T.BertConfig(**common, hidden_act="silu" if kind == "silu" else "gelu"))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-bert")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, ckpt_dir):
    """The tiny encoder compiled in this process (batch 1 x seq 8): (artifact path, CompiledModel)."""
    from secformer_compiler.cli import compile_checkpoint

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("art") / "tiny.sfa"
    cm = compile_checkpoint(ckpt_dir, out, seq_len=SEQ, batch=1, samples=4, log=lambda m: None)
    return out, cm


@pytest.fixture(scope="session")
def artifact(compiled) -> Path:
    return compiled[0]


@pytest.fixture(scope="session")
def cls_artifact(tmp_path_factory) -> Path:
    """The tiny classifier compiled in this process (batch 2 x seq 8)."""
    from secformer_compiler.cli import compile_checkpoint

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("cls")
    ck = make_checkpoint(base / "tiny-cls", "cls")
    out = base / "cls.sfa"
    compile_checkpoint(ck, out, seq_len=SEQ, batch=2, samples=4, log=lambda m: None)
    return out


def env(**extra: str) -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    e.pop("SECFORMER_FAULT", None)
    e.update(extra)
    return e


def cli(*args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    """Run `secformer ARGS` as a subprocess (same interpreter)."""
    return subprocess.run([sys.executable, "-m", "secformer_compiler.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env(**extra))


class Parties:
    """Three `secformer party` processes for a config; `finish()` checks they are all gone."""

    def __init__(self, config: Path, logdir: Path, roles=("p0", "p1", "dealer"), **extra: str) -> None:
        self.procs, self.logs = {}, {}
        for role in roles:
            self.logs[role] = logdir / f"{role}.log"
            with open(self.logs[role], "w") as f:
                self.procs[role] = subprocess.Popen(
                    [sys.executable, "-m", "secformer_compiler.cli", "party", "--role", role, "--config", str(config)],
                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env(**extra))

    def log(self, role: str) -> str:
        return self.logs[role].read_text()

    def wait_ready(self, timeout: float = 120) -> None:
        """Until every role logged "ready" (a client that connects earlier is refused)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if all("ready: serving" in self.log(r) for r in self.procs):
                return
            dead = {r: p.poll() for r, p in self.procs.items() if p.poll() is not None}
            assert not dead, f"parties exited {dead}: " + "\n".join(self.log(r) for r in self.procs)
            time.sleep(0.2)
        raise AssertionError("parties not ready: " + "\n".join(self.log(r) for r in self.procs))

    def wait_all(self, timeout: float) -> dict[str, int | None]:
        """Exit codes after waiting up to `timeout` s (None: still running)."""
        end = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(end - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        return {r: p.poll() for r, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def parties_factory():
    made: list[Parties] = []

    def start(*args, **kw) -> Parties:
        p = Parties(*args, **kw)
        made.append(p)
        return p

    yield start
    for p in made:
        p.kill()
