"""The diffusion training loss, as a pure function of tensors: the prediction against the target
(which the model family computes: `families/ddpm.py` for the SD families), per-sample weights,
masks and the prior-preservation split."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, *, num_prior: int = 0,
                   prior_loss_weight: float = 1.0, weights: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """MSE in fp32 between prediction and target, both (B, C, H, W).

    With prior preservation the last `num_prior` samples are class images: their mean loss is
    added with `prior_loss_weight` to the instance samples' mean loss. `weights` (B,) reweights
    samples (Min-SNR). `mask` (B, 1, H, W) in [0, 1] weights pixels (masked loss): a sample's loss
    is the mask-weighted mean, sum(mask * err) / (C * sum(mask)), so an all-ones mask is the plain
    mean and a small subject is not scaled down by its area. Returns the loss and its parts.
    """
    err = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is None:
        per_sample = err.mean(dim=(1, 2, 3))
    else:
        m = mask.float()
        per_sample = (err * m).sum(dim=(1, 2, 3)) / (err.shape[1] * m.sum(dim=(1, 2, 3))).clamp_min(1e-8)
    if weights is not None:
        per_sample = per_sample * weights
    n_inst = per_sample.shape[0] - num_prior
    instance = per_sample[:n_inst].mean()
    if num_prior == 0:
        return instance, {"loss_instance": instance.detach()}
    prior = per_sample[n_inst:].mean()
    return instance + prior_loss_weight * prior, {"loss_instance": instance.detach(), "loss_prior": prior.detach()}
