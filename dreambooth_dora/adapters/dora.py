"""DoRA and LoRA adapter layers for `nn.Linear` and `nn.Conv2d`.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353) splits
a pretrained weight into a magnitude and a direction and adapts the direction with LoRA::

          x ──────────────► W0 (frozen, out×in) ───► base = x W0ᵀ           (…, out)
          │                                               │
          └─► dropout ─► A (r×in) ─► B (out×r) · s ──► + lora             (…, out)
                                                          │
                                            t = base + s·x Aᵀ Bᵀ          (…, out)
                                                          │
          y = (m / n) ⊙ t + bias,   n_i = ‖(W0 + s·B A)_i‖  per OUTPUT row,  detached

`m` (out,) is trainable and starts at the row norms of W0, so the layer starts as the base layer.
LoRA is the same layer with no magnitude: `y = t + bias`.

Following section 4.3 of the paper ("we suggest treating ‖V + ΔV‖_c in Eq. (5) as a constant,
thereby detaching it from the gradient graph"), and PEFT, the norm gets no gradient. Because of
that it can be computed without building `W0 + s·B A` (out×in) on every call::

    ‖V_i‖² = ‖W0_i‖² + 2s·Σ_k B_ik (W0 Aᵀ)_ik + s²·(B (A Aᵀ) Bᵀ)_ii

in fp32, with `‖W0_i‖²` kept while W0 is unchanged and the whole norm kept while A, B and W0 are
unchanged (gradient-accumulation micro-batches and checkpoint recomputation reuse it). Change
detection uses the tensors' version counters, which in-place updates through the tensor itself
bump (optimiser steps, `load_state_dict`, `copy_` under `no_grad`); writes through `.data` are
invisible to it, so code that does that must call `clear_cache()`.

The output combines the base output and the low-rank path with one fused `addmm` and one
`addcmul`, so DoRA saves a single extra output-sized tensor (`t`) for backward beyond LoRA.
This module is the reference: the layers' math as written above. `fused.py` holds the fast
path a Linear layer takes with many tokens (one GEMM with the merged weight and a hand-written
backward); it computes the same numbers (tests/test_dora.py checks both against PEFT).

With dropout in training, PEFT applies the magnitude rescaling to the dropped-out input's base
output; we do the same so that a run matches PEFT step for step:
`y = x W0ᵀ + bias + (m/n)(xd W0ᵀ + s·xd Aᵀ Bᵀ) - xd W0ᵀ`, with `xd = dropout(x)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .fused import fused_linear

NORM_EPS = 1e-12  # an all-zero row (n = 0, m = 0) gives scale 0, never NaN


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023): the one place it is computed."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


def _per_row(v: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(out,) against a weight (out, in) or (out, in, kh, kw): one factor per output row."""
    return v.view(-1, *([1] * (weight.dim() - 1)))


class AdaptedLayer(nn.Module):
    """What DoRA/LoRA layers share. Subclasses also inherit from the base layer type, so the base
    weight keeps its name (`<path>.weight`) and `isinstance(layer, nn.Linear)` still holds.

    Adapter parameters: `lora_A.weight`, `lora_B.weight` and, for DoRA, `lora_magnitude_vector`,
    the names PEFT and diffusers use in adapter files.
    """

    rank: int
    alpha: float
    scaling: float
    use_dora: bool
    merged: bool
    adapter_enabled: bool

    def _init_adapter(self, rank, alpha, use_dora, dropout, use_rslora, init_lora_weights):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.use_dora, self.use_rslora = int(rank), bool(use_dora), bool(use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.adapter_enabled = True
        self._norm_cache = None  # (key, n)
        self._w0_cache = None  # (key, ‖W0_i‖²)
        self._merge_norm = None
        self.set_alpha(alpha)
        self.reset_adapter_parameters(init_lora_weights)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @torch.no_grad()
    def reset_adapter_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initialisations: B = 0; A Kaiming-uniform (`True`) or N(0, 1/r) (`"gaussian"`);
        the magnitude = ‖W0‖ per output row, so a fresh adapter is the identity."""
        if init_lora_weights is True:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.rank)
        else:
            raise ValueError(f"init_lora_weights must be True or 'gaussian', got {init_lora_weights!r}")
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            norm = self.weight.detach().float().flatten(1).norm(dim=1)
            shape = (1, -1) + (1,) * (self.weight.dim() - 2) if self.weight.dim() > 2 else (-1,)
            if not hasattr(self, "lora_magnitude_vector"):
                self.lora_magnitude_vector = nn.Parameter(norm.reshape(shape))
            else:
                self.lora_magnitude_vector.copy_(norm.reshape(shape))
        self.clear_cache()

    def set_alpha(self, alpha: float) -> None:
        """Alpha and the scale it implies (a file's per-module `alpha_pattern` sets it after init)."""
        self.alpha = float(alpha)
        self.scaling = lora_scaling(self.alpha, self.rank, self.use_rslora)
        self.clear_cache()  # the cached norm depends on s

    def clear_cache(self) -> None:
        self._norm_cache = None
        self._w0_cache = None

    # ---- the norm -------------------------------------------------------------------------

    @staticmethod
    def _key(*tensors):
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·B A‖ per output row, shape (out,), fp32, never part of the autograd graph."""
        W0, A, B = self.weight, self.lora_A.weight, self.lora_B.weight
        key = self._key(W0, A, B) + (self.scaling,)
        if self._norm_cache is not None and self._norm_cache[0] == key:
            return self._norm_cache[1]
        w = W0.flatten(1).float()  # (out, in·k·k)
        w_key = self._key(W0)
        if self._w0_cache is None or self._w0_cache[0] != w_key:
            self._w0_cache = (w_key, w.square().sum(dim=1))
        a = A.flatten(1).float()  # (r, in·k·k)
        b = B.flatten(1).float()  # (out, r)
        s = self.scaling
        # Σ_k B_ik [2s (W0 Aᵀ)_ik + s² (B A Aᵀ)_ik] = 2s<W0_i, (B A)_i> + s²‖(B A)_i‖², one addmm
        inner = torch.addmm(b @ (a @ a.T), w, a.T, beta=s * s, alpha=2 * s)  # (out, r)
        n2 = self._w0_cache[1] + (b * inner).sum(dim=1)
        n = n2.clamp_min(0).sqrt().clamp_min(NORM_EPS)
        self._norm_cache = (key, n)
        return n

    def magnitude_scale(self) -> torch.Tensor:
        """m / n, shape (out,), fp32; the gradient flows to m only."""
        return self.lora_magnitude_vector.flatten().float() / self.weight_norm()

    # ---- forward --------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self._base(x, self.bias)
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        xd = self.lora_dropout(x) if dropout_active else x
        h = self._lora_A(xd.to(self.lora_A.weight.dtype))  # (…, r) in the adapter's dtype
        if not self.use_dora:
            return self._add_lowrank(self._base(x, self.bias), h)
        base_d = self._base(xd, None)  # (…, out), no bias
        t = self._add_lowrank(base_d, h)  # xd W0ᵀ + s·xd Aᵀ Bᵀ
        # m / n applied in fp32: under autocast t is 16-bit, and the magnitude's gradient (a sum over
        # every token of grad_y * t) would otherwise be formed from 16-bit products
        scale = self._per_channel(self.magnitude_scale())
        if dropout_active:
            y = (t.float() * scale).to(t.dtype) + self._base(x, self.bias) - base_d
        elif self.bias is not None:
            y = torch.addcmul(self._per_channel(self.bias.float()), t.float(), scale).to(t.dtype)
        else:
            y = (t.float() * scale).to(t.dtype)
        return y

    # ---- merge ----------------------------------------------------------------------------

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s · B A in the base weight's shape, fp32."""
        a = self.lora_A.weight.flatten(1).float()
        b = self.lora_B.weight.flatten(1).float()
        return (self.scaling * (b @ a)).reshape(self.weight.shape)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight that makes the plain base layer compute this adapted layer (eval mode)."""
        w = self.weight.float() + self.delta_weight()
        if self.use_dora:
            w = _per_row(self.magnitude_scale(), w) * w
        return w.to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight in place; forward then costs the base layer's."""
        if self.merged:
            return
        if self.use_dora:
            self._merge_norm = self.weight_norm().clone()  # unmerge needs the norm of W0, not of W'
        self.weight.copy_(self.merged_weight())
        self.merged = True
        self.clear_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.weight.float()
        if self.use_dora:
            inv = self._merge_norm / self.lora_magnitude_vector.flatten().float()
            w = _per_row(inv, w) * w
            self._merge_norm = None
        self.weight.copy_((w - self.delta_weight()).to(self.weight.dtype))
        self.merged = False
        self.clear_cache()

    def adapter_parameters(self) -> list[nn.Parameter]:
        params = [self.lora_A.weight, self.lora_B.weight]
        if self.use_dora:
            params.append(self.lora_magnitude_vector)
        return params

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"{super().extra_repr()}, {kind}: rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


class AdaptedLinear(AdaptedLayer, nn.Linear):
    """`nn.Linear` with a DoRA (`use_dora=True`) or LoRA adapter. Shapes: x (…, in) -> (…, out);
    A (r, in), B (out, r), magnitude (out,)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, use_dora: bool = True, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        factory = {"device": base.weight.device, "dtype": torch.float32}  # adapters stay fp32
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **factory)
        self._init_adapter(rank, alpha, use_dora, dropout, use_rslora, init_lora_weights)

    # Fused (one GEMM with W', extra work ~ out·in) pays when there are more tokens than input
    # features; below that the composed form above (extra work ~ tokens·out) is cheaper. Measured
    # in benchmarks/bench_layers.py. The fused path computes the same numbers (fused.py).
    fuse_min_tokens_per_feature: float = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout_active = self.training and not isinstance(self.lora_dropout, nn.Identity)
        tokens = x.numel() // max(x.shape[-1], 1)
        if (self.merged or not self.adapter_enabled or dropout_active
                or tokens < self.fuse_min_tokens_per_feature * self.in_features):
            return super().forward(x)  # the reference path: AdaptedLayer.forward
        magnitude = self.lora_magnitude_vector if self.use_dora else None
        return fused_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, magnitude,
                            self.scaling, self.weight_norm() if self.use_dora else None)

    def _base(self, x, bias):
        return F.linear(x, self.weight, bias)

    def _lora_A(self, x):
        return F.linear(x, self.lora_A.weight)

    def _add_lowrank(self, base_out, h):
        # base_out + s·h Bᵀ in one GEMM with accumulate; (…, out). Bᵀ is made contiguous (r, out):
        # the backward's G·(s·B) then runs 2-3x faster on CPU than with the transposed view
        sbt = (self.lora_B.weight * self.scaling).to(base_out.dtype).T.contiguous()
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]).to(base_out.dtype), sbt)
        return out.view(base_out.shape)

    @staticmethod
    def _per_channel(v):  # (out,) against activations (…, out)
        return v

    def merged_layer(self) -> nn.Linear:
        """A plain `nn.Linear` computing this adapted layer (a copy; self is unchanged)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight if self.merged else self.merged_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


class AdaptedConv2d(AdaptedLayer, nn.Conv2d):
    """`nn.Conv2d` (groups=1) with a DoRA or LoRA adapter, as PEFT builds it: A is a conv with
    the base kernel, stride and padding to r channels, B a 1×1 conv to `out` channels; the
    magnitude has PEFT's shape (1, out, 1, 1) and the norm is per output channel."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, use_dora: bool = True, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool | str = True):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError("adapters support Conv2d with groups=1 and zero padding only")
        nn.Module.__init__(self)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, attr, getattr(base, attr))
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Conv2d(self.in_channels, rank, self.kernel_size, self.stride, self.padding, self.dilation,
                                bias=False, **factory)
        self.lora_B = nn.Conv2d(rank, self.out_channels, 1, bias=False, **factory)
        self._init_adapter(rank, alpha, use_dora, dropout, use_rslora, init_lora_weights)

    def _base(self, x, bias):
        return F.conv2d(x, self.weight, bias, self.stride, self.padding, self.dilation)

    def _lora_A(self, x):
        return self.lora_A(x)

    def _add_lowrank(self, base_out, h):
        sb = (self.lora_B.weight * self.scaling).to(base_out.dtype)
        return base_out + F.conv2d(h.to(base_out.dtype), sb)

    @staticmethod
    def _per_channel(v):  # (out,) against activations (N, out, H, W)
        return v.view(1, -1, 1, 1)

    def merged_layer(self) -> nn.Conv2d:
        layer = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                          self.dilation, bias=self.bias is not None, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight if self.merged else self.merged_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer


ADAPTED_TYPES = {nn.Linear: AdaptedLinear, nn.Conv2d: AdaptedConv2d}
