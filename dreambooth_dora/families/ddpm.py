"""DDPM training for the SD families, as pure functions of tensors: offset noise, the target per
prediction type (epsilon / v), Min-SNR weights. A flow-matching family keeps its own module."""

from __future__ import annotations

import torch


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
