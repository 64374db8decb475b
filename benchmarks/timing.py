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


def saved_for_backward(forward, parameters) -> int:
    """Bytes autograd keeps for backward while `forward()` runs, each storage once, `parameters`
    excluded: the memory a training step holds beyond the model (exact, device independent)."""
    skip = {p.untyped_storage().data_ptr() for p in parameters}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())
