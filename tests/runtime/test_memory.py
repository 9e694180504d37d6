"""runtime.memory: freed heap memory goes back to the operating system."""

import sys

import pytest
import torch

from secformer_compiler.runtime.memory import release_free_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_release_gives_back_memory_that_live_blocks_between_would_pin():
    """Blocks below glibc's mmap threshold come from the heap. Freeing every other one
    leaves free chunks between live ones: no heap-top trim can return them, so their memory
    stays resident after they are freed, until `release_free_memory`. (Freeing a run of
    blocks with one small live block after them was flaky: the small block could land in
    an older hole below, and then plain free() already trimmed the heap top.)"""
    release_free_memory()
    blocks = [torch.ones(1 << 13, dtype=torch.int64) for _ in range(8000)]  # 8000 x 64 KiB, touched
    del blocks[::2]  # 250 MiB freed, each chunk between two live ones
    before = _rss_mib()
    assert release_free_memory() is True
    after = _rss_mib()
    assert before - after > 150, (before, after)
    assert all(int(b.sum()) == 1 << 13 for b in blocks)  # live tensors are untouched
