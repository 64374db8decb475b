"""Flow-matching training for the DiT families (SD3, FLUX.1), as pure functions of tensors, with
the meanings of diffusers' `train_dreambooth_lora_sd3.py` / `_flux.py` (Esser et al. 2024, section
3.1: rectified flow, x_t = (1 - s) x0 + s e, the model predicts the velocity e - x0):

    weighting_scheme  which sigmas are drawn and how each sample's loss is weighted:
                      logit_normal  u = sigmoid(N(logit_mean, logit_std))   weight 1
                      mode          u ~ U(0, 1) pushed by mode_scale         weight 1
                      sigma_sqrt    u ~ U(0, 1)                              weight 1 / s^2
                      cosmap        u ~ U(0, 1)                              weight 2 / (pi (1 - 2s + 2s^2))
                      none          u ~ U(0, 1)                              weight 1
    timestep          the scheduler's training timestep at index floor(u T); s = t / T

Every draw comes from the example's own generator (diffusers draws from the global one), so a
resumed or sharded run repeats an uninterrupted one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


def density_sample(scheme: str, count: int, generator=None, logit_mean: float = 0.0,
                   logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1), (count,): where on the noise path each example trains."""
    import torch

    if scheme == "logit_normal":
        return torch.sigmoid(torch.normal(mean=logit_mean, std=logit_std, size=(count,), generator=generator))
    u = torch.rand(size=(count,), generator=generator)
    if scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(scheme: str, sigmas) -> torch.Tensor:
    """Per-sample loss weights for noise levels `sigmas` (B,)."""
    import torch

    if scheme == "sigma_sqrt":
        return (sigmas ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2))
    return torch.ones_like(sigmas)


def draw_timestep(scheduler, generator, scheme: str, logit_mean: float, logit_std: float,
                  mode_scale: float) -> float:
    """One example's training timestep from the scheduler's table (diffusers' index rule)."""
    u = density_sample(scheme, 1, generator, logit_mean, logit_std, mode_scale)
    index = (u * scheduler.config.num_train_timesteps).long()
    return float(scheduler.timesteps[index])
