"""The literal, unmerged CoLoRA convolution (paper eq. 16–19 and eq. 9) through plain autograd: the oracle.

pointwise_first:  Z1 = Kp ⊛ I (1×1, the base conv's groups), Z2 = Kd ⊛ Z1 (depthwise over C_out, with the
                  base conv's stride/padding/dilation), O = K0 ⊛ I + b0 + Z2 + Δb.
depthwise_first:  Z1 = Kd ⊛ I (depthwise over C_in, base stride/padding/dilation), Z2 = Kp ⊛ Z1 (1×1, groups),
                  O = K0 ⊛ I + b0 + Z2 + Δb.
Rank r (Kp [r, C_out, C_in/groups], Kd [r, C_kd, *k]) sums one Z2 per term.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._conv import CONV_FNS, adapter_terms, check_order, f_pad_arg, pad_amounts, ntuple


def colora_conv_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          pointwise: torch.Tensor, depthwise: torch.Tensor, bias_delta: Optional[torch.Tensor],
                          stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                          order: str = "pointwise_first") -> torch.Tensor:
    check_order(order)
    nd = weight.dim() - 2
    conv = CONV_FNS[nd]
    if padding_mode != "zeros":
        amounts = pad_amounts(padding, weight.shape[2:], ntuple(dilation, nd))
        x = F.pad(x, f_pad_arg(amounts), mode=padding_mode)
        padding = 0
    return conv(x, weight, bias, stride, padding, dilation, groups) + residual_reference(
        x, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order)


def residual_reference(x: torch.Tensor, pointwise: torch.Tensor, depthwise: torch.Tensor,
                       bias_delta: Optional[torch.Tensor], stride=1, padding=0, dilation=1, groups: int = 1,
                       order: str = "pointwise_first") -> torch.Tensor:
    """Z2 + Δb of eq. 16–19 (summed over the rank-r terms) on an x already padded by any non-zero padding mode:
    the CoLoRA residual without the base conv."""
    nd = x.dim() - 2
    conv = CONV_FNS[nd]
    c_out, c_in = pointwise.shape[-2], x.shape[1]
    one = (1,) * nd
    out = 0
    for i, (kp, kd) in enumerate(zip(*adapter_terms(pointwise, depthwise))):  # rank r: ΔK = Σ_i Kp[i] ⊛ Kd[i]
        db = bias_delta if i == 0 else None
        if order == "pointwise_first":
            z1 = conv(x, kp.reshape(c_out, -1, *one), None, 1, 0, 1, groups)
            out = out + conv(z1, kd.unsqueeze(1), db, stride, padding, dilation, c_out)
        else:
            z1 = conv(x, kd.unsqueeze(1), None, stride, padding, dilation, c_in)
            out = out + conv(z1, kp.reshape(c_out, -1, *one), db, 1, 0, 1, groups)
    return out


def delta_weight_reference(pointwise: torch.Tensor, depthwise: torch.Tensor, groups: int,
                           order: str = "pointwise_first") -> torch.Tensor:
    """ΔK = Σ_i Kp[i] ⊛ Kd[i], shaped like the base weight [C_out, C_in/groups, *k] (design §1)."""
    check_order(order)
    kps, kds = adapter_terms(pointwise, depthwise)
    c_out, c_in_g = kps.shape[1:]
    if order == "pointwise_first":
        return torch.einsum("roc,ro...->oc...", kps, kds)
    kd = kds.reshape(kds.shape[0], groups, c_in_g, *kds.shape[2:])
    kd = kd.repeat_interleave(c_out // groups, dim=1)  # [r, C_out, C_in/groups, *k]: Kd[i, g(o)·C_in/groups + c]
    return (kps.reshape(*kps.shape, *([1] * (kds.dim() - 2))) * kd).sum(0)
