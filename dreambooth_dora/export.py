"""Exports of an adapter: a fused diffusers pipeline, and the kohya/LyCORIS single file that
A1111 and ComfyUI read.

Kohya/LyCORIS layout, per adapted module (dots of the diffusers module path become `_`)::

    lora_unet_<path>.lora_down.weight   = lora_A              (r, in)
    lora_unet_<path>.lora_up.weight     = lora_B              (out, r)
    lora_unet_<path>.alpha              = scale * r           ()  so that alpha / r is our scale
    lora_unet_<path>.dora_scale         = magnitude           (out, 1); conv: (out, 1, 1, 1)
    lora_te_<path>...                   the text encoder; SDXL: lora_te1_<path> and lora_te2_<path>

The merge rule this must satisfy is LyCORIS's (`lycoris/modules/locon.py`,
`LoConModule.apply_weight_decompose` with `wd_on_out=True`, LyCORIS 3.x; read through the public
code index): `V = W0 + (alpha / r) * up @ down`, `n = ||V|| per output row + eps`,
`W' = V * dora_scale / n`; `dora_scale` shaped (out, 1, ...) marks the output axis. PEFT's DoRA
(ours) is the same rule, so the file is exact for LyCORIS-correct loaders.

ComfyUI (`comfy/weight_adapter/base.py`, `weight_decompose`) picks the output axis when
`dora_scale.shape[0] == weight.shape[0]`, but in that branch divides by the norm of the *base*
weight W0 rather than of V. `comfyui_compatible=True` writes `dora_scale = m * ||W0|| / ||V||`,
which makes that branch compute our W' exactly (and LyCORIS-correct loaders wrong).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import adapted_layers, merge_adapters
from .outputs import EXPORT_KEY, atomic_dir, atomic_path, check_output_target
from .adapter_file import apply_to_models, base_model_of, layout_prefix, read_adapter
from .models import load_pipeline, pipeline_models

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def export_fused(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                 overwrite: bool = False) -> Path:
    """A complete diffusers pipeline with the adapter merged into its weights (plain layers).
    `out_dir` must be new or empty, or (with `overwrite`) an earlier fused export."""
    adapter = read_adapter(adapter_dir)
    out_dir = check_output_target(out_dir, "fused-pipeline", overwrite=overwrite, sources=(adapter.path.parent,))
    pipe = load_pipeline(base_model_of(adapter, base))
    models = pipeline_models(pipe)
    apply_to_models(adapter, models)
    for model in models.values():
        merge_adapters(model)
    with atomic_dir(out_dir, "fused-pipeline") as tmp:
        pipe.save_pretrained(tmp)
    return out_dir


def kohya_key(prefix: str, module_name: str, sdxl: bool = False) -> str:
    """kohya's names: `lora_unet_`, `lora_te_` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL)."""
    start = "lora_te1_" if sdxl and prefix == "text_encoder" else KOHYA_PREFIX[prefix]
    return start + module_name.replace(".", "_")


@torch.no_grad()
def export_kohya(adapter_dir: str | Path, out_file: str | Path, base: str | None = None,
                 comfyui_compatible: bool = False, overwrite: bool = False) -> Path:
    """The kohya/LyCORIS single file (see the module docstring for the layout and rule).
    `out_file` must be new, or (with `overwrite`) an earlier kohya export."""
    adapter = read_adapter(adapter_dir)
    out_file = check_output_target(out_file, "kohya", overwrite=overwrite, is_file=True,
                                   sources=(adapter.path.parent,))
    pipe = load_pipeline(base_model_of(adapter, base))
    models = pipeline_models(pipe)
    apply_to_models(adapter, models)
    tensors: dict[str, torch.Tensor] = {}
    sdxl = "text_encoder_2" in models
    for prefix, model in models.items():
        for name, module in adapted_layers(model):
            key = kohya_key(prefix, layout_prefix(model) + name, sdxl)
            tensors[f"{key}.lora_down.weight"] = module.lora_A.weight.detach().float().contiguous()
            tensors[f"{key}.lora_up.weight"] = module.lora_B.weight.detach().float().contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(module.scaling * module.rank, dtype=torch.float32)
            if module.use_dora:
                m = module.lora_magnitude_vector.detach().float().flatten()
                if comfyui_compatible:  # ComfyUI divides by ||W0||: pre-multiply by ||W0|| / ||V||
                    w0 = module.weight.detach().float().flatten(1).norm(dim=1)
                    m = m * w0 / module.weight_norm()
                shape = (-1,) + (1,) * (module.weight.dim() - 1)
                tensors[f"{key}.dora_scale"] = m.reshape(shape).contiguous()
    rank, alpha = adapter.rank_alpha("unet") if adapter.part("unet") else adapter.rank_alpha("text_encoder")
    metadata = {
        "ss_network_module": "lycoris.kohya" if adapter.use_dora else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_args": ('{"algo": "lora", "dora_wd": true, "wd_on_output": true}' if adapter.use_dora
                            else '{"algo": "lora"}'),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else ("sd_v2" if pipe.unet.config.cross_attention_dim == 1024
                                                                else "sd_v1"),
        "ss_output_name": Path(out_file).stem,
        "dreambooth_dora_dora_scale": "comfyui-compensated" if comfyui_compatible else "lycoris-exact",
        EXPORT_KEY: "kohya",  # lets a later `--overwrite` recognise the file as ours
    }
    out = Path(out_file)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out
