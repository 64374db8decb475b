"""The DreamBooth training loop.

`set_up` (data, run folder, the model family's components, adapters, caches, optimiser) returns a
`Run`; then `train_step(run, step)` per optimiser step: micro-batches -> the family's prediction
and target -> loss -> backward -> clip -> step; the loop around it logs, checkpoints, validates.

Everything random about an example (which image, crop, flip, noise, timestep) is drawn from
generators keyed by (seed, its position in the stream of examples; data.BatchMaker), so a resumed
run repeats an uninterrupted one, and N processes with batch b, or accumulation over N
micro-batches of b, train on exactly what one process with batch N·b trains on.
"""

from __future__ import annotations

import gc
import json
import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.file import AdapterInfo, save_adapter
from ..adapters.inject import adapter_parameters, adapter_parameters_by_role, add_adapters
from .buckets import assign
from .checkpoints import (checkpoint_problem, checkpoint_step, list_checkpoints, register_adapter_hooks,
                          save_checkpoint)
from .config import ConfigError, TrainConfig
from .control import Progress, StopRequest, TrainingStopped
from .data import (BatchMaker, DataError, Example, cache_latents, load_examples, load_image_folder, micro_steps_per_epoch,
                   step_rng)
from .ema import AdapterEMA
from .losses import diffusion_loss
from .model_card import model_card
from ..families import Family, family_of
from ..families.models import resolve_model
from ..outputs import TRAIN_CONFIG, WriteError, free_space, write_failure, write_text
from ..adapters.pivotal import PivotalTokens, insert_tokens, new_token_names
from .prior import ensure_class_images
from .prompts import PromptEncoder
from .runs import RunPlan, check_output_dir, fingerprint_examples, plan_run, run_folder_lock, start_run
from .validation import validate


class TrainingError(RuntimeError):
    pass


@contextmanager
def saving(what: str, last_checkpoint: Path | None):
    """A failed write (a full disk, a lost mount: OSError, safetensors' or torch's serialisation
    errors) as one line naming the file and the free space; the atomic writers have already
    removed their half-written files, so only complete files are ever left behind."""
    try:
        yield
    except Exception as err:
        if isinstance(err, WriteError):
            path, reason, free = err.path, err.reason, err.free
        else:
            reason = write_failure(err)
            if reason is None:
                raise
            path = getattr(err, "filename", None) or what
            free = free_space(path)
        where = f"the last complete checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise TrainingError(f"could not write {what}: {reason} ({path}; {free} free there); nothing half-written "
                            f"was left, {where}") from None


def build_optimizer(cfg: TrainConfig, groups: list[dict]):
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optimizer 'prodigy' needs the prodigyopt package: pip install prodigyopt") from None
        if cfg.learning_rate < 0.1:
            warnings.warn("Prodigy adapts the step size itself; learning_rate is usually 1.0 with it", stacklevel=2)
        return Prodigy(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), beta3=cfg.prodigy_beta3,
                       weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, decouple=cfg.prodigy_decouple,
                       use_bias_correction=cfg.prodigy_use_bias_correction,
                       safeguard_warmup=cfg.prodigy_safeguard_warmup)
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
               eps=cfg.adam_epsilon)


def has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def load_subject_sets(sets: list, cfg: TrainConfig) -> tuple[list[Example], list[int]]:
    """Every set's examples, and one epoch's order: each example's index, its set's repeats times."""
    examples, order = [], []
    for s in sets:
        found = load_examples(s.instance_data_dir, s.dataset_name, cfg.image_column, s.caption_column,
                              default_caption=s.instance_prompt, masked=cfg.masked_loss,
                              mask_data_dir=cfg.mask_data_dir)
        order += list(range(len(examples), len(examples) + len(found))) * s.repeats
        examples += found
    return examples, order


def pivotal_tokens(cfg: TrainConfig, examples: list[Example]) -> dict[str, list[str]]:
    """{abstraction: new tokens} with pivotal tuning ({} without); each abstraction must occur in
    some caption, or its tokens would never train."""
    if not cfg.train_text_encoder_ti:
        return {}
    tokens = new_token_names(cfg.token_abstractions(), cfg.num_new_tokens_per_abstraction)
    for abstraction in tokens:
        if not any(abstraction in ex.caption for ex in examples):
            raise ConfigError(f"train_text_encoder_ti: token_abstraction {abstraction!r} is in no caption or "
                              f"instance_prompt (e.g. instance_prompt 'a photo of {abstraction} dog')")
    return tokens


def example_buckets(cfg: TrainConfig, examples: list[Example], say=print) -> list[tuple[int, int]] | None:
    """Each subject image's aspect bucket (None without aspect_buckets), and a line saying how
    many pictures each bucket holds."""
    if not cfg.aspect_buckets:
        return None
    found = []
    for ex in examples:
        try:
            found.append(assign(ex.image.size, cfg.buckets(), cfg.resolution, cfg.bucket_step, cfg.bucket_max_upscale))
        except ValueError as err:
            raise DataError(f"aspect_buckets: {ex.name or 'an image'}: {err}") from None
    counts = {b: found.count(b) for b in sorted(set(found), key=lambda b: b[0] / b[1])}
    say("aspect buckets (images): " + ", ".join(f"{w}x{h}: {n}" for (w, h), n in counts.items()))
    return found


def make_accelerator(cfg: TrainConfig, out_dir: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    import os

    from .sharding import check_fsdp, fsdp_requested, take_env

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):  # `accelerate launch`
        raise ConfigError("DeepSpeed is not supported; launch with --use_fsdp --fsdp_version 2 (sharded) or "
                          "--multi_gpu (DDP)")
    fsdp = fsdp_requested()
    if fsdp:
        try:
            check_fsdp(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        take_env()  # the trainer shards the denoiser itself (sharding.py); accelerate runs plain processes
    # one run, one accelerator: a run started after another in the same process (a study, a
    # notebook, the tests) must not inherit the earlier one's singletons (precision, accumulation)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),  # lets `accelerate launch --multi_gpu`/torchrun run DDP (gloo) on CPUs
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / cfg.logging_dir)),
    )
    accelerator.shard_denoiser = fsdp and accelerator.num_processes > 1
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def attach_adapters(cfg: TrainConfig, family: Family, unet, text_encoders: list, device, weight_dtype) -> dict:
    """Frozen weights to the device in the compute dtype, DoRA/LoRA layers (fp32) on the targets;
    returns {file prefix: model} of the adapted models."""
    for model in (*text_encoders, unet):
        model.requires_grad_(False).to(device, dtype=weight_dtype)
    trained = text_encoders[:len(family.encoder_parts)] if cfg.train_text_encoder else []  # never T5
    kw = dict(rank=cfg.rank, alpha=cfg.lora_alpha, use_dora=cfg.use_dora, dropout=cfg.lora_dropout,
              use_rslora=cfg.use_rslora)
    try:
        add_adapters(unet, family.denoiser_targets(cfg, unet), **kw)
        for te in trained:
            add_adapters(te, cfg.text_encoder_target_modules, **kw)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in trained:
            te.gradient_checkpointing_enable()
    return {family.denoiser_part: unet, **dict(zip(family.encoder_parts, trained))}


def parameter_groups(cfg: TrainConfig, unet, text_encoders: list, lr_factor: float) -> list[dict]:
    """One group per model part (UNet, text encoders); with a DoRA-aware setting (magnitude_lr,
    magnitude_weight_decay, loraplus_lr_ratio, dora_train) each part splits into A / B / magnitude
    groups with their own learning rate and decay. Frozen roles (dora_train) are left out and
    stop requiring gradients."""
    decay_te = cfg.adam_weight_decay_text_encoder
    parts = [([unet], cfg.learning_rate, cfg.adam_weight_decay)]
    if cfg.train_text_encoder:
        parts.append((text_encoders, cfg.text_encoder_lr or cfg.learning_rate,
                      cfg.adam_weight_decay if decay_te is None else decay_te))
    split = (cfg.magnitude_lr is not None or cfg.magnitude_weight_decay is not None
             or cfg.loraplus_lr_ratio is not None or cfg.dora_train != "both")
    frozen = {"magnitude": ("A", "B"), "direction": ("magnitude",)}.get(cfg.dora_train, ())
    groups = []
    for models, lr, decay in parts:
        if not split:  # the plain groups (Prodigy estimates its step per group: keep them as they were)
            groups.append({"params": [p for m in models for p in adapter_parameters(m)], "lr": lr * lr_factor,
                           **({} if models[0] is unet else {"weight_decay": decay})})
            continue
        roles = {"A": [], "B": [], "magnitude": []}
        for m in models:
            for role, params in adapter_parameters_by_role(m).items():
                roles[role] += params
        for role in frozen:
            for p in roles.pop(role):
                p.requires_grad_(False)
        role_lr = {"A": lr, "B": lr * (cfg.loraplus_lr_ratio or 1.0), "magnitude": cfg.magnitude_lr or lr}
        role_decay = {"A": decay, "B": decay,
                      "magnitude": decay if cfg.magnitude_weight_decay is None else cfg.magnitude_weight_decay}
        groups += [{"params": params, "lr": role_lr[role] * lr_factor, "weight_decay": role_decay[role]}
                   for role, params in roles.items() if params]
    return groups


def resume(accelerator, plan: RunPlan) -> tuple[int, Path | None]:
    """Load the newest checkpoint of the plan that loads (the first was verified by the plan; one
    that still fails falls back to the next, verified first); (0, None) when starting afresh."""
    for i, candidate in enumerate(plan.resume):
        problem = checkpoint_problem(candidate) if i else None
        if problem:
            warnings.warn(f"checkpoint {candidate} is damaged ({problem}); trying an earlier one", stacklevel=2)
            continue
        try:
            accelerator.load_state(str(candidate))
        except Exception as err:  # torch / safetensors / pickle raise many types for a bad file
            warnings.warn(f"checkpoint {candidate} does not load ({type(err).__name__}); trying an earlier one",
                          stacklevel=2)
            continue
        accelerator.print(f"resumed from {candidate} at step {checkpoint_step(candidate)}")
        return checkpoint_step(candidate), candidate
    if plan.resume:
        # the advice depends on what is left: this run's other checkpoints, or nothing of it
        own = [p for p in list_checkpoints(plan.out_dir, run_id=plan.run_id) if p not in plan.resume]
        advice = (f"resume from this run's {own[-1].name} (--resume_from_checkpoint {own[-1].name})" if own
                  else "use --overwrite_output_dir to start afresh")
        raise TrainingError(f"no checkpoint tried loads completely ({', '.join(p.name for p in plan.resume)}); "
                            f"{advice}")
    return 0, None


@dataclass
class Run:
    """What one run holds between steps (built by `set_up`)."""

    cfg: TrainConfig
    accelerator: object
    family: Family
    plan: RunPlan
    out_dir: Path
    denoiser: torch.nn.Module  # prepared (wrapped) for training
    text_encoders: list  # the live ones (prepared when trained); [] when their outputs are cached
    encode: PromptEncoder
    vae: torch.nn.Module
    scheduler: object  # the training noise scheduler
    make_batch: BatchMaker
    optimizer: object
    lr_scheduler: object
    params: list  # every trained tensor, for clipping
    adapted: dict  # {file prefix: model} of the adapted models
    pivotal: PivotalTokens | None
    ema: AdapterEMA | None
    tokens: dict  # pivotal tuning's {abstraction: new tokens}
    validation_prompts: list[str]
    max_steps: int
    ti_steps: int  # pivotal tuning: the new tokens train for the steps before this one
    weight_dtype: torch.dtype
    loss_settings: dict  # the family's loss settings from the config (`Family.loss_settings`)
    sharded: bool = False  # the denoiser is split over the processes (FSDP2): every process joins its forwards
    step: int = 0
    last_checkpoint: Path | None = None
    logs: dict = field(default_factory=dict)


def train(cfg: TrainConfig) -> Path:
    """Train an adapter as `cfg` says; returns the adapter file's path. The run folder is locked
    for the whole run: a second trainer (or export) into it stops with one line."""
    out_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, out_dir)
    with run_folder_lock(accelerator, check_output_dir(cfg)):
        return run_training(cfg, accelerator, out_dir)


def run_training(cfg: TrainConfig, accelerator, out_dir: Path) -> Path:
    """The run itself, its folder locked by `train` (the bar closes before an error is printed,
    so the error stands on its own line)."""
    run = set_up(cfg, accelerator, out_dir)
    run.denoiser.train()
    for te in run.text_encoders:
        te.train()
    progress = Progress(accelerator.is_main_process)
    with tqdm(total=run.max_steps, initial=run.step, desc="train",
              disable=not accelerator.is_local_main_process) as bar, StopRequest() as stop:
        while run.step < run.max_steps:
            run.logs = train_step(run, run.step)
            run.step = step = run.step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{run.logs['loss']:.4f}")
            accelerator.log(run.logs, step=step)
            progress.step(step, run.max_steps, run.logs)
            stopping = step < run.max_steps and stop.requested(accelerator)
            if (step % cfg.checkpointing_steps == 0 or stopping) and step < run.max_steps:
                with saving(f"checkpoint-{step}", run.last_checkpoint):
                    run.last_checkpoint = save_checkpoint(accelerator, out_dir, step, cfg.checkpoints_total_limit,
                                                          run.plan.run_id, run.plan.record["settings"])
                progress.event("checkpoint", run.last_checkpoint, step)
            if stopping:  # SIGTERM: this step's checkpoint is written; resume continues from it
                raise TrainingStopped(step, run.max_steps, run.last_checkpoint)
            if cfg.validation_prompt and (step % cfg.validation_steps == 0 or step == run.max_steps):
                with saving(f"the validation grid of step {step}", run.last_checkpoint), \
                        run.ema.applied() if run.ema is not None else nullcontext():
                    validate(accelerator, run.family, run.denoiser, run.vae, run.scheduler.config, run.encode,
                             run.text_encoders, run.validation_prompts, step, out_dir,
                             num_images=cfg.num_validation_images, seed=cfg.seed,
                             steps=cfg.validation_inference_steps, resolution=cfg.resolution,
                             guidance_scale=run.family.validation_guidance(cfg),
                             everyone=run.sharded)
                progress.event("validation", out_dir / "validation" / f"step-{step:06d}.png", step)
    path = finish(run)
    progress.event("adapter", path, run.step)
    return path


def train_step(run: Run, step: int) -> dict:
    """Optimiser step `step` (0-based): each micro-batch's loss from the family's prediction and
    target, backward, and at the last one clip and step; returns the step's logs."""
    cfg, accelerator = run.cfg, run.accelerator
    device = accelerator.device
    if run.pivotal is not None:
        run.pivotal.train_rows(step < run.ti_steps)
    for micro in range(cfg.gradient_accumulation_steps):
        micro_step = step * cfg.gradient_accumulation_steps + micro
        torch.manual_seed(step_rng(cfg.seed, micro_step, accelerator.process_index, 2).getrandbits(63))
        with accelerator.accumulate(run.denoiser):
            batch = run.make_batch(micro_step)
            cond, pooled = run.encode(batch.captions)
            cond = cond.to(device, run.weight_dtype)
            pooled = None if pooled is None else pooled.to(device, run.weight_dtype)
            pred, target, weights = run.family.loss_inputs(run.denoiser, run.scheduler, batch, cond, pooled,
                                                           **run.loss_settings)
            loss, parts = diffusion_loss(pred, target, num_prior=batch.num_prior,
                                         prior_loss_weight=cfg.prior_loss_weight, weights=weights, mask=batch.masks)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = clip_gradients(run, loss, step)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    return {"loss": float(loss.detach()), "lr": run.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
            **{k: float(v) for k, v in parts.items()}}


def clip_gradients(run: Run, loss: torch.Tensor, step: int) -> float:
    """Average the new tokens' gradients over processes (they are in no DDP wrapper), clip every
    trained tensor's; stop on a NaN / inf loss or gradient. Returns the norm before clipping."""
    cfg, accelerator = run.cfg, run.accelerator
    if run.pivotal is not None and accelerator.num_processes > 1:
        for p in run.pivotal.parameters():
            if p.grad is not None:
                p.grad = accelerator.reduce(p.grad, "mean")
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    if run.sharded:  # sharded and whole (text-encoder adapters) gradients together
        from .sharding import clip_grad_norm

        grad_norm = float(clip_grad_norm(run.params, max_norm))
    else:
        grad_norm = float(accelerator.clip_grad_norm_(run.params, max_norm))
    if not math.isfinite(grad_norm) or not math.isfinite(float(loss.detach())):
        where = (f"the last good checkpoint is {run.last_checkpoint}" if run.last_checkpoint
                 else "no checkpoint was saved yet")
        raise TrainingError(f"loss or gradients became NaN/inf at step {step + 1}; stopped, {where}; lower "
                            "learning_rate or try mixed_precision 'no'")
    return grad_norm


def prepare_data(cfg: TrainConfig, accelerator):
    """The data and the run folder's plan (a new run, this run resumed, another replaced), all
    before any model loads: (sets, examples, order, plan, tokens, buckets, max_steps)."""
    sets = cfg.subject_sets()
    examples, order = load_subject_sets(sets, cfg)
    plan = plan_run(cfg, fingerprint_examples(examples))
    tokens = pivotal_tokens(cfg, examples)
    examples = [replace(ex, caption=insert_tokens(ex.caption, tokens)) for ex in examples]
    buckets = example_buckets(cfg, examples, accelerator.print)
    global_batch = cfg.train_batch_size * accelerator.num_processes
    micro_per_epoch = micro_steps_per_epoch(len(order), global_batch,
                                            None if buckets is None else tuple(buckets[i] for i in order))
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    clashes = plan.clashes(checkpoint_step(plan.resume[0]) if plan.resume else 0, max_steps, cfg.checkpointing_steps)
    if clashes:  # another run's checkpoint where this one would save: never replaced
        raise ConfigError(f"{clashes[0]} was written by another run and this run would save its own checkpoint "
                          f"there; it is never replaced: move it away, or resume with max_train_steps <= "
                          f"{checkpoint_step(clashes[0])} or another checkpointing_steps")
    return sets, examples, order, plan, tokens, buckets, max_steps


def prior_examples(cfg: TrainConfig, accelerator, sets: list, model_path: str) -> list[Example]:
    """Prior preservation's class images (drawn by the main process where missing), [] without it."""
    class_examples: list[Example] = []
    if not cfg.with_prior_preservation:
        return class_examples
    class_sets = list(dict.fromkeys((s.class_data_dir, s.class_prompt, s.num_class_images) for s in sets))
    if accelerator.is_main_process:
        for folder, prompt, count in class_sets:
            ensure_class_images(folder, prompt, count, model_path, cfg.sample_batch_size,
                                cfg.prior_generation_precision, cfg.revision, cfg.variant, accelerator.device,
                                cfg.seed, vae_path=cfg.pretrained_vae_model_name_or_path)
    accelerator.wait_for_everyone()
    for folder, prompt, count in class_sets:
        class_examples += load_image_folder(folder, prompt)[:count]
    return class_examples


def build_caches(cfg: TrainConfig, encode: PromptEncoder, frozen: bool, vae, examples, class_examples, buckets,
                 prompts, device):
    """`frozen` text encoders: every caption's embedding once, the encoders leave the device.
    `cache_latents`: the latents of every picture (and flip) once. Returns the latent cache or None."""
    texts = sorted({ex.caption for ex in examples + class_examples}) + prompts + [""]
    if frozen:
        encode.freeze(texts)
    elif not cfg.enable_t5_ti:  # the family's never-trained encoders (FLUX.1's T5) once; T5 rows train: live
        encode.fix(texts)
    if not cfg.cache_latents:
        return None
    if not cfg.center_crop:
        warnings.warn("cache_latents uses center crops (random crops would need one latent per crop)", stacklevel=2)
    flips = (False, True) if cfg.random_flip else (False,)
    if buckets is None:
        return cache_latents(vae, examples + class_examples, cfg.resolution, flips, device, vae.dtype)
    # each subject image in its bucket; class images when a batch of a bucket first needs them
    return cache_latents(vae, examples, buckets, flips, device, vae.dtype, buckets=True)


def set_up(cfg: TrainConfig, accelerator, out_dir: Path) -> Run:
    """Everything before the first step: data, the family's components (frozen, compute dtype),
    adapters (fp32), caches, optimiser and schedule, the run folder's record, a resumed state."""
    from diffusers.optimization import get_scheduler

    sets, examples, order, plan, tokens, buckets, max_steps = prepare_data(cfg, accelerator)
    model_path = resolve_model(cfg.pretrained_model_name_or_path)
    family = family_of(model_path, cfg.revision)
    try:
        family.check_settings(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    class_examples = prior_examples(cfg, accelerator, sets, model_path)

    # ---- models: frozen parts in the compute dtype, adapters in fp32
    parts = family.load_components(model_path, cfg.revision, cfg.variant, cfg.pretrained_vae_model_name_or_path,
                                   prediction_type=cfg.prediction_type)
    tokenizers, text_encoders, vae, unet = parts.tokenizers, parts.text_encoders, parts.vae, parts.denoiser
    for abstraction in tokens:
        if family.knows_word(tokenizers, abstraction):
            warnings.warn(f"token_abstraction {abstraction!r} is an ordinary word the text encoder knows: every prompt "
                          f"that says {abstraction!r} (also when using the adapter later) gets the new tokens in its "
                          "place; a made-up identifier such as TOK avoids that", stacklevel=2)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    # fp16 overflows in the stock SD/SDXL VAEs: fp32 unless a VAE made for fp16 was given
    fp16_unsafe_vae = weight_dtype == torch.float16 and not cfg.pretrained_vae_model_name_or_path
    vae.requires_grad_(False).to(device, dtype=torch.float32 if fp16_unsafe_vae else weight_dtype)
    # the adapters' initial values from the seed alone: what ran before may have drawn from or reset
    # the global generator (building `embedded:tiny-random` on first use does), and a rerun must not differ
    torch.manual_seed(cfg.seed)
    adapted = attach_adapters(cfg, family, unet, text_encoders, device, weight_dtype)
    sharded = getattr(accelerator, "shard_denoiser", False)
    if sharded:  # before any parameter list is taken: sharding replaces the parameters
        from .sharding import shard

        shard(unet)
    pivotal = None
    if tokens:
        try:
            pivotal = PivotalTokens(tokenizers, text_encoders, tokens, cfg.initializer_concept, cfg.seed,
                                    family.pivotal_keys(cfg))
        except ValueError as err:
            raise ConfigError(str(err)) from None

    # ---- caches: prompts (frozen text encoders), latents (frozen VAE)
    encode = PromptEncoder(family, tokenizers, text_encoders, **family.prompt_settings(cfg))
    validation_prompts = [insert_tokens(p, tokens)
                          for p in cfg.validation_prompt or list(dict.fromkeys(s.instance_prompt for s in sets))]
    frozen = not cfg.train_text_encoder and pivotal is None
    latent_cache = build_caches(cfg, encode, frozen, vae, examples, class_examples, buckets, validation_prompts, device)
    if frozen:
        text_encoders = parts.text_encoders = []
        gc.collect()
    else:
        text_encoders = encode.text_encoders  # without the never-trained ones

    # ---- optimiser and schedule
    global_batch = cfg.train_batch_size * accelerator.num_processes
    lr_factor = global_batch * cfg.gradient_accumulation_steps if cfg.scale_lr else 1
    groups = parameter_groups(cfg, unet, text_encoders, lr_factor)
    adapter_params = [p for g in groups for p in g["params"]]
    if pivotal is not None:  # the new tokens' rows: the text encoder's learning rate and decay
        decay_te = cfg.adam_weight_decay_text_encoder
        groups.append({"params": pivotal.parameters(), "lr": (cfg.text_encoder_lr or cfg.learning_rate) * lr_factor,
                       "weight_decay": cfg.adam_weight_decay if decay_te is None else decay_te})
    optimizer = build_optimizer(cfg, groups)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=cfg.lr_num_cycles, power=cfg.lr_power)
    trained_te = text_encoders if cfg.train_text_encoder else []  # with pivotal tuning alone: not wrapped
    owner = None
    if sharded:  # the denoiser sharded by us, not wrapped; the optimizer's state is saved whole by our hooks
        from .sharding import state_owner

        owner = state_owner(unet, adapted)
        *trained_te, optimizer, lr_scheduler = accelerator.prepare(*trained_te, optimizer, lr_scheduler)
        accelerator._optimizers.remove(optimizer)
    else:
        unet, *trained_te, optimizer, lr_scheduler = accelerator.prepare(unet, *trained_te, optimizer, lr_scheduler)
    if cfg.train_text_encoder:
        text_encoders = encode.text_encoders = trained_te  # the prepared (wrapped) ones
    register_adapter_hooks(accelerator, adapted, pivotal,
                           sharded=(unet, owner, optimizer.optimizer) if sharded else None)
    ema = AdapterEMA(adapter_params, cfg.ema_decay) if cfg.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # saved and resumed with the checkpoints

    # ---- the run folder's first write comes after the models loaded
    if accelerator.is_main_process:
        with saving(f"the run record in {out_dir}", None):
            start_run(plan)
        for message in plan.messages:
            accelerator.print(message)
    accelerator.wait_for_everyone()
    step, last_checkpoint = resume(accelerator, plan)
    accelerator.print(f"processes: {accelerator.num_processes}, distributed: {accelerator.distributed_type}")
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("dreambooth-dora", config={k: str(v) for k, v in asdict(cfg).items()})
    make_batch = BatchMaker.from_settings(
        cfg, examples, class_examples, order, num_processes=accelerator.num_processes,
        process_index=accelerator.process_index, vae=vae, latent_cache=latent_cache, device=device, dtype=weight_dtype,
        draw=partial(family.draw_noise, scheduler=parts.scheduler, **family.noise_settings(cfg)), buckets=buckets,
        latent_space=family.vae_latents, vae_mode=family.vae_mode)
    return Run(cfg=cfg, accelerator=accelerator, family=family, plan=plan, out_dir=out_dir, denoiser=unet,
               text_encoders=text_encoders, encode=encode, vae=vae, scheduler=parts.scheduler, make_batch=make_batch,
               optimizer=optimizer, lr_scheduler=lr_scheduler, params=[p for g in groups for p in g["params"]],
               adapted=adapted, pivotal=pivotal, ema=ema, tokens=tokens, validation_prompts=validation_prompts,
               max_steps=max_steps, ti_steps=max(1, int(cfg.train_text_encoder_ti_frac * max_steps)),
               weight_dtype=weight_dtype, loss_settings=family.loss_settings(cfg), sharded=sharded, step=step,
               last_checkpoint=last_checkpoint)


def finish(run: Run) -> Path:
    """The adapter (EMA weights where kept), its embeddings, settings and model card. The settings
    beside the adapter are the ones that made it: the old ones go first, the new ones come after
    the adapter, so a kill in between leaves none, never wrong ones."""
    cfg, accelerator, out_dir = run.cfg, run.accelerator, run.out_dir
    accelerator.wait_for_everyone()
    path = out_dir / "pytorch_lora_weights.safetensors"
    if accelerator.is_main_process:
        info = AdapterInfo(
            method="dora" if cfg.use_dora else "lora", rank=cfg.rank, lora_alpha=cfg.lora_alpha,
            base_model=cfg.pretrained_model_name_or_path, instance_prompt=cfg.instance_prompt,
            class_prompt=cfg.class_prompt if cfg.with_prior_preservation else None, steps=run.step,
            train_text_encoder=cfg.train_text_encoder, architecture=run.family.name,
            final_loss=run.logs.get("loss"), run_id=run.plan.run_id, settings=asdict(cfg), tokens=run.tokens or None)
        with saving(f"the adapter in {out_dir}", run.last_checkpoint):
            for name in (TRAIN_CONFIG, "README.md"):
                (out_dir / name).unlink(missing_ok=True)
            if run.pivotal is not None:  # before the adapter that names them
                run.pivotal.save(out_dir)
            with run.ema.applied() if run.ema is not None else nullcontext():
                path = save_adapter(out_dir, run.adapted, info)
            write_text(out_dir / TRAIN_CONFIG, json.dumps(asdict(cfg), indent=2))
            write_text(out_dir / "README.md", model_card(cfg, info, run.family.card_call(cfg, run.encode.tokenizers)))
    elif run.sharded:
        save_adapter(out_dir, run.adapted, {}, write=False)  # join the main process's gathering of the shards
    accelerator.end_training()
    return path
