"""Pretraining the embedded base model on the toy world, and the judge that scores it.

    python -m dreambooth_dora.toy.embedded OUT_DIR [--resolution 32] [--vae-steps 800] [--unet-steps 3000]
                                               [--classifier-steps 1500]

Stage 1 trains a small AutoencoderKL (factor 4) on toy pictures; stage 2 trains a
UNet2DConditionModel with cross-attention and a CLIPTextModel from scratch on cached latents
(10% empty captions for classifier-free guidance). The result is saved with `save_pretrained`
as a StableDiffusionPipeline, loadable like any hub model.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .tiny import WORDS, build_tokenizer
from .world import BACKGROUNDS, CLASSES, COLOURS, TEMPLATES, held_out_prompts, sample, to_tensor

TOY_WORDS = tuple(WORDS) + tuple(w for name in (*CLASSES, *COLOURS, *BACKGROUNDS) for w in name.split()) + tuple(
    w for t in TEMPLATES for w in t.replace("{", " ").replace("}", " ").replace(",", " ").split())


def build_models(resolution: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, max_length=24, words=tuple(sorted(set(TOY_WORDS))))
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), latent_channels=4,
                        norm_num_groups=16, layers_per_block=1, sample_size=resolution)
    unet = UNet2DConditionModel(sample_size=resolution // 4, in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                block_out_channels=(64, 96, 128), layers_per_block=1, attention_head_dim=8,
                                cross_attention_dim=64, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    return tokenizer, text_encoder, vae, unet


def batch_of(rng, n, resolution, held):
    samples = [sample(rng, held) for _ in range(n)]
    return to_tensor([s.image for s in samples], resolution), [s.caption for s in samples]


def pretrain(out_dir: str | Path, resolution: int = 32, vae_steps: int = 800, unet_steps: int = 3000,
             batch: int = 64, seed: int = 0, log=print) -> Path:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    rng = random.Random(seed)
    held = {key for *_, key in held_out_prompts()}
    tokenizer, text_encoder, vae, unet = build_models(resolution)
    t0 = time.time()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(vae_steps):
        x, _ = batch_of(rng, 32, resolution, held)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"vae {step}: l1 {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x, _ = batch_of(rng, 256, resolution, held)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    noise_scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=unet_steps, pct_start=0.05)
    for step in range(unet_steps):
        x, captions = batch_of(rng, batch, resolution, held)
        captions = ["" if rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],))
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == unet_steps - 1:
            log(f"unet {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False,
                                                                       set_alpha_to_one=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    log(f"saved {out} after {time.time() - t0:.0f}s")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classifier-steps", type=int, default=1500,
                        help="train the judge too, into OUT/classifier (0: skip)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier model this command wrote at OUT")
    args = parser.parse_args(argv)
    from ..outputs import OutputError, atomic_dir, check_output_target

    bad = next((f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
                for name, low in (("vae_steps", 1), ("unet_steps", 1), ("batch", 1), ("classifier_steps", 0),
                                  ("resolution", 8)) if getattr(args, name) < low), None)
    if bad is None and args.resolution % 8:
        bad = f"--resolution must be a multiple of 8, got {args.resolution}"
    try:  # a new folder, or (asked for) one this command wrote before; never the shipped model by accident
        if bad:
            raise OutputError(bad)
        out = check_output_target(args.out, "embedded-model", overwrite=args.overwrite, what="OUT")
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = lambda m: print(m, flush=True)  # noqa: E731
    with atomic_dir(out, "embedded-model") as tmp:  # complete or not at all, however long it takes
        pretrain(tmp, args.resolution, args.vae_steps, args.unet_steps, args.batch, log=log)
        if args.classifier_steps:
            from .world import save_classifier, train_classifier

            save_classifier(train_classifier(args.classifier_steps, resolution=args.resolution, log=log),
                            tmp / "classifier")
    log(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


@torch.no_grad()
def score_base(pipe, classifier, prompts=None, seeds=(0,), steps: int = 20, guidance: float = 5.0):
    """Class and colour agreement of the classifier with held-out prompts (fractions in [0, 1])."""
    from .world import classify

    prompts = prompts or held_out_prompts()
    hits_c = hits_k = n = 0
    for seed in seeds:
        texts = [p for p, *_ in prompts]
        images = pipe(texts, num_inference_steps=steps, guidance_scale=guidance,
                      generator=torch.Generator().manual_seed(seed)).images
        cls, colour, _ = classify(classifier, images)
        hits_c += sum(int(c == p[1]) for c, p in zip(cls, prompts))
        hits_k += sum(int(k == p[2]) for k, p in zip(colour, prompts))
        n += len(prompts)
    return hits_c / n, hits_k / n


@torch.no_grad()
def subject_distance(pipe, classifier, instance_images, prompt: str, seeds=range(8), steps: int = 20,
                     guidance: float = 5.0) -> float:
    """Mean cosine distance (classifier penultimate features) from images for `prompt` to the
    instance images seen at the model's resolution: lower is nearer the subject."""
    from ..evaluation.metrics import ToyEmbedder, cosine

    judge = ToyEmbedder(classifier, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    images = [pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                   generator=torch.Generator().manual_seed(s)).images[0] for s in seeds]
    return float(1 - cosine(judge.images(images), judge.images(instance_images)).mean())
