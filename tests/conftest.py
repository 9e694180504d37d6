"""Shared test fixtures: seeded randomness (printed with the command to reproduce)."""

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
