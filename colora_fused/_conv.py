"""Small helpers shared by the layers, the reference and the backends: conv hyper-parameter normalisation."""
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import settings

ORDERS = ("pointwise_first", "depthwise_first")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MergeSpec(NamedTuple):
    """One layer's in-place merge, K0 += ΔK and b0 += Δb (when Δb is given): what it writes and reads."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    pointwise: torch.Tensor
    depthwise: torch.Tensor
    bias_delta: Optional[torch.Tensor]
    groups: int
    order: str


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (the number of Kp ⊛ Kd terms), got {rank!r}")
    return rank


def adapter_rank(pointwise: torch.Tensor) -> int:
    """The terms r of ΔK = Σ_{i<r} Kp[i] ⊛ Kd[i]: 1 for a 2-d Kp [C_out, C_in/groups] (the paper's shapes),
    Kp.shape[0] for a 3-d one [r, C_out, C_in/groups] (then Kd is [r, C_kd, *k])."""
    return pointwise.shape[0] if pointwise.dim() == 3 else 1


def adapter_terms(pointwise: torch.Tensor, depthwise: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kp, Kd with a leading term dim, [r, C_out, C_in/groups] and [r, C_kd, *k] (views, rank 1 included)."""
    if pointwise.dim() == 3:
        return pointwise, depthwise
    return pointwise.unsqueeze(0), depthwise.unsqueeze(0)


def adapter_shapes(weight_shape: Sequence[int], groups: int, order: str, rank: int = 1):
    """(Kp shape, Kd shape) for a base weight [C_out, C_in/groups, *k]: [C_out, C_in/groups] and
    [C_out or C_in, *k] (pointwise_first / depthwise_first), each with a leading r when rank > 1."""
    c_out, c_in_g, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    kd_channels = c_out if order == "pointwise_first" else c_in_g * groups
    lead = (rank,) if rank > 1 else ()
    return (*lead, c_out, c_in_g), (*lead, kd_channels, *kernel)


def conv_output_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int]) -> Tuple[int, ...]:
    """[N, C_out, *spatial] of a conv with symmetric zero padding."""
    spatial = ((size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x_shape[2:], weight_shape[2:], stride, padding, dilation))
    return (x_shape[0], weight_shape[0], *spatial)


def ntuple(value: Union[int, Sequence[int]], n: int) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"expected an int or a tuple of {n} ints, got {value}")
    return value


def check_order(order: str) -> str:
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {ORDERS}")
    return order


def pad_amounts(padding, kernel_size: Sequence[int], dilation: Sequence[int]) -> List[Tuple[int, int]]:
    """Per spatial dim, the (before, after) padding a conv with this `padding` argument applies.

    `"same"` pads `dilation·(k-1)` in total, the extra element after (as torch does for even kernels).
    """
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * n
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
            return [(t // 2, t - t // 2) for t in total]
        raise ValueError(f"unknown padding {padding!r}; use an int, a tuple, 'same' or 'valid'")
    return [(p, p) for p in ntuple(padding, n)]


def f_pad_arg(amounts: Sequence[Tuple[int, int]]) -> List[int]:
    """`amounts` ((before, after) per dim, first dim first) in the last-dim-first order of `F.pad`."""
    out: List[int] = []
    for before, after in reversed(amounts):
        out += [before, after]
    return out


ROUTES = ("cheap", "gradw")
# A depthwise-stencil multiply-add costs about this many GEMM multiply-adds: stencils are memory-bound.
STENCIL_COST = 4


def adapter_grad_route(x_shape: Sequence[int], weight_shape: Sequence[int], out_shape: Sequence[int],
                       order: str, rank: int = 1) -> str:
    """The cheaper way to the adapter gradients of this conv (design §5), by counting multiply-adds.

    "gradw": the full weight gradient (N·HWo·C_out·C_in/g·T), then small reductions. "cheap": two 1×1 GEMMs at
    Z1's resolution plus two depthwise stencils of T taps, the stencils weighted by STENCIL_COST.
    COLORA_GRAD_ROUTE overrides the choice (`settings.grad_route`).

    The one route policy: every caller of an adapter-gradient path (`ops`, aten or Triton) passes the route
    chosen here.
    """
    forced = settings.grad_route()
    if forced is not None:
        if forced not in ROUTES:
            raise ValueError(f"COLORA_GRAD_ROUTE={forced!r}; choose one of {ROUTES}")
        return forced
    n, c_in = x_shape[0], x_shape[1]
    c_out, c_in_g = weight_shape[0], weight_shape[1]
    taps, hw_in, hw_out = math.prod(weight_shape[2:]), math.prod(x_shape[2:]), math.prod(out_shape[2:])
    gradw = n * hw_out * c_out * c_in_g * taps
    if order == "pointwise_first":
        cheap = 2 * n * hw_in * c_out * c_in_g + STENCIL_COST * 2 * n * c_out * hw_out * taps
    else:
        cheap = 2 * n * hw_out * c_out * c_in_g + STENCIL_COST * 2 * n * c_in * hw_out * taps
    return "cheap" if rank * cheap < gradw else "gradw"
