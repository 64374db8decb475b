"""DoRA-aware optimiser settings and caption dropout: parameter groups by role, the ablations
(`dora_train`), and captions dropped by their own keyed generator."""

import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_dora.adapters.inject import add_adapters, adapted_layers
from dreambooth_dora.training.config import ConfigError, load_config
from dreambooth_dora.training.data import BatchMaker, Example
from dreambooth_dora.training.loop import parameter_groups, train
from conftest import ddpm_draw, interrupt_at

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def cfg(*flags):
    return load_config(["--instance_data_dir", str(REPO / "sample_data" / "3d_icon"), "--instance_prompt", "a sks icon",
                        "--learning_rate", "1e-3", "--adam_weight_decay", "0.01", *flags])


def two_layer_models():
    unet = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    te = torch.nn.Sequential(torch.nn.Linear(6, 6))
    add_adapters(unet, ["0", "1"], rank=2)
    add_adapters(te, ["0"], rank=2)
    return unet, te


def test_parameter_groups_by_role():
    unet, te = two_layer_models()
    plain = parameter_groups(cfg(), unet, [te], 1.0)
    assert len(plain) == 1 and len(plain[0]["params"]) == 6 and "weight_decay" not in plain[0]  # as before
    groups = parameter_groups(cfg("--magnitude_lr", "1e-4", "--magnitude_weight_decay", "0", "--loraplus_lr_ratio", "16",
                                  "--train_text_encoder", "--text_encoder_lr", "5e-4"), unet, [te], 2.0)
    layers = [layer for _, layer in adapted_layers(unet)]
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for layer in layers:  # A at the adapter's lr, B x16, the magnitude its own (x the batch factor 2)
        assert by_id[id(layer.lora_A.weight)] == (2e-3, 0.01)
        assert by_id[id(layer.lora_B.weight)] == (pytest.approx(16 * 2e-3), 0.01)
        assert by_id[id(layer.lora_magnitude_vector)] == (2e-4, 0.0)
    te_layer = next(layer for _, layer in adapted_layers(te))
    assert by_id[id(te_layer.lora_A.weight)] == (1e-3, 0.01) and by_id[id(te_layer.lora_magnitude_vector)][0] == 2e-4
    assert len(by_id) == 9 and sum(len(g["params"]) for g in groups) == 9

    unet, te = two_layer_models()
    groups = parameter_groups(cfg("--dora_train", "magnitude"), unet, [te], 1.0)
    kept = {id(p) for g in groups for p in g["params"]}
    for _, layer in adapted_layers(unet):
        assert kept >= {id(layer.lora_magnitude_vector)} and id(layer.lora_A.weight) not in kept
        assert not layer.lora_A.weight.requires_grad and not layer.lora_B.weight.requires_grad


@pytest.mark.parametrize("part", ["magnitude", "direction"])
def test_dora_train_ablations(part, tiny_sd_path, icon_dir, tmp_path):
    out = tmp_path / part
    train(load_config(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir", str(icon_dir),
                       "--instance_prompt", "a sks icon", "--resolution", "64", "--learning_rate", "1e-2",
                       "--max_train_steps", "3", "--output_dir", str(out), "--report_to", "none",
                       "--dora_train", part]))
    tensors = load_file(str(out / "pytorch_lora_weights.safetensors"))
    from dreambooth_dora.families import load_components

    unet = load_components(str(tiny_sd_path)).denoiser
    mags = {k: v for k, v in tensors.items() if k.endswith("lora_magnitude_vector")}
    norms = {k: unet.get_submodule(k[len("unet."):-len(".lora_magnitude_vector")]).weight.flatten(1).norm(dim=1)
             for k in mags}
    moved = max((mags[k] - norms[k]).abs().max().item() for k in mags)
    b_max = max(v.abs().max().item() for k, v in tensors.items() if k.endswith("lora_B.weight"))
    if part == "magnitude":  # the direction stays the base weight's: B = 0
        assert b_max == 0.0 and moved > 1e-4
    else:  # the magnitudes stay the base weight's row norms
        assert moved <= 1e-6 and b_max > 1e-4
    assert f"trains the {part} only" in (out / "README.md").read_text()


def test_caption_dropout_draws_from_its_own_generator():
    examples = [Example(None, f"a sks icon {i}") for i in range(4)]
    classes = [Example(None, "an icon")]
    cache = {(i, False): (torch.full((1, 4, 2, 2), float(i)), torch.ones(1, 4, 2, 2), (8, 8, 0, 0)) for i in range(5)}
    vae = types.SimpleNamespace(config=types.SimpleNamespace(scaling_factor=1.0), dtype=torch.float32)

    def maker(rate):
        return BatchMaker(examples, classes, seed=3, batch_size=2, num_processes=1, process_index=0, order=[0, 1, 2, 3],
                          resolution=16, center_crop=True, random_flip=False,
                          caption_dropout_rate=rate, draw=ddpm_draw(), vae=vae, latent_cache=cache,
                          device=torch.device("cpu"), dtype=torch.float32)

    batches = {rate: [maker(rate)(k) for k in range(40)] for rate in (0.0, 0.5, 1.0)}
    for a, b, c in zip(*batches.values()):  # the same examples, noise and timesteps whatever the rate
        assert torch.equal(a.latents, b.latents) and torch.equal(a.noise, c.noise) and torch.equal(a.timesteps, b.timesteps)
        assert c.captions[:2] == ["", ""] and c.captions[2:] == ["an icon"] * 2  # class captions are kept
        assert "" not in a.captions
    dropped = sum(cap == "" for b in batches[0.5] for cap in b.captions[:2])
    assert 25 <= dropped <= 55  # about half of 80


def test_dora_settings_are_checked():
    with pytest.raises(ConfigError, match="dora_train applies to DoRA"):
        cfg("--use_dora", "false", "--dora_train", "magnitude")
    with pytest.raises(ConfigError, match="magnitude_lr applies to DoRA"):
        cfg("--use_dora", "false", "--magnitude_lr", "1e-4")
    with pytest.raises(ConfigError, match="dora_train must be one of"):
        cfg("--dora_train", "neither")
    with pytest.raises(ConfigError, match=r"caption_dropout_rate must be in \[0, 1\]"):
        cfg("--caption_dropout_rate", "1.5")
    with pytest.raises(ConfigError, match="loraplus_lr_ratio must be > 0"):
        cfg("--loraplus_lr_ratio", "0")


def ema_flags(tiny_sd_path, icon_dir, out, *extra):
    return ["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir", str(icon_dir),
            "--instance_prompt", "a sks icon", "--resolution", "64", "--learning_rate", "2e-2", "--max_train_steps", "4",
            "--output_dir", str(out), "--report_to", "none", "--use_ema", "--ema_decay", "0.5", "--seed", "2", *extra]


def test_ema_is_the_hand_computed_average_and_resumes_exactly(tiny_sd_path, icon_dir, tmp_path, monkeypatch):
    import dreambooth_dora.training.loop as train_module
    from dreambooth_dora.training.ema import AdapterEMA

    seen = []

    class Recording(AdapterEMA):
        def __init__(self, params, decay):
            super().__init__(params, decay)
            seen.append([p.detach().float().clone() for p in self.params])  # the initial adapter

        def update(self):
            seen.append([p.detach().float().clone() for p in self.params])  # raw weights after the step
            super().update()

    monkeypatch.setattr(train_module, "AdapterEMA", Recording)
    path = train(load_config(ema_flags(tiny_sd_path, icon_dir, tmp_path / "full", "--checkpointing_steps", "2")))
    monkeypatch.undo()
    hand = [t.clone() for t in seen[0]]
    for k, raw in enumerate(seen[1:], start=1):  # ema = d_k ema + (1 - d_k) raw, d_k = min(0.5, k / (9 + k))
        d = min(0.5, k / (9 + k))
        hand = [d * h + (1 - d) * r for h, r in zip(hand, raw)]
    assert len(seen) == 5
    saved = load_file(str(path))
    from dreambooth_dora.families import load_components

    unet = load_components(str(tiny_sd_path)).denoiser
    add_adapters(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4)
    keys = [f"unet.{name}.{kind}" for name, _ in adapted_layers(unet)
            for kind in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")]
    assert len(keys) == len(hand)
    for key, value in zip(keys, hand):
        assert torch.allclose(saved[key], value.reshape(saved[key].shape), atol=1e-6), key
    assert not torch.allclose(saved[keys[1]], seen[-1][1].reshape(saved[keys[1]].shape))  # not the raw weights
    raw_ckpt = load_file(str(tmp_path / "full" / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    assert torch.allclose(raw_ckpt[keys[1]], seen[2][1].reshape(raw_ckpt[keys[1]].shape))  # checkpoints keep raw

    # killed after checkpoint-2, resumed: the same average as the uninterrupted run
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(ema_flags(tiny_sd_path, icon_dir, tmp_path / "resumed", "--checkpointing_steps", "2")))
    monkeypatch.undo()
    resumed = load_file(str(train(load_config(ema_flags(tiny_sd_path, icon_dir, tmp_path / "resumed",
                                                       "--checkpointing_steps", "2",
                                                       "--resume_from_checkpoint", "latest")))))
    for key in saved:
        assert torch.allclose(saved[key], resumed[key], atol=1e-6), key


# ---- masked loss ------------------------------------------------------------------------------

def test_masked_loss_is_the_mask_weighted_mean():
    from dreambooth_dora.training.losses import diffusion_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    mask = (torch.rand(3, 1, 5, 5, generator=g) > 0.5).float() * 0.7
    mask[2] = 1.0  # the prior example: unmasked
    loss, parts = diffusion_loss(pred, target, num_prior=1, prior_loss_weight=0.5, mask=mask)
    err = (pred - target) ** 2
    by_hand = [float((err[i] * mask[i]).sum() / (4 * mask[i].sum())) for i in range(3)]
    assert float(parts["loss_instance"]) == pytest.approx((by_hand[0] + by_hand[1]) / 2, rel=1e-6)
    assert float(parts["loss_prior"]) == pytest.approx(float(err[2].mean()), rel=1e-6)
    assert float(loss) == pytest.approx((by_hand[0] + by_hand[1]) / 2 + 0.5 * float(err[2].mean()), rel=1e-6)
    plain, _ = diffusion_loss(pred, target, num_prior=1, prior_loss_weight=0.5)
    ones, _ = diffusion_loss(pred, target, num_prior=1, prior_loss_weight=0.5, mask=torch.ones(3, 1, 5, 5))
    assert torch.allclose(plain, ones)


def rgba_subject_folder(folder, n=3):
    """Pictures of a red square (opaque) on a transparent field, at varying places and sizes."""
    from PIL import Image as PILImage

    folder.mkdir(parents=True)
    for i in range(n):
        im = PILImage.new("RGBA", (48 + 8 * i, 40), (0, 0, 255, 0))
        im.paste((255, 0, 0, 255), (4 + 5 * i, 6, 24 + 5 * i, 30))
        im.save(folder / f"s{i}.png")
    return folder


def test_masks_from_alpha_or_a_folder_follow_the_crop_and_flip(tmp_path):
    import random

    import numpy as np

    from dreambooth_dora.training.data import DataError, load_examples, mask_view, training_view

    data = rgba_subject_folder(tmp_path / "data")
    examples = load_examples(str(data), default_caption="x", masked=True)
    assert all(ex.mask is not None and ex.mask.size == ex.image.size for ex in examples)
    for ex in examples:  # random crops and flips: the mask is white exactly where the subject is red
        for seed in range(4):
            rng = random.Random(seed)
            state = rng.getstate()
            pixels, _ = training_view(ex.image, 32, False, seed % 2 == 1, rng)
            rng.setstate(state)
            mask = mask_view(ex.mask, 32, False, seed % 2 == 1, rng)[0].numpy()
            red = ((pixels[0] > 0.5) & (pixels[2] < -0.5)).numpy()
            assert np.abs((mask > 0.5) != red).mean() < 0.05
    masks = tmp_path / "masks"
    masks.mkdir()
    from PIL import Image as PILImage

    for ex in examples[:2]:
        PILImage.new("L", ex.image.size, 255).save(masks / (ex.name.rsplit(".", 1)[0] + ".jpg"))
    with pytest.raises(DataError, match=r"masked_loss: no mask in .* for 1 image\(s\) .*s2.png"):
        load_examples(str(data), default_caption="x", masked=True, mask_data_dir=str(masks))
    PILImage.new("L", (32, 20), 128).save(masks / "s2.png")  # half the image's size, its shape: scaled
    with pytest.warns(UserWarning, match=r"1 mask\(s\) .* are scaled to their image's size \(same shape\): "
                                         r"s2.png \(32x20 -> 64x40\)"):
        loaded = load_examples(str(data), default_caption="x", masked=True, mask_data_dir=str(masks))
    assert loaded[0].mask.getextrema() == (255, 255) and loaded[2].mask.size == loaded[2].image.size
    opaque = tmp_path / "opaque"
    opaque.mkdir()
    PILImage.new("RGB", (32, 32), "red").save(opaque / "a.png")
    with pytest.raises(DataError, match="no alpha channel; give mask_data_dir"):
        load_examples(str(opaque), default_caption="x", masked=True)


def test_new_features_keep_resume_and_accumulation_exact(tiny_sd_path, tmp_path, monkeypatch):
    """Masked loss, caption dropout, EMA, LoRA+ and a magnitude learning rate all on: a resumed
    run ends with the uninterrupted run's adapter, and accumulation equals the larger batch."""
    import dreambooth_dora.training.loop as train_module

    data = rgba_subject_folder(tmp_path / "data")

    def run(name, *extra):
        return train(load_config(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir",
                                  str(data), "--instance_prompt", "a sks icon", "--resolution", "32",
                                  "--learning_rate", "1e-2", "--max_train_steps", "4", "--output_dir",
                                  str(tmp_path / name), "--report_to", "none", "--masked_loss", "--random_flip",
                                  "--caption_dropout_rate", "0.5", "--use_ema", "--ema_decay", "0.9",
                                  "--loraplus_lr_ratio", "4", "--magnitude_lr", "5e-3", "--checkpointing_steps", "2",
                                  *extra]))

    full = load_file(str(run("full")))
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.undo()
    resumed = load_file(str(run("resumed", "--resume_from_checkpoint", "latest")))
    assert max((full[k] - resumed[k]).abs().max() for k in full) <= 1e-6
    big = load_file(str(run("big", "--train_batch_size", "2")))
    acc = load_file(str(run("acc", "--train_batch_size", "1", "--gradient_accumulation_steps", "2")))
    # float summation order, magnified by Adam's first steps as in test_train's accumulation test
    # (2e-4 at lr 1e-2); B's learning rate is 4x here (LoRA+ ratio 4): 8e-4 on one machine class,
    # 9e-4 on another (its kernels sum in another order), so 2e-3; training on other examples
    # (batch 1 without accumulation) is measured here to differ by far more
    gap = max((big[k] - acc[k]).abs().max() for k in big)
    assert gap <= 2e-3
    single = load_file(str(run("single", "--train_batch_size", "1")))
    assert max((big[k] - single[k]).abs().max() for k in big) > 5 * max(gap, 2e-3)
    plain = load_file(str(run("plain", "--caption_dropout_rate", "0", "--loraplus_lr_ratio", "1")))
    assert max((plain[k] - full[k]).abs().max() for k in full) > 1e-4  # the options do change training


# ---- several subjects in one run ---------------------------------------------------------------

def sets_yaml(tmp_path, body: str) -> Path:
    path = tmp_path / "sets.yaml"
    path.write_text(body)
    return path


def test_subject_sets_config(tmp_path):
    icon, lego = REPO / "sample_data" / "3d_icon", REPO / "sample_data" / "lego"
    good = sets_yaml(tmp_path, f"datasets:\n  - instance_data_dir: {icon}\n    instance_prompt: a sks icon\n"
                               f"  - instance_data_dir: {lego}\n    instance_prompt: a zwx brick\n    repeats: 2\n")
    c = load_config(["--config", str(good)])
    sets = c.subject_sets()
    assert [(s.instance_prompt, s.repeats) for s in sets] == [("a sks icon", 1), ("a zwx brick", 2)]
    assert c.instance_prompt == "a sks icon"  # the first set's, for the card and the default validation
    assert [s.instance_prompt for s in load_config(["--instance_data_dir", str(icon), "--instance_prompt", "x"])
            .subject_sets()] == ["x"]  # the single set of the top-level keys
    for body, message in [
        (f"instance_data_dir: {icon}\ndatasets:\n  - instance_data_dir: {lego}\n    instance_prompt: y\n", "not both"),
        (f"datasets:\n  - instance_data_dir: {lego}\n    instance_prompt: y\n    prompt: z\n", "unknown key"),
        (f"datasets:\n  - instance_data_dir: {lego}\n", r"datasets\[0\]: instance_prompt is not set"),
        (f"datasets:\n  - instance_data_dir: {lego}\n    instance_prompt: y\n    repeats: 1.5\n", "whole number"),
        (f"with_prior_preservation: true\ndatasets:\n  - instance_data_dir: {lego}\n    instance_prompt: y\n",
         "needs class_prompt and class_data_dir"),
        ("datasets: [a, b]\n", "datasets must be a list of dict"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(["--config", str(sets_yaml(tmp_path, body))])
    with pytest.raises(ConfigError, match="must be a list of mappings"):
        load_config(["--datasets", "a,b"])


def test_two_subjects_in_one_run(tiny_sd_path, tmp_path):
    from collections import Counter

    from dreambooth_dora.training.data import batch_indices
    from dreambooth_dora.training.loop import load_subject_sets

    icon, lego = REPO / "sample_data" / "3d_icon", REPO / "sample_data" / "lego"
    config = sets_yaml(tmp_path, f"""datasets:
  - instance_data_dir: {icon}
    instance_prompt: a sks icon
    class_prompt: an icon
    class_data_dir: {tmp_path / 'class_icon'}
  - instance_data_dir: {lego}
    instance_prompt: a zwx brick
    repeats: 2
    class_prompt: a brick
    class_data_dir: {tmp_path / 'class_brick'}
""")
    c = load_config(["--config", str(config), "--pretrained_model_name_or_path", str(tiny_sd_path),
                     "--resolution", "64", "--max_train_steps", "2", "--output_dir", str(tmp_path / "out"),
                     "--report_to", "none", "--with_prior_preservation", "--num_class_images", "1",
                     "--validation_prompt", "a sks icon|a zwx brick", "--validation_steps", "2",
                     "--validation_inference_steps", "1",
                     "--num_validation_images", "1", "--learning_rate", "1e-2"])
    examples, order = load_subject_sets(c.subject_sets(), c)
    n_icon = sum(ex.caption == "a sks icon" for ex in examples)
    n_lego = len(examples) - n_icon
    assert len(order) == n_icon + 2 * n_lego
    epoch = Counter(order[i] for i in batch_indices(len(order), len(order), 0, c.seed))  # one whole epoch
    assert all(epoch[i] == (1 if examples[i].caption == "a sks icon" else 2) for i in range(len(examples)))
    path = train(c)
    assert path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("class_")) == ["class_brick", "class_icon"]
    from PIL import Image as PILImage

    grid = PILImage.open(tmp_path / "out" / "validation" / "step-000002.png")
    assert grid.size[1] == 2 * 64 * 4  # one row per subject's prompt (64 px cells enlarged 4x)
    import json

    assert len(json.loads((tmp_path / "out" / "train_config.json").read_text())["datasets"]) == 2
