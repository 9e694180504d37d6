"""Shared test fixtures: seeded randomness (printed with the command to reproduce), and a tiny
random-init BERT for end-to-end compiler tests."""

import os

import pytest
import torch


@pytest.fixture
def seed(request):
    """A per-test seed for the *plaintext test data* (protocol randomness always comes from the PRG)."""
    s = int(os.environ.get("SECFORMER_TEST_SEED", "1234"))
    torch.manual_seed(s)
    print(f"seed {s}: reproduce with SECFORMER_TEST_SEED={s} pytest '{request.node.nodeid}'")
    return s


@pytest.fixture(scope="session")
def make_tiny_bert():
    """`make_tiny_bert(layers=2, batch=1, seq=8)` -> (model, inputs): see `tiny_bert`."""
    return tiny_bert


def tiny_bert(layers: int = 2, batch: int = 1, seq: int = 8, seed: int = 0):
    """(model, inputs): a random-init BERT of hidden size 32, 2 heads, FFN 64, vocabulary 100,
    and all-ones attention masks."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    x = {"input_ids": torch.randint(0, 100, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    return model, x
