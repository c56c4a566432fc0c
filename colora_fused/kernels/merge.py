"""Merging a CoLoRA residual into its base conv (paper eq. 10–13): `K0 + ΔK`, out of place or in place.

ΔK[o, c, t] = Kp[o, c] · Kd[o, t] (pointwise_first) or Kp[o, c] · Kd[g(o)·C_in/groups + c, t] (depthwise_first),
g(o) = o // (C_out/groups). The in-place merge also folds Δb into b0, in the same launch, with no temporary of
K0's size.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import backend_error, check_conv_tensors, launch


def merge_config():
    """(BLOCK_O, BLOCK_R, num_warps): a memory-bound elementwise pass, one config everywhere."""
    return 16, 128, 4


@triton.jit
def _merge_kernel(
    w_ptr, out_ptr, kp_ptr, kd_ptr, b_ptr, db_ptr,
    C_OUT, C_IN_G, C_OUT_G, KD, KH, KW,
    sw_o, sw_c, sw_d, sw_h, sw_w,
    so_o, so_c, so_d, so_h, so_w,
    sp_o, sp_c,
    sk_c, sk_d, sk_h, sk_w,
    s_b, s_db,
    PW_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[o, c, t] = w[o, c, t] + Kp[o, c] · Kd[·, t] in fp32; with HAS_BIAS also b[o] += db[o].

    w, out: [C_OUT, C_IN_G, KD, KH, KW] by strides (out may be w: an in-place merge; each element is read and
    written by one program). Program (i, j) owns the [BLOCK_O, BLOCK_R] block of rows [i·BLOCK_O, (i+1)·BLOCK_O)
    and flat positions r = c·KD·KH·KW + t in [j·BLOCK_R, (j+1)·BLOCK_R), so the grid grows with the weight and
    fills the GPU; the programs with j = 0 also fold the bias.
    """
    i_o = (tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)  # [BO]
    r = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
    m_o = i_o < C_OUT
    if HAS_BIAS:
        m_b = m_o & (tl.program_id(1) == 0)
        b_b = tl.load(b_ptr + i_o * s_b, mask=m_b).to(tl.float32)  # [BO]
        b_b += tl.load(db_ptr + i_o * s_db, mask=m_b).to(tl.float32)
        tl.store(b_ptr + i_o * s_b, b_b.to(b_ptr.dtype.element_ty), mask=m_b)
    n_taps = KD * KH * KW
    c = r // n_taps
    tap = r % n_taps
    t_d = tap // (KH * KW)
    t_h = (tap // KW) % KH
    t_w = tap % KW
    m = m_o[:, None] & (r < C_IN_G * n_taps)[None, :]  # [BO, BR]
    b_w = tl.load(w_ptr + i_o[:, None] * sw_o + (c * sw_c + t_d * sw_d + t_h * sw_h + t_w * sw_w)[None, :],
                  mask=m, other=0.0).to(tl.float32)  # [BO, BR]
    b_p = tl.load(kp_ptr + i_o[:, None] * sp_o + (c * sp_c)[None, :], mask=m, other=0.0).to(tl.float32)
    kd_tap = t_d * sk_d + t_h * sk_h + t_w * sk_w  # [BR]
    if PW_FIRST:
        b_d = tl.load(kd_ptr + (i_o * sk_c)[:, None] + kd_tap[None, :], mask=m, other=0.0).to(tl.float32)
    else:
        kd_row = (i_o // C_OUT_G) * C_IN_G * sk_c  # [BO] Kd[g(o)·C_IN_G]
        b_d = tl.load(kd_ptr + kd_row[:, None] + (c * sk_c + kd_tap)[None, :], mask=m, other=0.0).to(tl.float32)
    p_o = out_ptr + i_o[:, None] * so_o + (c * so_c + t_d * so_d + t_h * so_h + t_w * so_w)[None, :]
    tl.store(p_o, (b_w + b_p * b_d).to(out_ptr.dtype.element_ty), mask=m)  # [BO, BR]


def _pad_strides(t: torch.Tensor, lead: int):
    """Strides of t with its kernel dims padded in front to (KD, KH, KW) by stride 0."""
    return tuple(t.stride()[:lead]) + (0,) * (3 - (t.dim() - lead)) + tuple(t.stride()[lead:])


def _check_merge(weight, bias, pointwise, depthwise, bias_delta, groups, order):
    if weight.dim() not in (3, 4, 5) or groups < 1 or weight.shape[0] % groups:
        raise backend_error(f"weight {tuple(weight.shape)} with groups={groups} is not a 1d/2d/3d conv weight")
    check_conv_tensors(dict(weight=weight, bias=bias, pointwise=pointwise, depthwise=depthwise,
                            bias_delta=bias_delta), weight, groups, order)


def _launch(weight, out, bias, pointwise, depthwise, bias_delta, groups, order):
    if weight.numel() == 0:
        return
    c_out = weight.shape[0]
    kd, kh, kw = (1,) * (5 - weight.dim()) + tuple(weight.shape[2:])
    block_o, block_r, num_warps = merge_config()
    has_bias = bias is not None and bias_delta is not None
    with torch.cuda.device_of(weight):
        grid = (triton.cdiv(c_out, block_o), triton.cdiv(weight[0].numel(), block_r))
        launch(
            _merge_kernel, grid,
            weight, out, pointwise, depthwise, bias if has_bias else weight, bias_delta if has_bias else weight,
            c_out, weight.shape[1], c_out // groups, kd, kh, kw,
            *_pad_strides(weight, 2), *_pad_strides(out, 2), *pointwise.stride(), *_pad_strides(depthwise, 1),
            bias.stride(0) if has_bias else 0, bias_delta.stride(0) if has_bias else 0,
            PW_FIRST=order == "pointwise_first", HAS_BIAS=has_bias, BLOCK_O=block_o, BLOCK_R=block_r,
            num_warps=num_warps,
        )


def merged_weight(weight: torch.Tensor, pointwise: torch.Tensor, depthwise: torch.Tensor, groups: int,
                  order: str) -> torch.Tensor:
    """A new tensor K0 + ΔK, with weight's dtype, device and strides."""
    _check_merge(weight, None, pointwise, depthwise, None, groups, order)
    out = torch.empty_like(weight)
    _launch(weight, out, None, pointwise, depthwise, None, groups, order)
    return out


def merge_(weight: torch.Tensor, bias: Optional[torch.Tensor], pointwise: torch.Tensor, depthwise: torch.Tensor,
           bias_delta: Optional[torch.Tensor], groups: int, order: str) -> None:
    """In place, one launch: weight += ΔK and, when bias_delta is given, bias += bias_delta."""
    _check_merge(weight, bias, pointwise, depthwise, bias_delta, groups, order)
    if bias_delta is not None and bias is None:
        raise backend_error("bias_delta needs a base bias to merge into, but bias is None")
    _launch(weight, weight, bias, pointwise, depthwise, bias_delta, groups, order)
    # The kernel writes through raw pointers: tell autograd the tensors changed, as an in-place op would.
    torch.autograd.graph.increment_version(weight)
    if bias_delta is not None:
        torch.autograd.graph.increment_version(bias)
