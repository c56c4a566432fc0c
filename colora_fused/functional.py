"""`colora_conv`: the one entry point of a CoLoRA convolution, and the one place that picks its backend."""
import contextlib
import importlib.util
import logging
import os
import time
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from ._conv import PADDING_MODES, TRITON_DTYPES, check_order, f_pad_arg, interpreter_enabled, ntuple, pad_amounts
from .reference import colora_conv_reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch", "reference")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    return backend


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_unsupported_reason(x: Tensor, weight: Tensor, groups: int) -> Optional[str]:
    """Why the triton backend cannot run this call, or None when it can."""
    if not triton_available():
        return "triton is not installed"
    if not (x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())):
        return (f"tensors on {x.device} need CUDA (or TRITON_INTERPRET=1 set before triton is imported, "
                "for CPU tests)")
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16 are)"
    from .kernels.conv_fwd import supports_forward
    return supports_forward(x, weight, groups)


_FASTEST: Dict[tuple, str] = {}


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms; on CUDA between events recorded around it, after it has finished."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Median of `repeats` timed calls of `fn` in ms, after one warm-up call."""
    fn()
    return sorted(timed_ms(fn, device) for _ in range(repeats))[repeats // 2]


def fastest_backend(x: Tensor, weight: Tensor, pointwise: Tensor, depthwise: Tensor, stride, padding, dilation,
                    groups: int, order: str, training: bool, candidates: Sequence[str] = ("triton", "torch")) -> str:
    """The candidate backend that runs this (zero-padded) conv fastest, measured once per shape and cached.

    With `training`, a forward plus the backward (input and adapter gradients) is timed, else the forward.
    """
    key = (tuple(x.shape), x.stride(), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation),
           groups, x.dtype, x.device, order, training, tuple(candidates))
    if key not in _FASTEST:
        with torch.no_grad():
            grad = torch.randn_like(ops.conv(x, weight, None, pointwise, depthwise, None, stride, padding, dilation,
                                             groups, order, "torch"))

        def step(name):
            with torch.no_grad():
                ops.conv(x, weight, None, pointwise, depthwise, None, stride, padding, dilation, groups, order, name)
                if training:
                    ops.conv_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups,
                                      order, name, True, False, True)

        times = {name: _time_ms(lambda: step(name), x.device) for name in candidates}
        _FASTEST[key] = min(times, key=times.get)
        logger.info("colora_fused: backend %s for x %s, weight %s (%s)", _FASTEST[key], tuple(x.shape),
                    tuple(weight.shape), ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    return _FASTEST[key]


def requested_backend(backend: str) -> str:
    """`backend`, with `auto` replaced by COLORA_BACKEND when that is set."""
    check_backend(backend)
    if backend == "auto":
        return check_backend(os.environ.get("COLORA_BACKEND", "auto") or "auto")
    return backend


def resolve_backend(backend: str, x: Tensor, weight: Tensor, groups: int) -> str:
    """The backend for a call on these (padded, autocast) tensors: `auto` → COLORA_BACKEND if set, else
    "auto-cuda" where triton runs, else torch.

    "auto-cuda" means: triton or torch, whichever `fastest_backend` measures faster for the shape (decided in
    `colora_conv`); set COLORA_AUTOTUNE=0 to always take triton there.
    """
    backend = requested_backend(backend)
    if backend == "auto":
        if x.is_cuda and triton_unsupported_reason(x, weight, groups) is None:
            return "auto-cuda"
        return "torch"
    if backend == "triton":
        reason = triton_unsupported_reason(x, weight, groups)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run this convolution: {reason}; "
                             "use backend='torch' (or 'auto') instead")
    return backend


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def colora_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], pointwise: Tensor, depthwise: Tensor,
                bias_delta: Optional[Tensor], stride=1, padding=0, dilation=1, groups: int = 1,
                padding_mode: str = "zeros", order: str = "pointwise_first", backend: str = "auto") -> Tensor:
    """A CoLoRA convolution O = (K0 + Kp⊛Kd) ⊛ x + b0 + Δb, shaped and padded as `F.conv{1,2,3}d` would.

    x: [N, C_in, *spatial] or unbatched [C_in, *spatial]; weight K0: [C_out, C_in/groups, *k];
    pointwise Kp: [C_out, C_in/groups]; depthwise Kd: [C_out, *k] (pointwise_first) or [C_in, *k]
    (depthwise_first). Under autocast the tensors are cast as for `F.conv2d`; gradients flow back in the
    parameters' own dtypes.
    """
    check_order(order)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; choose one of {PADDING_MODES}")
    nd = weight.dim() - 2
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    if requested_backend(backend) == "reference":
        out = colora_conv_reference(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation,
                                    groups, padding_mode, order)
        return out.squeeze(0) if unbatched else out

    stride, dilation = ntuple(stride, nd), ntuple(dilation, nd)
    if padding == "same" and any(s != 1 for s in stride):
        raise ValueError("padding='same' is not supported for strided convolutions")
    amounts = pad_amounts(padding, weight.shape[2:], dilation)
    if padding_mode != "zeros" or any(before != after for before, after in amounts):
        x = F.pad(x, f_pad_arg(amounts), mode="constant" if padding_mode == "zeros" else padding_mode)
        padding = (0,) * nd
    else:
        padding = tuple(before for before, _ in amounts)

    # As autocast does for F.conv2d: floating tensors other than float64 run in the autocast dtype. After the
    # padding, which CPU autocast runs in float32.
    dtype = _autocast_dtype(x.device.type)
    if dtype is not None:
        x, weight, bias, pointwise, depthwise, bias_delta = (
            t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            for t in (x, weight, bias, pointwise, depthwise, bias_delta))
    backend = resolve_backend(backend, x, weight, groups)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if backend == "auto-cuda":
            backend = "triton"
            if os.environ.get("COLORA_AUTOTUNE", "1") != "0" and not torch.compiler.is_compiling():
                training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, pointwise, depthwise))
                backend = fastest_backend(x, weight, pointwise, depthwise, stride, padding, dilation, groups,
                                          order, training)
        out = ops.conv(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups,
                       order, backend)
    return out.squeeze(0) if unbatched else out
