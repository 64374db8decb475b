"""DoRA/LoRA layers against PEFT (the independent reference) and plain-torch formulas."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from dreambooth_dora import (
    AdaptedConv2d,
    AdaptedLinear,
    adapter_parameters,
    adapter_state_dict,
    add_adapters,
    load_adapter_state_dict,
    merge_adapters,
    set_adapters_enabled,
)

TOL = 1e-5


class Net(nn.Module):
    """Two linears (one without bias) and a 3x3 conv: the layer types the UNet adapts."""

    def __init__(self, d_in, d_hidden, d_out, bias=True):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=bias)
        self.down = nn.Linear(d_hidden, d_out, bias=False)
        self.conv = nn.Conv2d(d_out, 6, 3, padding=1, bias=bias)

    def forward(self, x):  # x (N, 16, d_in)
        y = self.down(torch.tanh(self.up(x)))  # (N, 16, d_out)
        return self.conv(y.transpose(1, 2).reshape(y.shape[0], -1, 4, 4))


def randomise(model, seed=1, scale=0.3):
    """Move B (and m) off their initial values so that every term of the math is exercised."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in adapter_state_dict(model).items()}
    load_adapter_state_dict(model, sd)
    return sd


def force_path(model, path):
    """Both forward implementations must be exact: "fused" (one GEMM with W') and "composed"."""
    for module in model.modules():
        if isinstance(module, AdaptedLinear):
            module.fuse_min_tokens_per_feature = {"fused": 0.0, "composed": float("inf")}[path]
    return model


def pair(shape, rank=4, alpha=8, dora=True, bias=True, **kw):
    """Our adapted model and PEFT's, with identical base weights and adapter tensors."""
    torch.manual_seed(0)
    base = Net(*shape, bias=bias)
    ref = inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=["up", "down", "conv"], use_dora=dora,
                   lora_dropout=kw.get("dropout", 0.0), use_rslora=kw.get("use_rslora", False)),
        copy.deepcopy(base))
    ours = base
    add_adapters(ours, ["up", "down", "conv"], rank=rank, alpha=alpha, use_dora=dora, **kw)
    sd = randomise(ours)
    result = set_peft_model_state_dict(ref, sd)
    assert not [k for k in result.unexpected_keys]
    return ours, ref


def same_function(a, b):
    """Equal up to fp32 rounding of a re-associated computation (merged vs unmerged)."""
    return (a - b).abs().max() <= TOL * max(1.0, b.abs().max().item())


def peft_grads(model):
    out = {}
    for k, p in model.named_parameters():
        if p.requires_grad:  # "x.lora_A.default.weight" -> "x.lora_A.weight", magnitude loses ".weight"
            k = k.replace(".default", "")
            out[k.removesuffix(".weight") if k.endswith("lora_magnitude_vector.weight") else k] = p.grad
    return out


SHAPES = [(16, 24, 8), (32, 32, 16), (12, 40, 20)]


@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dora", [True, False])
def test_outputs_and_gradients_match_peft(shape, bias, dora, path):
    ours, ref = pair(shape, dora=dora, bias=bias)
    force_path(ours, path)
    x = torch.randn(2, 16, shape[0])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    assert (ya - yb).abs().max() <= TOL
    w = torch.randn_like(ya)  # a loss whose gradients are O(1), as the 1e-5 bound presumes
    (ya * w).mean().backward()
    (yb * w).mean().backward()
    ref_grads = peft_grads(ref)
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == ref_grads.keys()
    assert any(k.endswith("lora_magnitude_vector") for k in ours_grads) == dora
    for k in ours_grads:
        assert (ours_grads[k] - ref_grads[k]).abs().max() <= TOL, k
    assert (xa.grad - xb.grad).abs().max() <= TOL


@pytest.mark.parametrize("path", ["fused", "composed"])
def test_training_steps_track_peft(path):
    """The norm cache must follow A and B through optimiser steps and accumulation micro-batches."""
    ours, ref = pair((16, 24, 8))
    force_path(ours, path)
    opt_a = torch.optim.AdamW(adapter_parameters(ours), lr=1e-2)
    opt_b = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(3)
    for _ in range(4):
        for _ in range(2):  # two micro-batches per step
            x = torch.randn(2, 16, 16)
            ours(x).square().mean().backward()
            ref(x).square().mean().backward()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    x = torch.randn(2, 16, 16)
    assert (ours(x) - ref(x)).abs().max() <= 1e-4  # four Adam steps apart, still the same model


def test_dropout_matches_peft_in_training():
    ours, ref = pair((16, 24, 8), dropout=0.3)
    ours.train(), ref.train()
    x = torch.randn(2, 16, 16)
    torch.manual_seed(7)
    ya = ours(x)
    torch.manual_seed(7)
    yb = ref(x)
    assert (ya - yb).abs().max() <= TOL
    ours.eval(), ref.eval()
    assert (ours(x) - ref(x)).abs().max() <= TOL


def test_rslora_scaling_matches_peft():
    ours, ref = pair((16, 24, 8), rank=16, alpha=8, use_rslora=True)
    assert ours.up.scaling == pytest.approx(8 / math.sqrt(16))
    x = torch.randn(2, 16, 16)
    assert (ours(x) - ref(x)).abs().max() <= TOL


@pytest.mark.parametrize("dora", [True, False])
def test_merged_weights_match_peft_and_unmerge_restores(dora):
    ours, ref = pair((16, 24, 8), dora=dora)
    x = torch.randn(2, 16, 16)
    y = ours(x)
    base_up = ours.up.weight.clone()
    ref.up.merge()
    ours.up.merge()
    assert (ours.up.weight - ref.up.base_layer.weight).abs().max() <= TOL
    ours.conv.merge()
    ref.conv.merge()
    assert (ours.conv.weight - ref.conv.base_layer.weight).abs().max() <= TOL
    assert same_function(ours(x), y)  # merged forward computes the same function
    ours.up.unmerge()
    ours.conv.unmerge()
    assert (ours.up.weight - base_up).abs().max() <= TOL
    assert same_function(ours(x), y)


def test_merged_layer_is_plain_and_exact():
    ours, _ = pair((16, 24, 8))
    x = torch.randn(2, 16, 16)
    y = ours(x)
    merged = merge_adapters(copy.deepcopy(ours))
    assert type(merged.up) is nn.Linear and type(merged.conv) is nn.Conv2d
    assert not list(adapter_parameters(merged))
    assert same_function(merged(x), y)


def test_math_matches_the_plain_formula():
    """W' = (m / ||W0 + sBA||_row)[:, None] (W0 + sBA), by hand, for the linear layer."""
    ours, _ = pair((12, 40, 20))
    layer = ours.up
    v = layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    w_prime = (layer.lora_magnitude_vector / v.norm(dim=1))[:, None] * v
    x = torch.randn(5, 12)
    assert (layer(x) - F.linear(x, w_prime, layer.bias)).abs().max() <= TOL
    assert (layer.weight_norm() - v.norm(dim=1)).abs().max() <= TOL


def test_norm_is_per_output_row_not_per_input_column():
    ours, _ = pair((12, 40, 20))
    layer = ours.up  # 12 -> 40: not square
    v = (layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).detach()
    m = layer.lora_magnitude_vector.detach()
    x = torch.randn(5, 12)
    per_column = F.linear(x, v * (m.mean() / v.norm(dim=0))[None, :], layer.bias)  # dim=0, as some blogs write it
    per_row = F.linear(x, (m / v.norm(dim=1))[:, None] * v, layer.bias)
    y = layer(x)
    assert (y - per_row).abs().max() <= TOL
    assert (y - per_column).abs().max() > 1e-2
    assert layer.lora_magnitude_vector.shape == (40,)  # one magnitude per output row


def test_initialisation_is_peft_s():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = AdaptedLinear(lin, rank=8, alpha=8)
    assert torch.equal(layer.lora_B.weight, torch.zeros(48, 8))
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    assert torch.allclose(layer.lora_magnitude_vector, lin.weight.norm(dim=1))
    x = torch.randn(3, 64)
    assert (layer(x) - F.linear(x, lin.weight, lin.bias)).abs().max() <= TOL  # starts as the base layer
    big = AdaptedLinear(nn.Linear(512, 512), rank=4, alpha=4, init_lora_weights="gaussian")
    assert big.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    with pytest.raises(ValueError, match="init_lora_weights"):
        AdaptedLinear(nn.Linear(4, 4), rank=2, alpha=2, init_lora_weights="pissa")


@pytest.mark.parametrize("path", ["fused", "composed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_keeps_fp32_norm(dtype, path):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    ref = copy.deepcopy(lin)
    layer = force_path(AdaptedLinear(lin.to(dtype), rank=4, alpha=4), path)
    full = AdaptedLinear(ref, rank=4, alpha=4)
    sd = {"lora_A.weight": layer.lora_A.weight.detach(), "lora_B.weight": torch.randn(32, 4) * 0.1,
          "lora_magnitude_vector": layer.lora_magnitude_vector.detach() * 1.1}
    for target in (layer, full):
        with torch.no_grad():
            target.lora_A.weight.copy_(sd["lora_A.weight"])
            target.lora_B.weight.copy_(sd["lora_B.weight"])
            target.lora_magnitude_vector.copy_(sd["lora_magnitude_vector"])
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_magnitude_vector.dtype == torch.float32
    assert layer.weight_norm().dtype == torch.float32
    x = torch.randn(4, 64)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    assert (y.float() - full(x)).abs().max() <= 0.05 * full(x).abs().max()
    y.float().sum().backward()
    full(x).sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32
    for a, b in ((layer.lora_magnitude_vector, full.lora_magnitude_vector), (layer.lora_B.weight, full.lora_B.weight)):
        assert (a.grad - b.grad).abs().max() <= 0.05 * b.grad.abs().max()
    assert torch.isfinite(layer.lora_A.weight.grad).all()


@pytest.mark.parametrize("path", ["fused", "composed"])
def test_all_zero_row_gives_no_nan(path):
    lin = nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[2] = 0
    layer = force_path(AdaptedLinear(lin, rank=2, alpha=2), path)
    y = layer(torch.randn(3, 8))
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(layer.lora_magnitude_vector.grad).all()


def test_disabled_adapters_give_the_exact_base_model():
    ours, _ = pair((16, 24, 8))
    base = Net(16, 24, 8)
    base.load_state_dict({k: v for k, v in ours.state_dict().items() if "lora_" not in k})
    x = torch.randn(2, 16, 16)
    assert (ours(x) - base(x)).abs().max() > 1e-3
    set_adapters_enabled(ours, False)
    assert torch.equal(ours(x), base(x))
    set_adapters_enabled(ours, True)
    assert (ours(x) - base(x)).abs().max() > 1e-3


def test_base_weight_keeps_its_name_and_type():
    ours, _ = pair((16, 24, 8))
    assert isinstance(ours.up, nn.Linear) and isinstance(ours.conv, nn.Conv2d)
    assert isinstance(ours.conv, AdaptedConv2d)
    keys = [k for k in ours.state_dict() if "lora_" not in k]
    assert keys == [k for k in Net(16, 24, 8).state_dict()]
    assert not ours.up.weight.requires_grad and not ours.up.bias.requires_grad


# ---- add_adapters / state dicts on the tiny Stable Diffusion models -------------------------

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize("dora", [True, False])
def test_unet_state_dict_has_peft_keys_and_shapes(tiny_pipeline, dora):
    unet = tiny_pipeline.unet
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS, use_dora=dora),
                                  copy.deepcopy(unet))
    names = add_adapters(unet, UNET_TARGETS, rank=4, alpha=4, use_dora=dora)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(ref).items()}
    got = {k: tuple(v.shape) for k, v in adapter_state_dict(unet).items()}
    assert got == expected
    assert names and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(expected)  # everything else is frozen


def test_unet_outputs_and_gradients_match_peft(tiny_pipeline):
    unet = tiny_pipeline.unet
    ref = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, use_dora=True),
                                  copy.deepcopy(unet))
    add_adapters(unet, UNET_TARGETS, rank=4, alpha=8)
    set_peft_model_state_dict(ref, randomise(unet, scale=0.2))
    x, t, cond = torch.randn(2, 4, 32, 32), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    ya, yb = unet(x, t, cond).sample, ref(x, t, cond).sample
    assert (ya - yb).abs().max() <= TOL
    ya.square().mean().backward()
    yb.square().mean().backward()
    ref_grads = peft_grads(ref)
    for k, p in unet.named_parameters():
        if p.requires_grad:
            assert (p.grad - ref_grads[k]).abs().max() <= TOL, k


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipeline):
    unet = tiny_pipeline.unet
    add_adapters(unet, UNET_TARGETS, rank=4, alpha=4)
    randomise(unet, scale=0.2)
    x, t, cond = torch.randn(2, 4, 32, 32), torch.tensor([10, 700]), torch.randn(2, 77, 32)
    unet.train()
    unet(x, t, cond).sample.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad()
    unet.enable_gradient_checkpointing()
    unet(x, t, cond).sample.square().mean().backward()
    for n, p in unet.named_parameters():
        if p.requires_grad:
            assert (p.grad - plain[n]).abs().max() <= TOL, n


def test_text_encoder_state_dict_has_peft_keys(tiny_pipeline):
    te = tiny_pipeline.text_encoder
    targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    ref = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets, use_dora=True),
                                  copy.deepcopy(te))
    add_adapters(te, targets, rank=2, alpha=2)
    assert {k: v.shape for k, v in adapter_state_dict(te).items()} == \
        {k: v.shape for k, v in get_peft_model_state_dict(ref).items()}


def test_target_matching_follows_peft_rules(tiny_pipeline):
    unet = tiny_pipeline.unet
    # suffix match: "attn2.to_k" selects only cross-attention keys; exact full names work too
    ref = inject_adapter_in_model(LoraConfig(r=2, target_modules=["attn2.to_k", "conv_in"]), copy.deepcopy(unet))
    names = add_adapters(copy.deepcopy(unet), ["attn2.to_k", "conv_in"], rank=2)
    assert set(names) == {k.rsplit(".lora_A", 1)[0] for k in get_peft_model_state_dict(ref) if ".lora_A" in k}
    assert "conv_in" in names and all(n.endswith("attn2.to_k") for n in names if n != "conv_in")
    # a string is a regex over the whole name
    names = add_adapters(copy.deepcopy(unet), r".*attn1\.to_(q|v)", rank=2)
    assert names and all(n.endswith(("attn1.to_q", "attn1.to_v")) for n in names)


def test_unknown_and_unsupported_targets_fail_clearly(tiny_pipeline):
    unet = tiny_pipeline.unet
    with pytest.raises(ValueError, match=r"\['to_qq'\] matched no module .* include: .*to_q"):
        add_adapters(unet, ["to_q", "to_qq"], rank=2)
    with pytest.raises(ValueError, match="is a GroupNorm; adapters support torch.nn.Linear, torch.nn.Conv2d"):
        add_adapters(copy.deepcopy(unet), ["conv_norm_out"], rank=2)
    assert not list(adapter_parameters(unet))  # a failed call wrapped nothing


def test_load_rejects_missing_extra_and_misshaped_keys(tiny_pipeline):
    te = tiny_pipeline.text_encoder
    add_adapters(te, ["q_proj", "v_proj"], rank=2)
    good = {k: v.clone() for k, v in adapter_state_dict(te).items()}
    before = copy.deepcopy(good)
    key = next(iter(good))
    missing = dict(good)
    del missing[key]
    with pytest.raises(ValueError, match=r"1 missing: " + key.replace(".", r"\.")):
        load_adapter_state_dict(te, missing)
    with pytest.raises(ValueError, match="1 unexpected: foo.lora_A.weight"):
        load_adapter_state_dict(te, {**good, "foo.lora_A.weight": torch.zeros(1)})
    wrong = {**{k: v + 1 for k, v in good.items()}, key: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"1 wrong shape: .* \(3, 3\) != "):
        load_adapter_state_dict(te, wrong)
    for k, v in adapter_state_dict(te).items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("path", ["fused", "composed"])
def test_autocast_runs_in_low_precision_with_fp32_adapter_grads(path):
    """Mixed precision as accelerate runs it: fp32 parameters, bf16 compute under autocast."""
    ours, ref = pair((16, 24, 8))
    force_path(ours, path)
    x = torch.randn(2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours.up(x)
    assert y.dtype == torch.bfloat16
    expected = ref.up(x)
    assert (y.float() - expected).abs().max() <= 0.03 * expected.abs().max()
    y.float().square().mean().backward()
    for p in ours.up.adapter_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
