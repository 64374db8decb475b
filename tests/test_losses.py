import math

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth_dora.families.ddpm import diffusion_target, sample_noise, snr_weights
from dreambooth_dora.training.losses import diffusion_loss


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_targets_follow_the_prediction_type(scheduler):
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    assert torch.equal(diffusion_target(noise, x0, t, scheduler), noise)
    ac = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = ac.sqrt() * noise - (1 - ac).sqrt() * x0  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho)
    assert torch.allclose(diffusion_target(noise, x0, t, scheduler, "v_prediction"), v, atol=1e-6)
    with pytest.raises(ValueError, match="sample"):
        diffusion_target(noise, x0, t, scheduler, "sample")


def test_min_snr_weights_match_the_formula(scheduler):
    t = torch.tensor([5, 300, 900])
    ac = scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w = snr_weights(t, scheduler.alphas_cumprod, 5.0, "epsilon")
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert w[0] < 1 and w[2] == pytest.approx(1.0)  # low-noise steps are down-weighted only
    wv = snr_weights(t, scheduler.alphas_cumprod, 5.0, "v_prediction")
    assert torch.allclose(wv, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_prior_loss_is_split_and_weighted():
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2)
    target[2:] *= 3  # class samples: error 9 per pixel
    loss, parts = diffusion_loss(pred, target, num_prior=2, prior_loss_weight=0.5)
    assert parts["loss_instance"] == pytest.approx(1.0) and parts["loss_prior"] == pytest.approx(9.0)
    assert loss.item() == pytest.approx(1.0 + 0.5 * 9.0)
    loss, _ = diffusion_loss(pred, target, weights=torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(0.25)
    half, _ = diffusion_loss(pred.half(), target.half())
    assert half.dtype == torch.float32


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(64, 4, 8, 8)
    plain = sample_noise(latents, torch.Generator().manual_seed(0))
    offset = sample_noise(latents, torch.Generator().manual_seed(0), noise_offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over H, W
    assert math.isclose(shift[:, :, 0, 0].std().item(), 0.5, rel_tol=0.2)
