"""The diffusion training loss, as pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, generator: torch.Generator | None = None, noise_offset: float = 0.0):
    """Gaussian noise like `latents`, plus `noise_offset` x per-channel constant noise
    (offset noise: lets the model learn very dark and very bright images)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator, dtype=torch.float32)
        noise = noise + noise_offset * offset.to(latents)
    return noise


def diffusion_target(noise: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor, scheduler,
                     prediction_type: str | None = None) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    kind = prediction_type or scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, snr_gamma: float,
                prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023), per sample (B,): min(SNR, gamma) / SNR for
    epsilon targets, min(SNR, gamma) / (SNR + 1) for v-prediction."""
    ac = alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    snr = ac / (1 - ac)
    clipped = torch.clamp(snr, max=snr_gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


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
