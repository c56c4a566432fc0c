"""Adapter gradients of the fused CoLoRA convolution (design §5): the launcher. It checks a call, stages X and dY
channels-innermost once, and runs on each rank-1 term the algorithm of the route its caller chose
(`_conv.adapter_grad_route`, the one route policy):

- "gradw" (`adapters_gradw`, F): a weight-gradient GEMM per tap folded into dKp and dKd in its epilogue;
- "cheap" (≈ 2F/prod(k) plus the stencils): the one-pass kernel (`adapters_one_pass`) where it serves the shape
  (`one_pass_unsupported`), else the two-pass form (`adapters_two_pass`), the reason logged once per shape;
- "two_pass": the two-pass form on any shape (how the tests and the audit cover it beyond the shapes the cheap
  route sends it).

Tensors are seen as 5-d `[N, C, D, H, W]` with arbitrary strides, as in the input gradient. Reductions over
positions are split into programs that write fp32 partials, summed in a fixed order (bit-reproducible). With
`COLORA_NAN_FILL=1` every partial buffer starts as NaN (the tests set it).
"""
import contextlib
import logging
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .._conv import ROUTES, adapter_terms, conv_output_shape
from ._common import (channels_innermost, check_backward_conv, check_backward_tensors, checked_sets, device_limits,
                      fail, lift, Segments)
from .adapters_gradw import adapter_grads_gradw
from .adapters_one_pass import adapter_grads_one_pass, one_pass_unsupported
from .adapters_two_pass import adapter_grads_two_pass

logger = logging.getLogger(__name__)

TWO_PASS = "two_pass"
_TWO_PASS_LOGGED = set()


def _log_two_pass(reason: str, x_shape, weight_shape, groups: int) -> None:
    key = (reason, x_shape, weight_shape, groups)
    if key not in _TWO_PASS_LOGGED:
        _TWO_PASS_LOGGED.add(key)
        logger.info("colora_fused: adapter gradients of x %s, weight %s, groups %d by the two-kernel cheap route: %s",
                    list(x_shape), list(weight_shape), groups, reason)


def _algorithm(route: str, x: torch.Tensor, weight: torch.Tensor, groups: int, taps: int, device: torch.device):
    """The function that computes one term's gradients on `route`."""
    if route == "gradw":
        return adapter_grads_gradw
    if route == "cheap":
        reason = one_pass_unsupported(weight.shape[1], weight.shape[0] // groups, taps,
                                      device_limits(device).capability)
        if reason is None:
            return adapter_grads_one_pass
        _log_two_pass(reason, tuple(x.shape), tuple(weight.shape), groups)
    return adapter_grads_two_pass


def _terms_as(grads: List[torch.Tensor], like: torch.Tensor, segmented: bool) -> torch.Tensor:
    """The terms' fp32 gradients as one tensor of like's shape and dtype (the terms after the set dim when
    segmented)."""
    stacked = grads[0] if len(grads) == 1 else torch.stack(grads, dim=int(segmented))
    return stacked.reshape(like.shape).to(like.dtype)


def colora_conv_backward_adapters(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                                  pointwise: torch.Tensor, depthwise: torch.Tensor, stride: Sequence[int],
                                  padding: Sequence[int], dilation: Sequence[int], groups: int, order: str, *,
                                  route: str, segments: Optional[Segments] = None
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dKp, dKd) of `conv(X, K0 + Kp ⊛ Kd, ...)` given dL/dO = grad_out, by `route` ("cheap", "gradw" or
    "two_pass": the module docstring).

    x: [N, C_in, *in], grad_out: [N, C_out, *out] (one dtype, any strides); dKp in pointwise's dtype, dKd in
    depthwise's. dΔb is not computed here: it is grad_out summed over its positions, which the caller does.
    Rank r (Kp [r, C_out, C_in/groups], Kd [r, C_kd, *k]): each term's gradients are those of a rank-1 adapter
    of that term (ΔK is linear in the terms), so the terms run one after another (r times the cost) on X and dY
    staged once, with the same algorithm.

    With `segments` (a mixed batch, design §10; `kernels.segmented.segments_of`), sample n belongs to one adapter
    set: pointwise and depthwise are every set's factors stacked, [S, R, C_out, C_in/groups] and [S, R, C_kd, *k],
    and each set's gradients reduce over its own samples only, in the same launches (the grid's split axis runs
    over sets × splits): dKp, dKd come back stacked likewise.
    """
    one_kp, one_kd = (pointwise, depthwise) if segments is None else checked_sets(pointwise, depthwise, segments,
                                                                                   x.shape[0])
    device = check_backward_tensors(x=x, grad_out=grad_out, weight=weight, pointwise=one_kp, depthwise=one_kd)
    stride3, pad3, dil3, k3 = check_backward_conv(weight, one_kp, one_kd, stride, padding, dilation, groups, order)
    nd = weight.dim() - 2
    c_out, c_in_g = weight.shape[:2]
    if x.dim() != nd + 2 or x.shape[1] != c_in_g * groups:
        fail(ValueError, f"x has shape {tuple(x.shape)}, which does not fit weight {tuple(weight.shape)} "
                          f"with groups={groups}")
    if x.dtype != grad_out.dtype:
        fail(TypeError, f"x ({x.dtype}) and grad_out ({grad_out.dtype}) must share a dtype")
    out_spatial = conv_output_shape(x.shape, weight.shape, stride3[3 - nd:], pad3[3 - nd:], dil3[3 - nd:])[2:]
    if tuple(grad_out.shape) != (x.shape[0], c_out, *out_spatial):
        fail(ValueError, f"grad_out has shape {tuple(grad_out.shape)}, expected {(x.shape[0], c_out, *out_spatial)}")
    if route not in (*ROUTES, TWO_PASS):
        fail(ValueError, f"unknown route {route!r}; choose one of {(*ROUTES, TWO_PASS)}")
    algorithm = _algorithm(route, x, weight, groups, math.prod(k3), device)

    # The main loops read X and dY channels-innermost (NCHW ones are staged), once for all the terms.
    xs, dy = lift(channels_innermost(x), 2), lift(channels_innermost(grad_out), 2)
    dw_first = order == "depthwise_first"
    if segments is None:
        terms = zip(*adapter_terms(pointwise, depthwise))
    else:  # [S, R, ...]: term r of every set
        terms = ((pointwise[:, r], depthwise[:, r]) for r in range(pointwise.shape[1]))
    lead = 1 if segments is None else 2
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        grads = [algorithm(xs, dy, kp, lift(kd, lead), stride3, pad3, dil3, groups, dw_first, segments)
                 for kp, kd in terms]
    segmented = segments is not None
    return (_terms_as([g[0] for g in grads], pointwise, segmented),
            _terms_as([g[1] for g in grads], depthwise, segmented))
