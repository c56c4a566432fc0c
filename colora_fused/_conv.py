"""Small helpers shared by the layers, the reference and the backends: conv hyper-parameter normalisation."""
from typing import List, Sequence, Tuple, Union

import torch.nn.functional as F

ORDERS = ("pointwise_first", "depthwise_first")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
