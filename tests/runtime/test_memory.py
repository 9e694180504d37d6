"""runtime.memory: freed heap memory goes back to the operating system."""

import sys

import pytest
import torch

from secformer_compiler.runtime.memory import release_free_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim and /proc are Linux's")
def test_release_gives_back_memory_a_live_block_above_it_would_pin():
    """Blocks below glibc's mmap threshold come from the heap; one small live block allocated
    after them keeps the heap top from shrinking, so their memory stays resident after
    they are freed, until `release_free_memory`."""
    release_free_memory()
    blocks = [torch.ones(1 << 13, dtype=torch.int64) for _ in range(4000)]  # 4000 x 64 KiB, touched
    pin = torch.ones(16, dtype=torch.int64)
    del blocks
    before = _rss_mib()
    assert release_free_memory() is True
    after = _rss_mib()
    assert before - after > 200, (before, after)
    assert int(pin.sum()) == 16  # live tensors are untouched
