import json

import numpy as np
import torch

from dreambooth_dora.toy.tiny import WORDS, build_clip_vocab, build_tiny_pipeline


def generate(pipe, seed, prompt="a photo of sks dog"):
    return pipe(prompt, num_inference_steps=3, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_tiny_pipeline_generates_deterministic_images(tiny_pipeline):
    first = generate(tiny_pipeline, 0)
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all() and first.min() >= 0 and first.max() <= 1
    assert first.std() > 1e-3  # a picture, not a constant
    np.testing.assert_array_equal(first, generate(tiny_pipeline, 0))
    assert np.abs(first - generate(tiny_pipeline, 1)).max() > 1e-3
    assert np.abs(first - generate(tiny_pipeline, 0, "a photo of a red cube")).max() > 1e-4


def test_saved_layout_loads_like_a_hub_snapshot(tiny_sd_path):
    index = json.loads((tiny_sd_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_path / part).is_dir(), part
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet")
    names = [n for n, _ in unet.named_modules()]
    assert any(n.endswith("attn2.to_k") for n in names)  # cross-attention present
    assert any(n.endswith("attn1.to_out.0") for n in names)


def test_build_is_deterministic():
    a, b = build_tiny_pipeline(seed=0), build_tiny_pipeline(seed=0)
    for (na, pa), (nb, pb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    c = build_tiny_pipeline(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_tokenizer_has_every_word_as_one_token(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    for word in (w for w in WORDS if w.isalpha()):  # CLIP splits digits off, as in '3d'
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, ids)  # <start> word <end>
    ids = tok("zzqx").input_ids  # unknown words fall back to bytes, never fail
    assert len(ids) > 3
    vocab, merges = build_clip_vocab()
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and len(merges) > len(WORDS)
