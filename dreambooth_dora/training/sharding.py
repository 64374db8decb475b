"""Sharded training (FSDP2): the denoiser's frozen weights and its adapters split over the processes.

`accelerate launch --use_fsdp --fsdp_version 2 --num_processes N ...` asks for it. accelerate's own
FSDP plugin runs on GPUs only (on CPUs it quietly starts plain processes), so the trainer shards
the denoiser itself with torch's `fully_shard`, the same on CPUs (gloo) and GPUs: every block of
the denoiser's block lists, then the whole model. accelerate then runs the processes as plain
multi-process (DDP-less) workers, and the denoiser is not handed to `accelerator.prepare`.

What sharding changes, and where it is handled:
- gradients: each backward reduce-scatters (averages) the sharded adapters' gradients over the
  processes; the optimizer steps each process's shard;
- the adapter file and checkpoints: every process gathers the full adapter tensors
  (`DTensor.full_tensor`, a collective) and the main process writes them, in the same layout as a
  one-process run; loading distributes the file's tensors back into the shards;
- the optimizer state: gathered whole into `optimizer_full.pt` (accelerate would save the main
  process's shard only) and sharded again on resume;
- validation: every process joins each forward (each one all-gathers the weights); the main
  process writes the grid.
- text-encoder adapters: the text encoders stay whole on every process (wrapped by accelerate:
  DDP averages their adapters' gradients); gradient clipping takes the norm over sharded and whole
  gradients together (`clip_grad_norm`), and the optimizer state of both is gathered through one
  owner module (`state_owner`).
Not with sharding (yet), each refused in one line: pivotal tuning, EMA, fp16 mixed precision (its
grad scaler; bf16 needs none).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

OPTIMIZER_FILE = "optimizer_full.pt"
ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION")


def fsdp_requested() -> bool:
    """`accelerate launch --use_fsdp` set the environment for this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def check_fsdp(cfg) -> None:
    """ValueError (one line) for what sharded training does not do; the FSDP version must be 2."""
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(f"FSDP version {version}: this trainer shards with FSDP2 (torch's fully_shard); "
                         "launch with --fsdp_version 2")
    for name, what in (("train_text_encoder_ti", "pivotal tuning"), ("use_ema", "EMA")):
        if getattr(cfg, name):
            raise ValueError(f"{name}: {what} with FSDP is not supported yet; launch without --use_fsdp (DDP)")
    if cfg.mixed_precision == "fp16":  # the grad scaler would not see the sharded optimizer before clipping
        raise ValueError("mixed_precision fp16 with FSDP is not supported; use bf16 (no grad scaler) or DDP")


def take_env() -> None:
    """Keep accelerate from building its own FSDP plugin (GPU-only): the trainer shards itself."""
    for key in ENV:
        os.environ.pop(key, None)


def shard(model: nn.Module) -> nn.Module:
    """`fully_shard` every block of the model's block lists (each nn.ModuleList child), then the model."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                fully_shard(block)
    fully_shard(model)
    return model


def state_owner(denoiser: nn.Module, models: dict[str, nn.Module]) -> nn.Module:
    """The module whose parameters include every tensor the optimizer trains, for gathering and
    sharding its state: the sharded denoiser alone, or with the adapted text encoders (whole on
    every process) under one container (their names prefixed)."""
    others = {prefix: m for prefix, m in models.items() if m is not denoiser}
    return nn.ModuleDict({"denoiser": denoiser, **others}) if others else denoiser


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_` (the 2-norm of all gradients together; each scaled by
    max_norm / (norm + 1e-6) where that is below 1) over sharded (DTensor) and whole gradients
    alike: torch's own cannot stack the two kinds' norms. The shards' squares are summed locally
    and added over the processes in one all-reduce (not one per tensor); whole gradients are the
    same on every process and added after it. Returns the norm before clipping."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
    sharded, whole = torch.zeros((), device=device), torch.zeros((), device=device)
    group = None
    for g in grads:
        if isinstance(g, DTensor) and all(isinstance(p, Shard) for p in g.placements) and g.device_mesh.ndim == 1:
            sharded += g.to_local().float().pow(2).sum()
            group = g.device_mesh.get_group()
        elif isinstance(g, DTensor):  # another layout: its own reduction
            whole += torch.linalg.vector_norm(g, 2).full_tensor().float().pow(2)
        else:
            whole += g.float().pow(2).sum()
    if group is not None:
        dist.all_reduce(sharded, group=group)
    total = (sharded + whole).sqrt()
    coef = float(max_norm / (float(total) + 1e-6))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def save_optimizer(model: nn.Module, optimizer, output_dir: str | Path, write: bool) -> None:
    """The whole optimizer state (gathered from every process: all must call this) into OPTIMIZER_FILE."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if write:
        from ..outputs import atomic_path

        with atomic_path(Path(output_dir) / OPTIMIZER_FILE) as tmp:
            torch.save(state, tmp)


def load_optimizer(model: nn.Module, optimizer, input_dir: str | Path) -> None:
    """OPTIMIZER_FILE's whole state, sharded into this process's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(Path(input_dir) / OPTIMIZER_FILE, weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
