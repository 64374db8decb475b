"""Adapters in the ecosystem: stock diffusers loading, our exact loader, several adapters,
fused and kohya/LyCORIS exports, `info`, and the refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth_dora.adapters.file import AdapterError, apply_to_models, load_adapter, read_adapter
from dreambooth_dora.formats.export import export_fused, export_kohya
from dreambooth_dora.families import pipeline_models
from dreambooth_dora.toy.tiny import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
RANK, ALPHA = 4, 8  # alpha = 2 x rank: a loader that guesses alpha = rank gets the scale wrong


def fresh(path):
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(path, adapter_dir, scale=1.0):
    """The model as training left it: our own layers with the file's tensors."""
    pipe = fresh(path)
    apply_to_models(read_adapter(adapter_dir), pipeline_models(pipe))
    if scale != 1.0:
        for model in pipeline_models(pipe).values():
            for m in model.modules():
                if hasattr(m, "scaling") and hasattr(m, "lora_A"):
                    m.scaling *= scale
    return pipe


INPUTS = {}


def outputs(pipe):
    """Text-encoder and UNet outputs on fixed inputs (fp32)."""
    if not INPUTS:
        g = torch.Generator().manual_seed(0)
        INPUTS.update(x=torch.randn(2, 4, 32, 32, generator=g), cond=torch.randn(2, 77, 32, generator=g))
    ids = pipe.tokenizer(["a sks icon", "a red cube"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        te = pipe.text_encoder(ids)[0]
        unet = pipe.unet(INPUTS["x"], torch.tensor([10, 800]), INPUTS["cond"]).sample
    return te, unet


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_stock_diffusers_loading_and_our_exact_loader(tiny_sd_path, adapters, method):
    ref = outputs(reference(tiny_sd_path, adapters[method]))
    base = outputs(fresh(tiny_sd_path))
    assert max_diff(ref, base) > 1e-3  # the adapter does something

    stock = fresh(tiny_sd_path)
    stock.load_lora_weights(str(adapters[method]))
    s_te, s_unet = outputs(stock)
    assert (s_unet - ref[1]).abs().max() <= TOL  # UNet: stock diffusers is exact (alpha from metadata)
    assert stock.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.scaling["default_0"] == ALPHA / RANK
    te_exact = (s_te - ref[0]).abs().max() <= TOL

    ours = fresh(tiny_sd_path)
    report = load_adapter(ours, adapters[method], adapter_name=method)
    assert max_diff(outputs(ours), ref) <= TOL  # ours: exact, UNet and text encoder
    # the broken case is detected exactly when stock loading was wrong
    assert bool(report["restored"]) == (not te_exact)
    if method == "dora":  # the pinned versions drop text-encoder magnitudes: say so if that changes
        assert not te_exact and all(k.startswith("text_encoder.") and k.endswith("lora_magnitude_vector")
                                    for k in report["restored"])
    else:
        assert te_exact and not report["restored"]


def test_without_metadata_stock_loading_guesses_the_scale_wrong(tiny_sd_path, adapters, tmp_path):
    """Why the metadata is written: strip it and diffusers assumes alpha = rank."""
    src = adapters["lora"] / "pytorch_lora_weights.safetensors"
    (tmp_path / "bare").mkdir()
    save_file(load_file(str(src)), str(tmp_path / "bare" / "pytorch_lora_weights.safetensors"))
    pipe = fresh(tiny_sd_path)
    pipe.load_lora_weights(str(tmp_path / "bare"))
    ref = outputs(reference(tiny_sd_path, adapters["lora"]))
    assert (outputs(pipe)[1] - ref[1]).abs().max() > 1e-4


def test_two_named_adapters_switch_and_scale_exactly(tiny_sd_path, adapters):
    pipe = fresh(tiny_sd_path)
    load_adapter(pipe, adapters["dora"], adapter_name="dora")
    load_adapter(pipe, adapters["lora"], adapter_name="lora")
    for name in ("dora", "lora"):
        pipe.set_adapters([name])
        assert max_diff(outputs(pipe), outputs(reference(tiny_sd_path, adapters[name]))) <= TOL, name
    pipe.set_adapters(["lora"], adapter_weights=[0.5])
    assert max_diff(outputs(pipe), outputs(reference(tiny_sd_path, adapters["lora"], scale=0.5))) <= TOL
    pipe.set_adapters(["dora"], adapter_weights=[0.5])
    assert max_diff(outputs(pipe), outputs(reference(tiny_sd_path, adapters["dora"], scale=0.5))) <= TOL
    pipe.disable_lora()
    assert max_diff(outputs(pipe), outputs(fresh(tiny_sd_path))) <= TOL  # the base model, magnitude included
    pipe.enable_lora()
    pipe.set_adapters(["dora"])
    assert max_diff(outputs(pipe), outputs(reference(tiny_sd_path, adapters["dora"]))) <= TOL


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_fused_export_equals_the_adapter(tiny_sd_path, adapters, method, tmp_path):
    out = export_fused(adapters[method], tmp_path / "fused")
    fused = fresh(out)
    assert not any("lora" in k for k in fused.unet.state_dict())  # plain layers
    assert sum(p.numel() for p in fused.unet.parameters()) == sum(p.numel() for p in fresh(tiny_sd_path).unet.parameters())
    ref = reference(tiny_sd_path, adapters[method])
    assert max_diff(outputs(fused), outputs(ref)) <= TOL
    kw = dict(prompt="a sks icon", num_inference_steps=3, output_type="np", height=64, width=64)
    a = fused(generator=torch.Generator().manual_seed(1), **kw).images
    b = ref(generator=torch.Generator().manual_seed(1), **kw).images
    assert np.abs(a - b).max() <= 1e-4


def lycoris_merge(w0, down, up, alpha, dora_scale):
    """LyCORIS's merge (locon.py, apply_weight_decompose, wd_on_out=True), written from its
    description: V = W0 + alpha/r * up@down; W' = V * dora_scale / (||V||_row + eps)."""
    v = w0 + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    if dora_scale is None:
        return v
    assert dora_scale.shape == (w0.shape[0],) + (1,) * (w0.dim() - 1)  # the output-axis shape
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(dora_scale.shape) + torch.finfo(v.dtype).eps
    return v * dora_scale / norm


def comfyui_merge(w0, down, up, alpha, dora_scale):
    """ComfyUI's `weight_decompose` as it reads today: the output-axis branch (picked because
    dora_scale.shape[0] == out) divides by the norm of W0, not of V."""
    v = w0 + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
    norm = w0.reshape(w0.shape[0], -1).norm(dim=1, keepdim=True).reshape(dora_scale.shape) + torch.finfo(w0.dtype).eps
    return v * (dora_scale / norm)


def kohya_modules(path):
    tensors = load_file(str(path))
    return tensors, sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})


def base_weight(pipe, key):
    """The base weight a kohya key points at (diffusers names for SD 1.x, as ComfyUI maps them)."""
    kind, name = ("unet", key[len("lora_unet_"):]) if key.startswith("lora_unet_") else ("te", key[len("lora_te_"):])
    model = pipe.unet if kind == "unet" else pipe.text_encoder
    table = {n.replace(".", "_"): m for n, m in model.named_modules()}
    if kind == "te":
        table.update({"text_model_" + n.replace(".", "_"): m for n, m in model.named_modules()})
    return table[name].weight.detach()


@pytest.mark.parametrize("method", ["dora", "lora"])
def test_kohya_export_merges_to_the_fused_weights_by_lycoris_rule(tiny_sd_path, adapters, method, tmp_path):
    file = export_kohya(adapters[method], tmp_path / "k.safetensors")
    fused = fresh(export_fused(adapters[method], tmp_path / "fused"))
    base = fresh(tiny_sd_path)
    tensors, modules = kohya_modules(file)
    assert any(m.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k") for m in modules)
    assert any(m.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for m in modules)
    for m in modules:
        down, up = tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"]
        alpha = float(tensors[f"{m}.alpha"])
        assert alpha == pytest.approx(ALPHA)
        scale = tensors.get(f"{m}.dora_scale")
        assert (scale is not None) == (method == "dora")
        merged = lycoris_merge(base_weight(base, m), down, up, alpha, scale)
        assert (merged - base_weight(fused, m)).abs().max() <= TOL, m
    meta = safe_open(str(file), "pt").metadata()
    assert meta["ss_network_dim"] == str(RANK) and json.loads(meta["ss_network_args"]).get("dora_wd", False) == (method == "dora")


def test_comfyui_gap_and_the_compensated_file(tiny_sd_path, adapters, tmp_path):
    exact = export_kohya(adapters["dora"], tmp_path / "exact.safetensors")
    compensated = export_kohya(adapters["dora"], tmp_path / "comfy.safetensors", comfyui_compatible=True)
    fused = fresh(export_fused(adapters["dora"], tmp_path / "fused"))
    base = fresh(tiny_sd_path)
    t_exact, modules = kohya_modules(exact)
    t_comfy, _ = kohya_modules(compensated)
    worst_exact_file = 0.0
    for m in modules:
        w0, target = base_weight(base, m), base_weight(fused, m)
        args = (t_exact[f"{m}.lora_down.weight"], t_exact[f"{m}.lora_up.weight"], float(t_exact[f"{m}.alpha"]))
        worst_exact_file = max(worst_exact_file, (comfyui_merge(w0, *args, t_exact[f"{m}.dora_scale"]) - target).abs().max().item())
        assert (comfyui_merge(w0, *args, t_comfy[f"{m}.dora_scale"]) - target).abs().max() <= TOL, m
    assert worst_exact_file > 1e-4  # ComfyUI's rule on the exact file is measurably off


def test_info_and_clear_errors(tiny_sd_path, adapters, tmp_path, capsys):
    from dreambooth_dora.cli import main  # in-process: the CLI's own entry point, without a new interpreter

    assert main(["info", str(adapters["dora"]), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "DoRA" and d["parts"]["unet"]["rank"] == RANK and d["parts"]["unet"]["alpha"] == ALPHA
    assert d["base_model"] == str(tiny_sd_path) and "to_out.0" in d["parts"]["unet"]["targets"]
    assert d["parameters"] == sum(v.numel() for v in load_file(str(adapters["dora"] / "pytorch_lora_weights.safetensors")).values())
    assert main(["info", str(tmp_path)]) == 2 and capsys.readouterr().err.startswith("error: no adapter file")

    other = tmp_path / "wide"  # another base model: wider text embeddings
    build_tiny_pipeline(cross_attention_dim=48).save_pretrained(other)
    with pytest.raises(AdapterError, match=r"does not fit this base model: text_encoder\.encoder\.layers\.0\."
                                           r"self_attn\.k_proj has weight \(48, 48\), the adapter's lora_A is \(4, 32\)"):
        load_adapter(fresh(other), adapters["dora"])
    with pytest.raises(AdapterError, match="does not fit"):
        export_fused(adapters["dora"], tmp_path / "x", base=str(other))
    assert not (tmp_path / "x").exists()  # nothing half-written
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(AdapterError, match="pickled .bin weights are refused on purpose: loading a pickle can run code"):
        read_adapter(tmp_path / "weights.bin")
    not_adapter = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_adapter))
    with pytest.raises(AdapterError, match="holds no LoRA/DoRA tensors"):
        read_adapter(not_adapter)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        read_adapter(tmp_path / "junk.safetensors")
    assert main(["export", str(adapters["dora"]), "--format", "fused", "--out", str(tmp_path / "y"),
                 "--base", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "does not fit" in err
