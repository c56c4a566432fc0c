"""The fused CoLoRA forward of a mixed batch (design §10): sample n convolved with K0 + ΔK of its adapter set, in
one launch of the fused forward kernel (`conv_fwd._colora_conv_fwd_kernel` with SEGMENTED).

The samples are sorted by set on the device (`segments_of`); the kernel's grid axis 1 is the set, and each set's
rows (its samples × output pixels) are tiled on their own, so a tile never straddles two sets and its merged
tile K0 + ΔK_s is built in registers from that set's factors, as vLLM's LoRA kernels keep per-segment metadata.
Rows read x and write the output at their own sample's place: nothing is gathered or scattered in memory.
"""
from typing import Optional, Sequence, Tuple

import torch
import triton

from ._common import FIXED_CONFIG, backend_error, channels_innermost, channels_innermost_output, extent, \
    finish_output_, launch, pad3, strides5, empty_like_layout
from .conv_fwd import (_check_forward, _colora_conv_fwd_autotuned, _colora_conv_fwd_kernel, _fit_configs,
                       interpreter_config, output_shape)


def segments_of(index: torch.Tensor, n_sets: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sample, seg) for a set index per sample: the samples sorted by set (stable) and the int32 offsets
    [n_sets + 1] of each set's run in that order. Device ops only: no host sync."""
    sample = torch.argsort(index, stable=True).to(torch.int32)
    seg = torch.zeros(n_sets + 1, dtype=torch.int32, device=index.device)
    seg[1:] = torch.cumsum(torch.bincount(index, minlength=n_sets), 0)
    return sample, seg


def colora_conv_forward_segmented(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                                  pointwise: torch.Tensor, depthwise: torch.Tensor,
                                  bias_delta: Optional[torch.Tensor], sample: torch.Tensor, seg: torch.Tensor,
                                  largest_set: int, stride: Sequence[int], padding: Sequence[int],
                                  dilation: Sequence[int], groups: int, order: str) -> torch.Tensor:
    """out[n] = conv(x[n], weight + ΔK_s) + bias + Δb_s, s the set of sample n, for a whole mixed batch.

    pointwise [S, R, C_out, C_in/groups], depthwise [S, R, C_kd, *k] and bias_delta [S, C_out] (or None) hold
    every set's factors (`mixed.stacked_factors`); `sample`, `seg` come from `segments_of`; `largest_set` is the
    most samples a set has (it sizes the grid; an upper bound is fine). Otherwise as `colora_conv_forward`:
    symmetric zero padding, the output in x's layout.
    """
    sets = pointwise.shape[0]
    if pointwise.dim() != 4 or depthwise.shape[:2] != pointwise.shape[:2] or (
            bias_delta is not None and bias_delta.shape != (sets, weight.shape[0])):
        raise backend_error(f"segmented factors must be stacked per set: pointwise {tuple(pointwise.shape)}, "
                            f"depthwise {tuple(depthwise.shape)}, bias_delta "
                            f"{None if bias_delta is None else tuple(bias_delta.shape)}")
    if seg.shape != (sets + 1,) or sample.shape != (x.shape[0],):
        raise backend_error(f"segments do not fit: {tuple(seg.shape)} offsets for {sets} sets, "
                            f"{tuple(sample.shape)} samples for a batch of {x.shape[0]}")
    one = (0,) if pointwise.shape[1] > 1 else (0, 0)  # one set's factors, shaped as colora_conv_forward's
    _check_forward(x, weight, bias, pointwise[one], depthwise[one], None if bias_delta is None else bias_delta[0],
                   stride, padding, dilation, groups, order)
    shape = output_shape(x, weight, stride, padding, dilation)
    out = empty_like_layout(x, shape)
    if out.numel() == 0:
        return out
    x, weight = channels_innermost(x), channels_innermost(weight)
    c_out = weight.shape[0]
    c_in_g, c_out_g = weight.shape[1], c_out // groups
    d_in, h_in, w_in = pad3(x.shape[2:], 1)
    d_out, h_out, w_out = pad3(shape[2:], 1)
    kd, kh, kw = pad3(weight.shape[2:], 1)
    rows = max(1, largest_set) * d_out * h_out * w_out  # the largest set's rows: the grid's axis 0
    kernel_out = channels_innermost_output(out)
    int64 = max(extent(x), extent(kernel_out), extent(weight)) >= 2 ** 31
    args = (
        x, weight, pointwise, depthwise, weight if bias is None else bias,
        weight if bias_delta is None else bias_delta, kernel_out, kernel_out, sample, seg,
        rows, groups, d_in, h_in, w_in, d_out, h_out, w_out,
        *strides5(x), *strides5(weight), *pointwise.stride()[1:],
        *depthwise.stride()[1:3], *pad3(depthwise.stride()[3:], 0),
        0 if bias is None else bias.stride(0), 0 if bias_delta is None else bias_delta.stride(1),
        pointwise.stride(0), depthwise.stride(0), 0 if bias_delta is None else bias_delta.stride(0),
        *strides5(kernel_out),
    )
    flags = dict(C_IN_G=c_in_g, C_OUT_G=c_out_g, RANK=pointwise.shape[1], KD=kd, KH=kh, KW=kw,
                 **dict(zip(("STRIDE_D", "STRIDE_H", "STRIDE_W"), pad3(stride, 1))),
                 **dict(zip(("PAD_D", "PAD_H", "PAD_W"), pad3(padding, 0))),
                 **dict(zip(("DIL_D", "DIL_H", "DIL_W"), pad3(dilation, 1))),
                 PW_FIRST=order == "pointwise_first", HAS_BIAS=bias is not None,
                 HAS_BIAS_DELTA=bias_delta is not None, INT64=int64, SPLIT_K=1, SEGMENTED=True)

    def grid(meta):
        return groups * triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(c_out_g, meta["BLOCK_N"]), sets

    with torch.cuda.device_of(x):
        if FIXED_CONFIG:
            cfg = _fit_configs([interpreter_config()], {"C_OUT_G": c_out_g, "C_IN_G": c_in_g, "x_ptr": x,
                                                         "sx_c": x.stride(1), "RANK": pointwise.shape[1]})[0]
            launch(_colora_conv_fwd_kernel, grid, *args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages)
        else:
            launch(_colora_conv_fwd_autotuned, grid, *args, **flags)
    return finish_output_(out, kernel_out)
