"""The device checks (`-m cuda`): the code paths users run on GPUs in fp16 / bf16, run here on
every device there is. On a machine without CUDA the CPU variants run (the same code with
`device=cpu`, so these tests cannot rot) and the CUDA variants are reported as skipped;
`benchmarks/gpu_check.py` runs them on a GPU when one is lent.

Bounds, relative to the largest value of the fp64 reference (PEFT in fp64, the same tensors):
fp32 1e-5; under autocast fp16 4e-3 and bf16 3e-2 for outputs, gradients 1e-2 and 6e-2; and ours
never more than twice PEFT's own error under the same autocast, plus a slack for one draw's luck:
1e-4, and for bf16 one unit of its rounding (2^-8): a single bf16 gradient's error moves by that
much with the summation order upstream (measured: PEFT 2.8e-3 where ours was 4.7e-3 to 7.3e-3
depending on how the next layers round, both well inside the 6e-2 bound).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from dreambooth_dora import AdaptedLinear, adapter_state_dict, add_adapters, load_adapter_state_dict

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OUT_BOUND = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
GRAD_BOUND = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 6e-2}
SLACK = {"fp32": 1e-4, "fp16": 1e-4, "bf16": 2.0 ** -8}  # beyond twice PEFT's error (see above)
TARGETS = ["up", "down", "conv"]


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 exactness is checked in true fp32: torch lets cuDNN run fp32 convolutions in TF32 by
    default (and matmuls where asked), which alone would be ~3e-4 off on the adapted Conv2d."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(48, 64)
        self.down = nn.Linear(64, 32, bias=False)
        self.conv = nn.Conv2d(32, 8, 3, padding=1)

    def forward(self, x):  # x (N, 16, 48)
        y = self.down(torch.tanh(self.up(x)))
        return self.conv(y.transpose(1, 2).reshape(y.shape[0], -1, 4, 4))


def adapted_pair(device: str, dtype: torch.dtype, dora: bool):
    """Ours and PEFT's on the same frozen base (in `dtype`, as mixed-precision training keeps it)
    with the same fp32 adapter tensors, and PEFT in fp64 as the reference."""
    torch.manual_seed(0)
    base = Net().requires_grad_(False)
    ours = copy.deepcopy(base)
    add_adapters(ours, TARGETS, rank=4, alpha=8, use_dora=dora)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in adapter_state_dict(ours).items()}
    load_adapter_state_dict(ours, state)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora)
    peft = inject_adapter_in_model(config, copy.deepcopy(base))
    set_peft_model_state_dict(peft, state)
    truth = copy.deepcopy(peft).double().to(device)
    for model in (ours, peft):
        model.to(device)
        for name, p in model.named_parameters():  # frozen weights in the compute dtype, adapters fp32
            p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
        for name, b in model.named_buffers():
            b.data = b.data.to(dtype)
    return ours, peft, truth


def run(model, x, w, device, dtype):
    x = x.clone().requires_grad_()
    amp = torch.autocast(device, dtype=dtype) if dtype != torch.float32 and x.dtype != torch.float64 else nullcontext()
    with amp:
        y = model(x)
    (y.to(w.dtype) * w).sum().backward()
    grads = {k.replace(".default", "").removesuffix(".weight") if "magnitude" in k else k.replace(".default", ""): p.grad
             for k, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads, x.grad


def rel(a, ref) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("dora", [True, False], ids=["dora", "lora"])
def test_layers_match_peft_under_autocast(device, precision, path, dora):
    dtype = DTYPES[precision]
    ours, peft, truth = adapted_pair(device, dtype, dora)
    for m in ours.modules():
        if isinstance(m, AdaptedLinear):
            m.fuse_min_tokens_per_feature = {"fused": 0.0, "composed": float("inf")}[path]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 48, generator=g).to(device)
    w = torch.randn(3, 8, 4, 4, generator=g).to(device)
    y_ref, g_ref, x_ref = run(truth, x.double(), w.double(), device, torch.float64)
    y_ours, g_ours, x_ours = run(ours, x, w, device, dtype)
    y_peft, g_peft, x_peft = run(peft, x, w, device, dtype)
    errors = {"output": (rel(y_ours, y_ref), rel(y_peft, y_ref), OUT_BOUND[precision]),
              "input grad": (rel(x_ours, x_ref), rel(x_peft, x_ref), GRAD_BOUND[precision])}
    assert g_ours.keys() == g_ref.keys()
    for k in g_ref:
        errors[k] = (rel(g_ours[k], g_ref[k]), rel(g_peft[k], g_ref[k]), GRAD_BOUND[precision])
    for what, (mine, theirs, bound) in errors.items():
        assert mine <= bound, f"{what}: {mine:.2e} > {bound:.0e}"
        assert mine <= 2 * theirs + SLACK[precision], f"{what}: ours {mine:.2e}, PEFT {theirs:.2e}"


def _train(model: Path, out: Path, precision: str, *extra) -> Path:
    from dreambooth_dora.training.config import load_config
    from dreambooth_dora.training.loop import train

    return train(load_config(["--pretrained_model_name_or_path", str(model), "--instance_data_dir",
                              str(REPO / "sample_data" / "3d_icon"), "--instance_prompt", "a sks icon",
                              "--resolution", "32", "--max_train_steps", "3", "--learning_rate", "1e-3",
                              "--mixed_precision", precision, "--output_dir", str(out), "--report_to", "none",
                              "--train_text_encoder", *extra]))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_mixed_precision_training_saves_an_adapter_that_reloads_exactly(precision, arch, tiny_sd_path,
                                                                         tiny_sdxl_path, tmp_path):
    """Training where the machine trains (CUDA when there is one): finite loss, and the saved
    adapter loads back into a pipeline bit for bit. fp16 autocast with the grad scaler needs CUDA."""
    import json

    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    from peft import get_peft_model_state_dict

    from dreambooth_dora.adapters.file import layout_prefix, load_adapter
    from dreambooth_dora.families import pipeline_models

    if precision == "fp16" and not CUDA:
        pytest.skip("fp16 mixed precision (grad scaler) needs a CUDA device")
    model = tiny_sdxl_path if arch == "sdxl" else tiny_sd_path
    path = _train(model, tmp_path / "out", precision)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        info = json.loads(f.metadata()["dreambooth_dora"])
    assert info["final_loss"] == info["final_loss"] and abs(info["final_loss"]) < 1e3  # finite
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in tensors.values())
    pipe = DiffusionPipeline.from_pretrained(model)
    load_adapter(pipe, path.parent)
    loaded = {}  # what PEFT holds now, read back by PEFT's own state-dict function, in the file's key layout
    for prefix, part in pipeline_models(pipe).items():
        for k, v in get_peft_model_state_dict(part, adapter_name="default").items():
            loaded[f"{prefix}.{layout_prefix(part)}{k}"] = v
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_loading_and_fused_export(device, adapters, tiny_sd_path, tmp_path):
    """`load_adapter` into an fp16 pipeline and the fused export in fp16: the UNet and text encoder
    outputs equal the fp32 adapter's within fp16's rounding (2e-3 of the output's size)."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_dora.adapters.file import load_adapter
    from dreambooth_dora.formats.export import export_fused

    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)

    def outputs(pipe, dtype):
        pipe.to(device, dtype)
        ids = pipe.tokenizer(["a sks icon"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            te = pipe.text_encoder(ids.to(device))[0].double().cpu()
            unet = pipe.unet(x.to(device, dtype), torch.tensor([500], device=device), cond.to(device, dtype)).sample
        return te, unet.double().cpu()

    exact = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    load_adapter(exact, adapters["dora"])
    te_ref, unet_ref = outputs(exact, torch.float32)
    half = StableDiffusionPipeline.from_pretrained(tiny_sd_path, torch_dtype=torch.float16)
    load_adapter(half, adapters["dora"])
    fused = StableDiffusionPipeline.from_pretrained(export_fused(adapters["dora"], tmp_path / "fused", dtype="fp16"))
    for pipe in (half, fused):
        te, unet = outputs(pipe, torch.float16)
        assert rel(te, te_ref) <= 2e-3 and rel(unet, unet_ref) <= 2e-3
