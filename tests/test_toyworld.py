"""The toy world's generator and judge (groundwork for the embedded base model)."""

import random
from pathlib import Path

import numpy as np

from dreambooth_dora.toy.world import CLASSES, COLOURS, _classifier_module, classify, held_out_prompts, sample


def test_samples_are_labelled_deterministic_and_avoid_held_out_prompts():
    a = [sample(random.Random(3)) for _ in range(1)][0]
    b = sample(random.Random(3))
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert a.image.size == (64, 64) and CLASSES[a.cls] in a.caption and list(COLOURS)[a.colour] in a.caption
    held = held_out_prompts(64)
    assert len({p for p, *_ in held}) == 64
    keys = {key for *_, key in held}
    rng = random.Random(0)
    drawn = [sample(rng, held_out=keys) for _ in range(400)]
    held_captions = {p for p, *_ in held}
    assert not any(s.caption in held_captions for s in drawn)
    assert len({s.cls for s in drawn}) == len(CLASSES) and len({s.colour for s in drawn}) == len(COLOURS)


def test_colour_is_what_the_label_says():
    rng = random.Random(1)
    for _ in range(50):
        s = sample(rng)
        pixels = np.asarray(s.image, dtype=np.float32).reshape(-1, 3)
        target = np.array(list(COLOURS.values())[s.colour], np.float32)
        # some pixel of the object is close to its colour (shading scales it by 0.6 to 1.2)
        cos = pixels @ target / (np.linalg.norm(pixels, axis=1) * np.linalg.norm(target) + 1e-6)
        assert cos.max() > 0.97, s.caption


def test_classifier_interface():
    model = _classifier_module().eval()
    rng = random.Random(2)
    cls, colour, features = classify(model, [sample(rng).image for _ in range(3)])
    assert len(cls) == len(colour) == 3 and features.shape == (3, 128)


def test_pretraining_script_saves_a_loadable_pipeline(tmp_path):
    """Two steps per stage: the code path, not the quality (that is measured, not tested)."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_dora.toy.embedded import pretrain

    out = pretrain(tmp_path / "emb", resolution=32, vae_steps=2, unet_steps=2, batch=4, log=lambda m: None)
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red ball", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    ids = pipe.tokenizer("a red ball on a beige background").input_ids
    assert len(ids) == 2 + 7  # every toy-world word is one token


def test_pretraining_command_never_writes_over_a_model_it_did_not_make(tmp_path, capsys):
    from dreambooth_dora.toy.embedded import main
    from dreambooth_dora.families.models import resolve_model

    shipped = Path(resolve_model("embedded:toy-world"))
    before = {p: p.stat().st_mtime_ns for p in shipped.rglob("*") if p.is_file()}
    steps = ["--vae-steps", "1", "--unet-steps", "1", "--batch", "2", "--classifier-steps", "1"]
    assert main([str(shipped), *steps, "--overwrite"]) == 2
    assert "was not written by dreambooth-dora" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in shipped.rglob("*") if p.is_file()} == before
    out = tmp_path / "emb"
    assert main([str(out), *steps]) == 0 and (out / "classifier" / "model.safetensors").is_file()
    assert main([str(out), *steps]) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([str(out), *steps, "--overwrite"]) == 0 and (out / "unet").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb"]
    capsys.readouterr()
    for flag, value in (("--unet-steps", "0"), ("--batch", "-1"), ("--resolution", "30"), ("--vae-from", str(out)),
                        ("--judge-from", str(tmp_path)), ("--transformer-steps", "0"),
                        ("--init-from", str(out))):
        assert main([str(tmp_path / "bad"), *steps, flag, value]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_the_embedded_model_draws_its_world():
    """A small, fast version of the measured figure: 8 held-out prompts, one seed."""
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth_dora.families.models import resolve_model
    from dreambooth_dora.toy.world import load_classifier

    path = resolve_model("embedded:toy-world")
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_classifier(f"{path}/classifier")
    prompts = held_out_prompts()[:8]
    images = pipe([p for p, *_ in prompts], num_inference_steps=15, guidance_scale=5.0,
                  generator=torch.Generator().manual_seed(0)).images
    assert images[0].size == (32, 32)
    cls, colour, _ = classify(classifier, images)
    assert sum(c == p[1] for c, p in zip(cls, prompts)) >= 5
    assert sum(k == p[2] for k, p in zip(colour, prompts)) >= 6


def test_flux_pretraining_saves_a_loadable_flux_pipeline(tmp_path):
    """Two steps of the FLUX.1-architecture toy on the toy-world VAE: the code path and the layout
    (stock FluxPipeline loads it; our family sees FLUX.1 at 32 px with T5 at its own length)."""
    import torch
    from diffusers import AutoencoderKL, FluxPipeline

    from dreambooth_dora.families import family_of
    from dreambooth_dora.families.models import resolve_model
    from dreambooth_dora.toy.embedded import FLUX_T5_LENGTH, draw_prompts, pretrain_flux

    vae_from = Path(resolve_model("embedded:toy-world"))
    out = pretrain_flux(tmp_path / "flux", steps=2, guidance_steps=2, batch=4, vae_from=vae_from, log=lambda m: None)
    assert family_of(str(out)).name == "flux1"
    pipe = FluxPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.transformer.transformer_blocks) == 2 and len(pipe.transformer.single_transformer_blocks) == 4
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.shift_factor is not None  # as FLUX.1 dev
    theirs = AutoencoderKL.from_pretrained(vae_from / "vae").state_dict()  # the toy-world model's VAE
    assert all(torch.equal(v, theirs[k]) for k, v in pipe.vae.state_dict().items())
    assert draw_prompts(pipe, ["a red ball"], seed=0, steps=2)[0].size == (32, 32)
    ids = pipe.tokenizer_2("a red ball on a beige background").input_ids
    assert len(ids) == 7 + 1 and pipe.tokenizer_2.model_max_length == FLUX_T5_LENGTH  # one token per word, </s>


def test_the_embedded_flux_model_draws_its_world():
    """The FLUX.1-architecture model, drawn as the app draws it (its size, T5 at its length, no
    CFG): a small, fast version of the measured figure, 8 held-out prompts, one seed."""
    from dreambooth_dora.families.models import load_pipeline, resolve_model
    from dreambooth_dora.toy.embedded import draw_prompts
    from dreambooth_dora.toy.world import load_classifier

    pipe = load_pipeline("embedded:toy-world-flux")
    assert type(pipe).__name__ == "FluxPipeline"
    classifier = load_classifier(f"{resolve_model('embedded:toy-world-flux')}/classifier")
    prompts = held_out_prompts()[:8]
    images = draw_prompts(pipe, [p for p, *_ in prompts], seed=0, steps=15)
    assert images[0].size == (32, 32)
    cls, colour, _ = classify(classifier, images)
    assert sum(c == p[1] for c, p in zip(cls, prompts)) >= 5
    assert sum(k == p[2] for k, p in zip(colour, prompts)) >= 5


def test_the_quality_benchmark_refuses_bad_input_in_one_line_before_any_model_loads(tmp_path, capsys):
    """benchmarks/embedded_quality.py: a base without the toy world's judge, a nonsense guidance, an
    existing --grid picture (never replaced), a missing adapter: one line, exit 2, nothing drawn."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("embedded_quality", repo / "benchmarks" / "embedded_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept = tmp_path / "grid.png"
    kept.write_bytes(b"an earlier picture")
    for argv, words in ((["--base", str(tmp_path)], "has no classifier/"),
                        (["--base", "embedded:nope"], "unknown embedded model"),
                        (["--guidance", "-1"], "--guidance must be a finite number >= 0"),
                        (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
                        (["--grid", str(kept)], "give a new .png file"),
                        (["--dora", str(tmp_path / "nope")], "--dora: no adapter at"),
                        (["--class-name", "cat"], "--class-name: one of")):
        assert module.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    assert kept.read_bytes() == b"an earlier picture"
