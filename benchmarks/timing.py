"""The one timing helper the benchmarks share: wall time of a call, device work included."""

from __future__ import annotations

import time

import torch


def timed(fn, device) -> float:
    """Seconds `fn()` takes, synchronising the accelerator before and after so queued work counts."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0
