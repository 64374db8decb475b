"""Web UI files for the DiT families (FLUX.1, SD 3 / 3.5): the original checkpoints' module names
(fused q/k/v, FLUX's single-block `linear1`) checked against diffusers' own checkpoint converters;
kohya / ComfyUI-compensated / full files merged by the consumers' rules (written in
test_exports.py from their code) equal our exact layers; a LoRA file loads in stock diffusers'
kohya FLUX loader to the same model; `verify` prints the per-consumer table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import train_now
from dreambooth_dora.adapters.file import apply_to_models, read_adapter
from dreambooth_dora.cli import main
from dreambooth_dora.families import Flux1, StableDiffusion3, pipeline_models
from dreambooth_dora.families.models import load_pipeline
from dreambooth_dora.formats.consumers import read_kohya_modules
from test_exports import REFERENCES

REPO = Path(__file__).resolve().parents[1]
FLUX, SD3 = Flux1(), StableDiffusion3()


# ---- the names: diffusers' converters read back what our mapping writes --------------------------

def _rows_only(model) -> dict[str, torch.Tensor]:
    """A state dict with each tensor's rows (distinct random values, 2 columns): the converters only
    cut and join rows, so this checks every name and row offset at the real widths for free."""
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape[0], 2, generator=g) if v.dim() > 1 else torch.randn(v.shape[0], generator=g)
            for k, v in model.state_dict().items()}


def _native(family, model, state: dict) -> tuple[dict, set]:
    """The checkpoint's tensors for every Linear / Conv2d our mapping knows, and the layers it
    refused (one line each)."""
    out, refused = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        try:
            native, members = family.native_module(name, model)
        except ValueError as err:
            assert "\n" not in str(err) and name in str(err)
            refused.add(name)
            continue
        for end in ("weight", "bias"):
            out[f"{native}.{end}"] = torch.cat([state[f"{m}.{end}"] for m in members])
    return out, refused


def swap(t):  # the checkpoints' adaLN order (shift, scale) against diffusers' (scale, shift)
    shift, scale = t.chunk(2)
    return torch.cat([scale, shift])


def test_flux_web_ui_names_are_what_diffusers_converter_reads():
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):  # FLUX.1's real widths (the converter assumes 3072), two blocks
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = _rows_only(model)
    native, refused = _native(FLUX, model, state)
    assert refused == {"norm_out.linear"}  # stored with shift and scale swapped: refused, not mapped
    for i in range(2):  # the rest (norms; the final modulation), written here from the converter's names
        for side, ours in (("img", ""), ("txt", "added_")):
            native[f"double_blocks.{i}.{side}_attn.norm.query_norm.scale"] = state[f"transformer_blocks.{i}.attn.norm_{ours}q.weight"]
            native[f"double_blocks.{i}.{side}_attn.norm.key_norm.scale"] = state[f"transformer_blocks.{i}.attn.norm_{ours}k.weight"]
        native[f"single_blocks.{i}.norm.query_norm.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        native[f"single_blocks.{i}.norm.key_norm.scale"] = state[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    for end in ("weight", "bias"):
        native[f"final_layer.adaLN_modulation.1.{end}"] = swap(state[f"norm_out.linear.{end}"])
    assert "single_blocks.0.linear1.weight" in native and native["single_blocks.0.linear1.weight"].shape[0] == 7 * 3072
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(native))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sd35_web_ui_names_are_what_diffusers_converter_reads():
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    with torch.device("meta"):  # SD 3.5 medium's layout: MMDiT-X (attn2 in the first blocks), qk norms
        model = SD3Transformer2DModel(num_layers=3, attention_head_dim=64, num_attention_heads=4, joint_attention_dim=64,
                                      caption_projection_dim=256, pooled_projection_dim=64, pos_embed_max_size=96,
                                      dual_attention_layers=(0, 1), qk_norm="rms_norm")
    state = _rows_only(model)
    native, refused = _native(SD3, model, state)
    assert refused == {"norm_out.linear", "transformer_blocks.2.norm1_context.linear"}
    native["pos_embed"] = state["pos_embed.pos_embed"]
    for i in range(3):
        for side, ours in (("x_block.attn", ""), ("context_block.attn", "added_"), ("x_block.attn2", "")):
            attn = "attn2" if side.endswith("2") else "attn"
            if f"transformer_blocks.{i}.{attn}.norm_{ours}q.weight" in state:
                native[f"joint_blocks.{i}.{side}.ln_q.weight"] = state[f"transformer_blocks.{i}.{attn}.norm_{ours}q.weight"]
                native[f"joint_blocks.{i}.{side}.ln_k.weight"] = state[f"transformer_blocks.{i}.{attn}.norm_{ours}k.weight"]
    for end in ("weight", "bias"):
        native[f"final_layer.adaLN_modulation.1.{end}"] = swap(state[f"norm_out.linear.{end}"])
        native[f"joint_blocks.2.context_block.adaLN_modulation.1.{end}"] = swap(
            state[f"transformer_blocks.2.norm1_context.linear.{end}"])
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(native))
    assert set(back) == set(state), sorted(set(back) ^ set(state))[:6]
    assert all(torch.equal(back[k], state[k]) for k in state)


# ---- the files: exact under their consumers' rules --------------------------------------------

# partial stacks on purpose: the image q/v but not k, the single blocks' q/v and MLP input, one
# text projection, one feed-forward
PARTIAL = "attn.to_q,attn.to_v,proj_mlp,attn.add_k_proj,ff.net.2"


def _train(model, out, *extra):
    return train_now(["--pretrained_model_name_or_path", str(model), "--instance_data_dir",
                      str(REPO / "sample_data/3d_icon"), "--instance_prompt", "a sks icon", "--resolution", "64",
                      "--learning_rate", "5e-2", "--max_train_steps", "2", "--rank", "4", "--lora_alpha", "8",
                      "--output_dir", str(out), "--report_to", "none", "--seed", "3", "--max_sequence_length", "16",
                      "--center_crop", "--train_text_encoder", "--checkpointing_steps", "100", *extra])


@pytest.fixture(scope="module")
def dit_runs(tiny_flux_path, tiny_sd3_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_webui")
    _train(tiny_flux_path, root / "flux_dora", "--lora_layers", PARTIAL)
    # double blocks only: diffusers' kohya loader assumes FLUX.1's width (3072) for single blocks
    _train(tiny_flux_path, root / "flux_lora", "--lora_layers", "attn.add_q_proj,attn.add_v_proj,ff.net.2,attn.to_out.0",
           "--use_dora", "false")
    _train(tiny_sd3_path, root / "sd3_dora")
    return root


def _truths(family, adapter_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{kohya key: (W0, W')} per web UI module, stacked here from our exact layers by the mapping
    the converter test above checked."""
    pipe = load_pipeline(read_adapter(adapter_dir).info.base_model)
    models = pipeline_models(pipe)
    apply_to_models(read_adapter(adapter_dir), models)
    out = {}
    for part, model in models.items():
        head = "text_model." if part != "transformer" and not hasattr(model, "text_model") else ""
        for name, module in model.named_modules():
            if not hasattr(module, "merged_weight"):
                continue
            key, members = family.webui_stack(part, head + name, model)
            layers = [model.get_submodule(m[len(head):]) for m in members]
            out[key] = (torch.cat([m.weight.detach().float() for m in layers]),
                        torch.cat([(m.merged_weight() if hasattr(m, "merged_weight") else m.weight).detach().float()
                                   for m in layers]))
    return out


def _modules(path):
    with safe_open(str(path), "pt") as f:
        return read_kohya_modules({k: f.get_tensor(k) for k in f.keys()}), f.metadata()


def _as_dict(mod):
    return {"down": mod.down, "up": mod.up, "alpha": mod.alpha, "dora_scale": mod.dora_scale}


def _worst(truths, modules, rule):
    """max over modules of ||W'_rule - W'|| / ||W' - W0|| under the consumer's rule (written in test_exports)."""
    errs = []
    for key, (w0, target) in truths.items():
        mod = modules[key]
        merged = w0 + mod.diff if mod.diff is not None else REFERENCES[rule](w0, _as_dict(mod))
        errs.append(((merged - target).norm() / (target - w0).norm()).item())
    return max(errs)


def test_flux_web_ui_files_are_exact_in_comfyui_and_forge(dit_runs, tmp_path, capsys):
    truths = _truths(FLUX, dit_runs / "flux_dora")
    assert "lora_unet_single_blocks_0_linear1" in truths and "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" \
        in truths and "lora_unet_double_blocks_0_img_attn_qkv" in truths
    files = {}
    for name, flags in (("kohya", ["--format", "kohya"]), ("comfyui", ["--format", "kohya", "--comfyui"]),
                        ("full", ["--format", "full"])):
        files[name] = tmp_path / f"{name}.safetensors"
        assert main(["export", str(dit_runs / "flux_dora"), *flags, "--out", str(files[name])]) == 0
    kohya, meta = _modules(files["kohya"])
    assert set(kohya) == set(truths) and meta["ss_base_model_version"] == "flux1"
    qkv = kohya["lora_unet_double_blocks_0_img_attn_qkv"]  # q and v adapted, k not: rank 8, k's rows zero
    assert qkv.down.shape == (8, 32) and qkv.up.shape == (96, 8) and qkv.dora_scale.shape == (96, 1)
    assert torch.count_nonzero(qkv.up[32:64]) == 0 and torch.count_nonzero(qkv.up[:32, 4:]) == 0
    linear1 = kohya["lora_unet_single_blocks_0_linear1"]  # q, v, MLP input adapted: rank 12 over 7 x 32 rows
    assert linear1.down.shape == (12, 32) and linear1.up.shape == (224, 12)
    comfy, _ = _modules(files["comfyui"])
    full, _ = _modules(files["full"])
    assert _worst(truths, kohya, "lycoris") <= 1e-5 and _worst(truths, kohya, "comfyui-15458") <= 1e-5
    assert _worst(truths, comfy, "comfyui") <= 1e-5  # ComfyUI and Forge today
    assert _worst(truths, kohya, "comfyui") > 1e-3 and _worst(truths, comfy, "lycoris") > 1e-3  # each is rule-specific
    assert _worst(truths, full, "comfyui") <= 1e-5  # W0 + diff: every consumer
    capsys.readouterr()
    assert main(["verify", str(files["comfyui"]), "--against", str(dit_runs / "flux_dora")]) == 0
    table = capsys.readouterr().out
    verdict = next(line for line in table.splitlines() if line.startswith("| **verdict**"))
    assert verdict.split("|")[2].strip() == "WRONG" and verdict.split("|")[3].strip() == "exact"  # lycoris, comfyui
    assert "lora_unet_single_blocks_0_linear1" in table


def test_flux_lora_web_ui_file_loads_in_stock_diffusers_as_our_adapter(tiny_flux_path, dit_runs, tmp_path):
    """diffusers' kohya FLUX loader (sd-scripts' layout: fused q/k/v split back) gives our model
    (double blocks and CLIP; its single-block split assumes FLUX.1's real width)."""
    from diffusers import FluxPipeline

    out = tmp_path / "lora.safetensors"
    assert main(["export", str(dit_runs / "flux_lora"), "--format", "kohya", "--out", str(out)]) == 0
    ours = FluxPipeline.from_pretrained(str(tiny_flux_path))
    apply_to_models(read_adapter(dit_runs / "flux_lora"), pipeline_models(ours))
    stock = FluxPipeline.from_pretrained(str(tiny_flux_path))
    stock.load_lora_weights(str(out))
    base = FluxPipeline.from_pretrained(str(tiny_flux_path))

    @torch.no_grad()
    def outputs(pipe):
        g = torch.Generator().manual_seed(0)
        x, text, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
        ids = pipe.tokenizer(["a sks icon"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return (pipe.transformer(hidden_states=x, timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]),
                                 pooled_projections=pooled, encoder_hidden_states=text, txt_ids=torch.zeros(8, 3),
                                 img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
                                 return_dict=False)[0], pipe.text_encoder(ids).pooler_output)

    want, got, before = outputs(ours), outputs(stock), outputs(base)
    assert all((w - b).abs().max() > 1e-4 for w, b in zip(want, before))  # the adapter changes both parts
    assert all((g_ - w).abs().max() <= 1e-5 for g_, w in zip(got, want))


def test_sd3_web_ui_files_exact_and_unmapped_layers_refused_in_one_line(tiny_sd3_path, dit_runs, tmp_path, capsys):
    truths = _truths(SD3, dit_runs / "sd3_dora")
    assert {k.split("_")[1] for k in truths} == {"unet", "te1", "te2"}
    out = tmp_path / "sd3.safetensors"
    assert main(["export", str(dit_runs / "sd3_dora"), "--format", "kohya", "--comfyui", "--out", str(out)]) == 0
    modules, meta = _modules(out)
    assert set(modules) == set(truths) and "lora_unet_joint_blocks_0_x_block_attn_qkv" in modules
    assert meta["ss_base_model_version"] == "sd3" and _worst(truths, modules, "comfyui") <= 1e-5
    # a layer the checkpoints store another way: one line, exit 2, before any model loads, nothing written
    bad = tmp_path / "bad"
    _train(tiny_sd3_path, bad, "--lora_layers", "norm_out.linear", "--max_train_steps", "1")
    capsys.readouterr()
    assert main(["export", str(bad), "--format", "full", "--out", str(tmp_path / "no.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "norm_out.linear" in err[0] and "--format fused" in err[0]
    assert not (tmp_path / "no.safetensors").exists()


def test_the_apps_consumer_view_of_a_flux_adapter(tiny_flux_path, dit_runs):
    """What a web UI draws from the kohya file (the app's "as ComfyUI" column): under ComfyUI #15458's
    rule, our exact model; under today's ComfyUI rule, the measurably wrong one. Stacked layers (q/k/v,
    linear1, members without adapter) are written back into the pipeline's own layers."""
    from diffusers import FluxPipeline

    from dreambooth_dora.formats.export import consumer_view

    ours = FluxPipeline.from_pretrained(str(tiny_flux_path))
    apply_to_models(read_adapter(dit_runs / "flux_dora"), pipeline_models(ours))

    @torch.no_grad()
    def out(pipe):
        g = torch.Generator().manual_seed(0)
        x, text, pooled = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
        return pipe.transformer(hidden_states=x, timestep=torch.tensor([0.4]), guidance=torch.tensor([3.5]),
                                pooled_projections=pooled, encoder_hidden_states=text, txt_ids=torch.zeros(8, 3),
                                img_ids=pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), return_dict=False)[0]

    want = out(ours)
    exact = consumer_view(dit_runs / "flux_dora", "comfyui-15458")
    assert (out(exact) - want).abs().max() <= 1e-5
    assert not any(hasattr(m, "merged_weight") for m in exact.transformer.modules())  # plain layers only
    assert (out(consumer_view(dit_runs / "flux_dora", "comfyui")) - want).abs().max() > 1e-4
