"""Aspect-ratio buckets: the bucket list, each picture's bucket, one bucket per batch, SDXL's size
conditioning from each picture's own size and crop, cached latents per bucket, and the
determinism guarantees (resume, N processes) with non-square pictures."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dreambooth_dora.training.buckets import assign, default_buckets
from dreambooth_dora.training.config import ConfigError, load_config
from dreambooth_dora.training.data import BatchMaker, Example, batches_per_epoch, bucket_epoch, cache_latents, training_view
from dreambooth_dora.training.loop import train
from conftest import ddpm_draw, interrupt_at, rgba_pictures

REPO = Path(__file__).resolve().parents[1]
SIZES = [(48, 32), (32, 48), (40, 40), (64, 24), (30, 45), (50, 33)]  # landscape, portrait, square, wide


def kohya_buckets(max_reso=512, min_size=256, max_size=1024, divisible=64):
    """kohya's `make_bucket_resolutions` with its defaults, written out from its description:
    the square, then every width from min_size to max_size with the tallest height that keeps the
    area, both orientations."""
    out, area = {(max_reso, max_reso)}, max_reso * max_reso
    for width in range(min_size, max_size + 1, divisible):
        height = min(max_size, area // width // divisible * divisible)
        if height >= min_size:
            out |= {(width, height), (height, width)}
    return out


def test_default_buckets_are_kohyas():
    assert set(default_buckets(512, 64)) == kohya_buckets()
    assert set(default_buckets(1024, 64)) == kohya_buckets(1024, 512, 2048)
    assert all(w * h <= 512 * 512 and w % 64 == 0 == h % 64 for w, h in default_buckets(512, 64))


def test_each_picture_goes_to_the_nearest_ratio_and_is_not_enlarged_past_the_bound():
    buckets = default_buckets(512, 64)
    assert assign((1024, 1024), buckets, 512, 64, None) == (512, 512)
    assert assign((2000, 1000), buckets, 512, 64, None) == (704, 320)  # log-ratio 0.69: 704/320 is 0.79, 640/384 0.51
    assert assign((1000, 2000), buckets, 512, 64, None) == (320, 704)
    assert assign((300, 200), buckets, 512, 64, None) == (640, 384)  # ratio 1.5: 1.67 is nearer than 1.29; 2.1x enlarged
    own = assign((300, 200), buckets, 512, 64, 1.25)
    assert own == (320, 192) and max(own[0] / 300, own[1] / 200) <= 1.25  # its own, smaller bucket
    assert assign((1200, 800), buckets, 512, 64, 1.0) == (640, 384)  # a large picture: no enlargement needed


def test_settings_are_checked():
    base = ["--instance_data_dir", str(REPO / "sample_data" / "3d_icon"), "--instance_prompt", "a sks icon"]
    for extra, message in [(["--bucket_sizes", "512x768"], "applies with aspect_buckets only"),
                           (["--aspect_buckets", "--bucket_step", "12"], "multiple of 8"),
                           (["--aspect_buckets", "--bucket_sizes", "512x700"], "multiples of bucket_step"),
                           (["--aspect_buckets", "--bucket_sizes", "512by768"], "WIDTHxHEIGHT"),
                           (["--aspect_buckets", "--bucket_max_upscale", "0.5"], ">= 1"),
                           (["--aspect_buckets", "--resolution", "32"], "gives no buckets")]:
        with pytest.raises(ConfigError, match=message):
            load_config(base + extra)
    cfg = load_config(base + ["--aspect_buckets", "--bucket_sizes", "768x512, 512x768,640x640"])
    assert cfg.buckets() == [(512, 768), (640, 640), (768, 512)]


def pictures(sizes=SIZES) -> list[Example]:
    rng = random.Random(0)
    return [Example(Image.new("RGB", s, tuple(rng.randrange(256) for _ in range(3))), f"a sks icon {i}")
            for i, s in enumerate(sizes)]


def test_every_global_batch_is_one_bucket_and_an_epoch_sees_every_picture():
    keys = tuple(assign(s, default_buckets(32, 8), 32, 8, None) for s in SIZES * 2)  # 12 positions
    for epoch in range(3):
        batches = bucket_epoch(keys, 4, 7, epoch)
        assert len(batches) == batches_per_epoch(keys, 4)
        assert all(len({keys[i] for i in b}) == 1 and len(b) == 4 for b in batches)
        assert set(i for b in batches for i in b) == set(range(12))
    assert bucket_epoch(keys, 4, 7, 0) != bucket_epoch(keys, 4, 7, 1)  # reshuffled per epoch


def maker(vae, examples, batch_size, processes, index, cache=None, **kw):
    buckets = [assign(ex.image.size, default_buckets(32, 8), 32, 8, None) for ex in examples]
    return BatchMaker(examples, [], seed=3, batch_size=batch_size, num_processes=processes, process_index=index,
                      order=list(range(len(examples))), resolution=32, center_crop=kw.get("center", False),
                      random_flip=True, caption_dropout_rate=0.0, draw=ddpm_draw(), vae=vae,
                      latent_cache=cache, device=torch.device("cpu"), dtype=torch.float32, buckets=buckets)


def test_two_processes_slice_the_global_batch_and_sizes_follow_each_picture(tiny_pipeline):
    vae, examples = tiny_pipeline.vae, pictures()
    buckets = [assign(ex.image.size, default_buckets(32, 8), 32, 8, None) for ex in examples]
    one = maker(vae, examples, 4, 1, 0)
    halves = [maker(vae, examples, 2, 2, i) for i in (0, 1)]
    for step in range(5):
        whole, parts = one(step), [h(step) for h in halves]
        assert torch.equal(whole.latents, torch.cat([p.latents for p in parts]))
        assert whole.captions == parts[0].captions + parts[1].captions
        (th, tw) = whole.latents.shape[-2:]
        for caption, ids in zip(whole.captions, whole.sizes):
            ex = examples[int(caption.rsplit(" ", 1)[1])]
            bw, bh = buckets[examples.index(ex)]
            # SDXL's size conditioning: the picture's own size, the crop in the resized picture, the bucket
            assert ids[:2].tolist() == [ex.image.height, ex.image.width] and ids[4:].tolist() == [bh, bw]
            assert (th, tw) == (bh // 2, bw // 2)  # the tiny VAE halves
    # a crop corner as training_view reports it lies inside the resized picture
    pixels, (oh, ow, top, left) = training_view(examples[0].image, (48, 32), False, False, random.Random(1))
    assert pixels.shape == (3, 32, 48) and (oh, ow) == (32, 48) and top == left == 0


def test_cached_latents_per_bucket_equal_uncached(tiny_pipeline):
    vae, examples = tiny_pipeline.vae, pictures()
    buckets = [assign(ex.image.size, default_buckets(32, 8), 32, 8, None) for ex in examples]
    cache = cache_latents(vae, examples, buckets, (False, True), "cpu", torch.float32, buckets=True)
    cached, live = maker(vae, examples, 2, 1, 0, cache), maker(vae, examples, 2, 1, 0, center=True)
    for step in range(4):
        a, b = cached(step), live(step)
        assert torch.allclose(a.latents, b.latents, atol=1e-5) and torch.equal(a.sizes, b.sizes)


def test_default_square_path_is_unchanged(tiny_pipeline):
    """Without buckets the batch maker draws exactly what it drew before buckets existed."""
    from dreambooth_dora.training.data import batch_indices

    vae, examples = tiny_pipeline.vae, pictures()
    square = BatchMaker(examples, [], 3, 2, 1, 0, list(range(6)), 32, False, True, 0.0, ddpm_draw(), vae, None,
                        torch.device("cpu"), torch.float32)
    batch = square(2)
    picked = [examples[i] for i in batch_indices(6, 2, 2, 3)]
    assert batch.captions == [ex.caption for ex in picked] and batch.latents.shape[-2:] == (16, 16)


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    src = sorted((REPO / "sample_data" / "3d_icon").glob("*.png"))
    for i, size in enumerate([(48, 32), (32, 48), (48, 32), (40, 40)]):
        Image.open(src[i % len(src)]).convert("RGB").resize(size).save(folder / f"{i}.png")
    return folder


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_resume_equals_uninterrupted_with_buckets(tiny_sd_path, mixed_folder, tmp_path, monkeypatch):
    import dreambooth_dora.training.loop as train_module

    def run(name, *extra):
        return train(load_config(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir",
                                  str(mixed_folder), "--instance_prompt", "a sks icon", "--resolution", "32",
                                  "--aspect_buckets", "--bucket_step", "8", "--random_flip", "--train_batch_size", "2",
                                  "--learning_rate", "1e-2", "--max_train_steps", "4", "--checkpointing_steps", "2",
                                  "--output_dir", str(tmp_path / name), "--report_to", "none", *extra]))

    full = load_file(str(run("full")))
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.undo()
    resumed = load_file(str(run("resumed", "--resume_from_checkpoint", "latest")))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    square = load_file(str(run("square", "--aspect_buckets", "false")))
    assert max((square[k] - full[k]).abs().max() for k in full) > 1e-4  # buckets do change what is trained
    cached = load_file(str(run("cached", "--cache_latents", "--random_flip", "false")))
    assert all(torch.isfinite(v).all() for v in cached.values())


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_sdxl_and_prior_preservation_with_buckets(tiny_sdxl_path, mixed_folder, tmp_path):
    """Class images take the bucket of the batch they join (cached lazily per bucket); SDXL trains
    on non-square latents with its size conditioning."""
    classes = tmp_path / "classes"
    classes.mkdir()
    for i, p in enumerate(sorted((REPO / "sample_data" / "lego").glob("*.png"))[:2]):
        Image.open(p).convert("RGB").save(classes / f"{i}.png")
    before = sorted(p.name for p in classes.iterdir())
    path = train(load_config(["--pretrained_model_name_or_path", str(tiny_sdxl_path), "--instance_data_dir",
                              str(mixed_folder), "--instance_prompt", "a sks icon", "--resolution", "32",
                              "--aspect_buckets", "--bucket_step", "8", "--train_batch_size", "2", "--max_train_steps",
                              "3", "--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt",
                              "a toy", "--num_class_images", "2", "--cache_latents", "--output_dir",
                              str(tmp_path / "xl"), "--report_to", "none"]))
    adapter = load_file(str(path))
    assert adapter and all(torch.isfinite(v).all() for v in adapter.values())
    assert sorted(p.name for p in classes.iterdir()) == before  # enough class images: none generated


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_sdxl_with_every_option_resumes_exactly(tiny_sdxl_path, tmp_path, monkeypatch):
    """SDXL with pivotal tuning, aspect buckets on non-square RGBA pictures, masked loss from their
    alpha, EMA, LoRA+, a magnitude learning rate and caption dropout: a resumed run ends with the
    uninterrupted run's adapter and tokens."""
    import dreambooth_dora.training.loop as train_module

    data = rgba_pictures(tmp_path / "rgba", [(48, 32), (32, 48), (48, 32), (40, 40)])

    def run(name, *extra):
        return train(load_config(["--pretrained_model_name_or_path", str(tiny_sdxl_path), "--instance_data_dir",
                                  str(data), "--instance_prompt", "a TOK icon", "--resolution", "32",
                                  "--train_text_encoder_ti", "--aspect_buckets", "--bucket_step", "8", "--masked_loss",
                                  "--use_ema", "--ema_decay", "0.9", "--loraplus_lr_ratio", "4", "--magnitude_lr",
                                  "5e-3", "--caption_dropout_rate", "0.3", "--random_flip", "--train_batch_size", "2",
                                  "--learning_rate", "1e-2", "--max_train_steps", "4", "--checkpointing_steps", "2",
                                  "--output_dir", str(tmp_path / name), "--report_to", "none", *extra]))

    run("full")
    interrupt_at(monkeypatch, train_module, 3)
    with pytest.raises(KeyboardInterrupt):
        run("resumed")
    monkeypatch.undo()
    run("resumed", "--resume_from_checkpoint", "latest")
    for name in ("pytorch_lora_weights.safetensors", "embeddings.safetensors"):
        full, resumed = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "resumed" / name))
        assert set(full) == set(resumed) and all(torch.equal(full[k], resumed[k]) for k in full), name
    assert set(load_file(str(tmp_path / "full" / "embeddings.safetensors"))) == {"clip_l", "clip_g"}
