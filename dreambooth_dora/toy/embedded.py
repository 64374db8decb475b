"""Pretraining the embedded base models on the toy world, and the judge that scores them.

    python -m dreambooth_dora.toy.embedded OUT_DIR [--resolution 32] [--vae-steps 800] [--unet-steps 3000]
                                               [--classifier-steps 1500]
    python -m dreambooth_dora.toy.embedded OUT_DIR --flux [--vae-from embedded:toy-world]
                                               [--transformer-steps 3000] [--guidance-steps 1500]
                                               [--init-from EARLIER] [--judge-from embedded:toy-world]

`embedded:toy-world`: stage 1 trains a small AutoencoderKL (factor 4) on toy pictures; stage 2
trains a UNet2DConditionModel with cross-attention and a CLIPTextModel from scratch on cached
latents (10% empty captions for classifier-free guidance). Saved as a StableDiffusionPipeline.

`embedded:toy-world-flux` (`--flux`): FLUX.1 dev's architecture at toy size (a FluxTransformer2DModel
with double and single blocks and a guidance embedding, CLIP-L pooled + T5 states, a VAE with
shift and scale), trained from scratch with rectified flow, then with guidance built in (see
`pretrain_flux`); the VAE can be taken from the toy-world model (`--vae-from`) so both models
share one latent space. Saved as a FluxPipeline. Either loads like any hub model.
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


def descend(loss, opt, sched, params):
    """One optimiser step on `loss` (gradients clipped to norm 1); returns the loss."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss


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
    train_vae(vae, rng, held, resolution, vae_steps, log, t0)
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
        loss = descend(F.mse_loss(pred, noise), opt, sched, params)
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


# ---- the FLUX.1-architecture toy (`embedded:toy-world-flux`) --------------------------------------

FLUX_T5_LENGTH = 32  # the T5 tokenizer's model_max_length: every prompt is encoded (and drawn) at this length


def build_flux_models(vae_from: str | Path | None = None, resolution: int = 32):
    """Tokenizers, CLIP, T5, VAE and a FluxTransformer2DModel (double + single blocks) of toy size.
    The VAE is the toy-world model's (`vae_from`, a pipeline folder) when given, else a fresh one."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tiny import build_t5_tokenizer, t5_rows

    words = tuple(sorted(set(TOY_WORDS)))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, max_length=24, words=words)
    tokenizer_2 = build_t5_tokenizer(words=words, max_length=FLUX_T5_LENGTH)
    if vae_from:
        vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae")
    else:
        vae = build_models(resolution)[2]
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=2,
                                         num_single_layers=4, attention_head_dim=16, num_attention_heads=8,
                                         joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
                                         axes_dims_rope=[4, 6, 6])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=24,
                                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=t5_rows(tokenizer_2), d_model=64, d_kv=16, d_ff=128,
                                             num_layers=2, num_heads=4, relative_attention_num_buckets=16,
                                             dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                             decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, transformer


def train_vae(vae, rng, held, resolution: int, steps: int, log, t0: float) -> None:
    """L1 reconstruction + a small KL on toy pictures (stage 1 of both embedded models)."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(steps):
        x, _ = batch_of(rng, 32, resolution, held)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}: l1 {loss.item():.4f} ({time.time() - t0:.0f}s)")


def flux_from(folder: str | Path):
    """The parts of an earlier toy FLUX model (`--init-from`); a transformer without a guidance
    embedding gets one whose last layer starts at zero (its pictures are unchanged at first)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    pipe = FluxPipeline.from_pretrained(folder)
    old = pipe.transformer
    transformer = old
    if not old.config.guidance_embeds:
        transformer = FluxTransformer2DModel(**{**old.config, "guidance_embeds": True})
        missing, unexpected = transformer.load_state_dict(old.state_dict(), strict=False)
        assert not unexpected and all("guidance_embedder" in k for k in missing), (missing, unexpected)
        torch.nn.init.zeros_(transformer.time_text_embed.guidance_embedder.linear_2.weight)
        torch.nn.init.zeros_(transformer.time_text_embed.guidance_embedder.linear_2.bias)
    return pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae, transformer


def pretrain_flux(out_dir: str | Path, resolution: int = 32, vae_steps: int = 800, steps: int = 3000,
                  batch: int = 64, seed: int = 0, vae_from: str | Path | None = None, guidance_steps: int = 1500,
                  init_from: str | Path | None = None, log=print) -> Path:
    """Stage 2, rectified flow as FLUX.1 samples it: x_s = (1 - s) x0 + s n, the transformer
    predicts n - x0 from packed 2x2 latents, CLIP-L's pooled output and T5's states; s drawn
    logit-normal; 10% empty captions (the unconditional model).

    Stage 3, guidance in the model, as FLUX.1 dev has it (a guidance embedding instead of CFG's
    second pass): for guidance g ~ U(1, 4) the target is u + g (n - x0 - u), u the model's own
    unconditional prediction (no gradient); its mean is CFG's velocity u + g (v_cond - u)
    ("model guidance"). The pipeline then draws with `guidance_scale` (3.5 by default) in one pass.
    `init_from`: start stage 3 from an earlier model (stages 1-2 skipped). Saved as a FluxPipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    rng = random.Random(seed)
    held = {key for *_, key in held_out_prompts()}
    t0 = time.time()
    if init_from:
        tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, transformer = flux_from(init_from)
        steps = 0
    else:
        tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, transformer = build_flux_models(vae_from, resolution)
        if not vae_from:
            train_vae(vae, rng, held, resolution, vae_steps, log, t0)
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            x, _ = batch_of(rng, 256, resolution, held)
            mean = vae.encode(x).latent_dist.mean
        vae.register_to_config(shift_factor=round(mean.mean().item(), 4),
                               scaling_factor=round(1.0 / mean.std().item(), 4))
    vae.eval().requires_grad_(False)
    side = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    channels = vae.config.latent_channels
    img_ids = FluxPipeline._prepare_latent_image_ids(batch, side // 2, side // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(FLUX_T5_LENGTH, 3)

    def velocity(noisy, s, captions, guidance):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        ids_2 = tokenizer_2(captions, padding="max_length", max_length=FLUX_T5_LENGTH, truncation=True,
                            return_tensors="pt").input_ids
        return transformer(hidden_states=noisy, timestep=s, guidance=guidance,
                           pooled_projections=text_encoder(ids).pooler_output,
                           encoder_hidden_states=text_encoder_2(ids_2)[0], txt_ids=txt_ids, img_ids=img_ids,
                           return_dict=False)[0]

    params = [*transformer.parameters(), *text_encoder.parameters(), *text_encoder_2.parameters()]
    for stage, count, lr in (("transformer", steps, 1e-3), ("guidance", guidance_steps, 3e-4)):
        if not count:
            continue
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(count, 2), pct_start=0.05)
        for step in range(count):
            x, captions = batch_of(rng, batch, resolution, held)
            dropped = torch.tensor([rng.random() < 0.1 for _ in captions])
            captions = ["" if d else c for c, d in zip(captions, dropped)]
            with torch.no_grad():
                latents = (vae.encode(x).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
            x0 = FluxPipeline._pack_latents(latents, batch, channels, side, side)
            noise = torch.randn_like(x0)
            s = torch.sigmoid(torch.randn(batch))
            noisy = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
            target, g = noise - x0, torch.ones(batch)
            if stage == "guidance":
                g = torch.where(dropped, 1.0, 1.0 + 3.0 * torch.rand(batch))
                with torch.no_grad():
                    u = velocity(noisy, s, [""] * batch, torch.ones(batch))
                target = u + g[:, None, None] * (target - u)
            guidance = g if transformer.config.guidance_embeds else None
            loss = descend(F.mse_loss(velocity(noisy, s, captions, guidance), target), opt, sched, params)
            if step % 100 == 0 or step == count - 1:
                log(f"{stage} {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    log(f"saved {out} after {time.time() - t0:.0f}s")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--flux", action="store_true", help="the FLUX.1-architecture model (embedded:toy-world-flux)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-from", help="--flux: take the VAE of this pipeline (a folder or embedded: name) "
                                           "instead of training one")
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--transformer-steps", type=int, default=3000, help="--flux: steps of stage 2 (flow matching)")
    parser.add_argument("--guidance-steps", type=int, default=1500,
                        help="--flux: steps of stage 3 (guidance built into the model, as FLUX.1 dev)")
    parser.add_argument("--init-from", help="--flux: run stage 3 only, from this earlier toy FLUX model")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="--flux: the seed of the weights and the pictures drawn")
    parser.add_argument("--classifier-steps", type=int, default=1500,
                        help="train the judge too, into OUT/classifier (0: skip)")
    parser.add_argument("--judge-from", help="copy this model's judge (its classifier/) instead of training one")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier model this command wrote at OUT")
    args = parser.parse_args(argv)
    from ..families.models import resolve_model
    from ..outputs import OutputError, atomic_dir, check_output_target

    bad = next((f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}"
                for name, low in (("vae_steps", 1), ("unet_steps", 1), ("transformer_steps", 1),
                                  ("guidance_steps", 0), ("batch", 1),
                                  ("classifier_steps", 0), ("resolution", 8)) if getattr(args, name) < low), None)
    if bad is None and args.resolution % 8:
        bad = f"--resolution must be a multiple of 8, got {args.resolution}"
    if bad is None and (args.vae_from or args.init_from) and not args.flux:
        bad = f"{'--vae-from' if args.vae_from else '--init-from'} goes with --flux"
    sources = {}
    for flag, name, need in (("--vae-from", args.vae_from, "vae/config.json"),
                             ("--init-from", args.init_from, "transformer/config.json"),
                             ("--judge-from", args.judge_from, "classifier/model.safetensors")):
        if bad is None and name:
            try:
                sources[flag] = Path(resolve_model(name))
            except ValueError as err:
                bad = f"{flag}: {err}"
            else:
                if not (sources[flag] / need).is_file():
                    bad = f"{flag}: {name} has no {need}"
    try:  # a new folder, or (asked for) one this command wrote before; never the shipped model by accident
        if bad:
            raise OutputError(bad)
        out = check_output_target(args.out, "embedded-model", overwrite=args.overwrite, what="OUT")
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log = lambda m: print(m, flush=True)  # noqa: E731
    with atomic_dir(out, "embedded-model") as tmp:  # complete or not at all, however long it takes
        if args.flux:
            pretrain_flux(tmp, args.resolution, args.vae_steps, args.transformer_steps, args.batch,
                          seed=args.seed, vae_from=sources.get("--vae-from"), guidance_steps=args.guidance_steps,
                          init_from=sources.get("--init-from"), log=log)
        else:
            pretrain(tmp, args.resolution, args.vae_steps, args.unet_steps, args.batch, log=log)
        if "--judge-from" in sources:
            import shutil

            shutil.copytree(sources["--judge-from"] / "classifier", tmp / "classifier")
        elif args.classifier_steps:
            from .world import save_classifier, train_classifier

            save_classifier(train_classifier(args.classifier_steps, resolution=args.resolution, log=log),
                            tmp / "classifier")
    log(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def draw_prompts(pipe, prompts, seed: int, steps: int = 20, guidance: float | None = None):
    """Pictures of `prompts` at the model's own size, one generator for the batch; `guidance`:
    CFG's scale (default 5), or for a model with guidance built in (the FLUX toy) the guidance
    it is told (default its family's, 3.5); T5 at its trained length."""
    from ..families import family_of_pipeline

    family = family_of_pipeline(pipe)
    size = family.native_size(pipe)
    if guidance is None:
        guidance = family.default_guidance if family.distilled_guidance else 5.0
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                generator=torch.Generator().manual_seed(seed), **family.draw_settings(pipe)).images


@torch.no_grad()
def score_base(pipe, classifier, prompts=None, seeds=(0,), steps: int = 20, guidance: float | None = None):
    """Class and colour agreement of the classifier with held-out prompts (fractions in [0, 1])."""
    from .world import classify

    prompts = prompts or held_out_prompts()
    hits_c = hits_k = n = 0
    for seed in seeds:
        images = draw_prompts(pipe, [p for p, *_ in prompts], seed, steps, guidance)
        cls, colour, _ = classify(classifier, images)
        hits_c += sum(int(c == p[1]) for c, p in zip(cls, prompts))
        hits_k += sum(int(k == p[2]) for k, p in zip(colour, prompts))
        n += len(prompts)
    return hits_c / n, hits_k / n


@torch.no_grad()
def subject_distance(pipe, classifier, instance_images, prompt: str, seeds=range(8), steps: int = 20,
                     guidance: float | None = None) -> float:
    """Mean cosine distance (classifier penultimate features) from images for `prompt` to the
    instance images seen at the model's resolution: lower is nearer the subject."""
    from ..evaluation.metrics import ToyEmbedder, cosine
    from ..families import family_of_pipeline

    judge = ToyEmbedder(classifier, family_of_pipeline(pipe).native_size(pipe))
    images = [draw_prompts(pipe, [prompt], s, steps, guidance)[0] for s in seeds]
    return float(1 - cosine(judge.images(images), judge.images(instance_images)).mean())
