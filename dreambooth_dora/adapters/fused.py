"""The fused fast path of `AdaptedLinear` (dora.py holds the reference math).

With more tokens than input features it is cheaper to build the adapted weight once and run ONE
GEMM than to add the low-rank path to the base output: `y = x W'ᵀ + bias` with
`W' = diag(m/n)(W0 + s·B A)` (DoRA; n detached, paper section 4.3) or `W0 + s·B A` (LoRA). The
backward is written by hand so that the frozen W0 never gets a weight gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _FusedAdapterLinear(torch.autograd.Function):
    """y = x W'ᵀ + bias with W' = diag(m/n)(W0 + s·B A) (DoRA) or W0 + s·B A (LoRA), in ONE GEMM.

    The frozen W0 never needs its weight gradient (Gᵀx, the costly out×T×in GEMM), so the backward
    computes only what the adapter needs, with G = dL/dy (T, out), h = x Aᵀ (T, r)::

        dL/dx = G W'                                  one GEMM, as for the base layer
        dL/dB = s · diag(m/n) Gᵀ h                    (out, r)
        dL/dA = s · (G diag(m/n) B)ᵀ x                (r, in)
        dL/dm = Σ_T (G ⊙ t) / n,  t = x (W0 + s·B A)ᵀ   (DoRA; n is a constant, paper §4.3)

    Saved for backward: x, h (T×r) and, for DoRA, t: one output-sized tensor. W' is rebuilt in
    backward (out·in·r flops) rather than kept.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scaling, norm):
        device_type = x.device.type
        cdt = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            xc = x.to(cdt)
            w_eff = weight.float() + scaling * (lora_b.float() @ lora_a.float())  # (out, in) fp32
            h = F.linear(xc, lora_a.to(cdt))  # (…, r)
            b = None if bias is None else bias.to(cdt)
            if magnitude is None:
                y, t, scale = F.linear(xc, w_eff.to(cdt), b), None, None
            else:
                scale = magnitude.float() / norm  # (out,)
                t = F.linear(xc, w_eff.to(cdt))  # (…, out): the direction's output
                y = t * scale.to(cdt) if b is None else torch.addcmul(b, t, scale.to(cdt))
        ctx.save_for_backward(xc, h, weight, lora_a, lora_b, t, scale, norm)
        ctx.scaling, ctx.cdt, ctx.x_dtype, ctx.has_bias = scaling, cdt, x.dtype, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        xc, h, weight, lora_a, lora_b, t, scale, norm = ctx.saved_tensors
        s, cdt = ctx.scaling, ctx.cdt
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        g = grad.to(cdt)
        g2 = g.reshape(-1, g.shape[-1])  # (T, out)
        b32 = lora_b.float() if scale is None else lora_b.float() * scale[:, None]  # diag(m/n) B
        gx = ga = gb = gm = gbias = None
        if need_x:
            w_prime = weight.float() + s * (lora_b.float() @ lora_a.float())
            if scale is not None:
                w_prime = w_prime * scale[:, None]
            gx = (g @ w_prime.to(cdt)).to(ctx.x_dtype)
        if need_b:
            # (hᵀ G)ᵀ, not Gᵀ h: the same numbers, but a GEMM with r output rows streams G once and
            # runs 3-6x faster on CPU than one with r output columns (benchmarks/bench_layers.py)
            gb = s * (h.reshape(-1, h.shape[-1]).T @ g2).T.float()
            if scale is not None:
                gb = gb * scale[:, None]
        if need_a:
            p = g2 @ b32.T.contiguous().to(cdt).T  # (T, r); the (r, out) layout is the fast one on CPU
            ga = s * (p.T @ xc.reshape(-1, xc.shape[-1])).float()
        if need_m and t is not None:
            gm = (g2 * t.reshape(-1, t.shape[-1])).sum(0, dtype=torch.float32) / norm
        if need_bias and ctx.has_bias:
            gbias = g2.sum(0)
        return gx, None, gbias, ga, gb, gm, None, None


def fused_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling: float, norm):
    """x (…, in) -> (…, out) through the adapted Linear in one GEMM; `magnitude` and `norm` (out,)
    are None for LoRA."""
    return _FusedAdapterLinear.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling, norm)
