"""`colora_conv`: the one entry point of a CoLoRA convolution, and the one place that picks its backend."""
import contextlib
import functools
import importlib.util
import logging
import time
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor

from . import backends, ops, settings
from ._conv import (PADDING_MODES, TRITON_DTYPES, MergeSpec, adapter_rank, adapter_shapes, check_order, f_pad_arg,
                    ntuple, pad_amounts)
from .reference import colora_conv_reference

logger = logging.getLogger(__name__)

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def unsupported_reason(backend: str, x: Tensor, weight: Tensor, groups: int) -> Optional[str]:
    """Why `backend` cannot run this call, or None when it can. A backend with a Triton part (`backends.TABLE`)
    needs triton, one of its devices (or CPU tensors under the interpreter) and a dtype the kernels take; the
    fused kernels ("triton") also need a conv they serve (`kernels.conv_fwd.supports_forward`)."""
    record = backends.TABLE[backend]
    if not record.triton:
        return None
    if not triton_available():
        return "triton is not installed"
    if not (x.device.type in record.devices or (x.device.type == "cpu" and settings.triton_interpret())):
        return (f"tensors on {x.device} need CUDA (or TRITON_INTERPRET=1 set before triton is imported, "
                "for CPU tests)")
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} is not supported (float32, float16, bfloat16 are)"
    if backend == "triton":
        from .kernels.conv_fwd import supports_forward
        return supports_forward(x, weight, groups)
    return None


def fused_prefers_library(weight: Tensor, groups: int) -> bool:
    """Whether `auto` leaves this conv's forward and input gradient to the library conv on the merged weight
    (cuDNN) rather than the fused kernels: thin groups (depthwise and the like), where the fused kernels have no
    tensor-core tile to fill (the audit's dw rows: no MMA) and cuDNN's depthwise kernels are far better."""
    from .kernels.conv_fwd import thin_groups
    return thin_groups(weight.shape[0] // groups, weight.shape[1])


def _merge_considers_triton(weight: Tensor) -> bool:
    """Whether a merge of this weight may take the Triton kernel: on CUDA only (the interpreter is for tests)."""
    return weight.is_cuda


def merge_backend(spec: MergeSpec) -> str:
    """"triton" for a layer whose in-place merge the Triton kernel runs (on CUDA, triton installed, every tensor
    float32, float16 or bfloat16), else "torch"."""
    tensors = (spec.weight, spec.bias, spec.pointwise, spec.depthwise, spec.bias_delta)
    if (triton_available() and _merge_considers_triton(spec.weight)
            and all(t.dtype in TRITON_DTYPES for t in tensors if t is not None)):
        return "triton"
    return "torch"


def merge_(specs: Sequence[MergeSpec]) -> None:
    """In place, for every layer: K0 += ΔK, b0 += Δb (when Δb is given). The layers `merge_backend` sends to
    Triton merge in one launch per dtype combination (all checked before any is launched); the rest by aten ops."""
    by_backend = {"triton": [], "torch": []}
    for spec in specs:
        by_backend[merge_backend(spec)].append(spec)
    for backend, chosen in by_backend.items():
        if chosen:
            ops.merge_(chosen, backend)


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


_FASTEST: Dict[tuple, str] = {}  # auto's backend per conv (`fastest_backend`)
ROUTE_CHOICES: Dict[tuple, str] = {}  # auto's route per mixed batch (`mixed.route`)


def measured_choice(key: tuple, candidates: Dict[str, Callable[[], object]], device: torch.device,
                    what: str, table: Optional[Dict[tuple, str]] = None) -> str:
    """The candidate that runs fastest, each timed once per `key` (`_time_ms`) and the choice kept in `table`
    (default `_FASTEST`) until `clear_caches`: the one measure-and-remember policy of `auto` (backends here,
    mixed-batch routes in `mixed`, which keeps its choices in `ROUTE_CHOICES`). A candidate whose first call
    returns False is never chosen (a Triton path that failed); one always stays. `what` names the decision in
    the log line."""
    choices = _FASTEST if table is None else table
    if key not in choices:
        times, failed = {}, set()
        for name, fn in candidates.items():
            if fn() is False:  # a first call that failed: not timed
                failed.add(name)
                times[name] = float("inf")
                continue
            times[name] = _time_ms(fn, device)
        usable = {n: t for n, t in times.items() if n not in failed} or times
        choices[key] = min(usable, key=usable.get)
        logger.info("colora_fused: %s %s (%s)", what, choices[key],
                    ", ".join(f"{n} {t:.3f} ms" for n, t in times.items()))
    return choices[key]


def fastest_backend(x: Tensor, weight: Tensor, pointwise: Tensor, depthwise: Tensor, stride, padding, dilation,
                    groups: int, order: str, training: bool,
                    candidates: Sequence[str] = backends.AUTO_CANDIDATES) -> str:
    """The candidate backend that runs this (zero-padded) conv fastest, measured once per shape and cached
    (`measured_choice`).

    With `training`, a forward plus the backward (input and adapter gradients) is timed, else the forward (where
    "hybrid" is "torch", so it is not timed apart). "torch" and "hybrid" are timed on a prebuilt K0 + ΔK, as a
    layer runs them (its merge is cached across calls); "triton" builds the merged tile in registers. A candidate
    that fails is never chosen.
    """
    if not training:
        candidates = tuple(c for c in candidates if c != "hybrid") or ("torch",)
    shape = ops.shape_key(x, weight, stride, padding, dilation, groups, order)
    key = (shape, training, tuple(candidates))
    if key in _FASTEST:
        return _FASTEST[key]
    with torch.no_grad():
        merged = ops.merged_weight(weight, pointwise, depthwise, groups, order)
        grad = torch.randn_like(ops.conv(x, weight, None, pointwise, depthwise, None, stride, padding, dilation,
                                         groups, order, "torch", merged))

    def step(name):
        fallback = backends.TABLE[name].falls_back
        buffer = merged if backends.TABLE[name].merged_weight else None
        with torch.no_grad():
            ops.conv(x, weight, None, pointwise, depthwise, None, stride, padding, dilation, groups, order,
                     name, buffer, fallback)
            if training:
                ops.conv_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups,
                                  order, name, True, False, True, buffer, fallback)
        return not ops.triton_failed(shape, name)

    return measured_choice(key, {name: functools.partial(step, name) for name in candidates}, x.device,
                           f"backend for x {tuple(x.shape)}, weight {tuple(weight.shape)}:")


def requested_backend(backend: str) -> str:
    """`backend`, with `auto` replaced by COLORA_BACKEND when that is set (`settings.backend`)."""
    backends.check(backend)
    if backend == "auto":
        return backends.check(settings.backend())
    return backend


def _auto_considers_triton(x: Tensor) -> bool:
    """Whether `auto` weighs Triton against torch for x: on CUDA only (the interpreter is for tests)."""
    return x.is_cuda


def resolve_backend(backend: str, x: Tensor, weight: Tensor, groups: int) -> str:
    """The backend for a call on these (padded, autocast) tensors: `auto` → COLORA_BACKEND if set, else
    "auto-cuda" on CUDA where Triton runs, else torch.

    "auto-cuda" means: triton, hybrid or torch, whichever `fastest_backend` measures fastest for the shape
    (decided in `colora_conv`); set COLORA_AUTOTUNE=0 to always take triton there.
    """
    backend = requested_backend(backend)
    if backend == "auto":
        if _auto_considers_triton(x) and unsupported_reason("hybrid", x, weight, groups) is None:
            return "auto-cuda"
        return "torch"
    reason = unsupported_reason(backend, x, weight, groups)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run this convolution: {reason}; "
                         "use backend='torch' (or 'auto') instead")
    return backend


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_target(t: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast gives a convolution argument: floating tensors other than float64 go to `dtype`."""
    if dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return dtype


def as_autocast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """`t` cast as autocast casts a convolution argument (no copy when its dtype stays)."""
    return t if dtype is None or t is None else t.to(_autocast_target(t, dtype))


def metadata_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """A tensor with t's shape and device in `dtype`, without copying t: for checks that read only metadata."""
    return t if t.dtype == dtype else t.new_empty(1, dtype=dtype).expand(t.shape)


def check_tensors(x: Tensor, weight: Tensor, bias: Optional[Tensor], pointwise: Tensor, depthwise: Tensor,
                  bias_delta: Optional[Tensor], groups: int, order: str, autocast_dtype: Optional[torch.dtype]):
    """Refuse what would otherwise be silently promoted, moved or broadcast: every tensor strided, on x's device
    and, after autocast's casts, of x's dtype; the adapters shaped as design §1 says (Kp [C_out, C_in/groups],
    Kd [C_out or C_in, *k], Δb [C_out]; rank r > 1 puts r in front of Kp's and Kd's shapes). Raises TypeError
    (dtype, layout) or ValueError (device, shape)."""
    named = dict(x=x, weight=weight, bias=bias, pointwise=pointwise, depthwise=depthwise, bias_delta=bias_delta)
    dtypes = {name: _autocast_target(t, autocast_dtype) for name, t in named.items() if t is not None}
    for name, t in named.items():
        if t is None:
            continue
        if t.layout != torch.strided:
            raise TypeError(f"colora_conv: {name} has layout {t.layout}; only strided (dense) tensors are supported")
        if t.device != x.device:
            raise ValueError(f"colora_conv: {name} is on {t.device} but x is on {x.device}; move them to one device")
        if dtypes[name] != dtypes["x"]:
            raise TypeError(f"colora_conv: {name} has dtype {t.dtype} but x has {x.dtype}"
                            + (f" (under autocast: {dtypes[name]} vs {dtypes['x']})" if autocast_dtype else "")
                            + "; convert them to one dtype")
    kp_shape, kd_shape = adapter_shapes(weight.shape, groups, order, adapter_rank(pointwise))
    expected = dict(pointwise=kp_shape, depthwise=kd_shape, bias=(weight.shape[0],), bias_delta=(weight.shape[0],))
    for name, shape in expected.items():
        if named[name] is not None and tuple(named[name].shape) != shape:
            raise ValueError(f"colora_conv: {name} has shape {tuple(named[name].shape)}, expected {shape} for "
                             f"weight {tuple(weight.shape)}, groups={groups}, order={order!r}")


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jvp, vmap, ...) or a forward-AD dual level is active.

    The custom op has no rule for either (under forward AD it would give a zero tangent), so such calls take
    `ops.merged_conv`, the same convolution in aten ops.
    """
    return torch._C._functorch.maybe_current_level() is not None or forward_ad._current_level >= 0


class Plan(NamedTuple):
    """What `colora_conv` runs: x padded and cast, the conv arguments as lists for the op, the autocast dtype, the
    backend ("reference", "composite" (`ops.merged_conv`, for torch.func and forward AD) or one of
    `backends.OP_BACKENDS`), whether a Triton failure falls back to torch (what `auto` asks), and whether x was
    unbatched."""
    x: Tensor
    stride: list
    padding: list
    dilation: list
    dtype: Optional[torch.dtype]
    backend: str
    fallback: bool
    unbatched: bool


def prepare(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, padding_mode, order,
            backend) -> Plan:
    """What `colora_conv` runs, decided before it runs: checks, padding, autocast dtype and the backend."""
    check_order(order)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {padding_mode!r}; choose one of {PADDING_MODES}")
    nd = weight.dim() - 2
    unbatched = x.dim() == nd + 1
    if unbatched:
        # A batch dim of stride numel, not unsqueeze's (which copies the channel stride of a channels-innermost
        # x): with that stride PyTorch's CPU conv gets the float64 weight gradient wrong for a channels_last K0
        # and groups > 1 (F.conv2d on such an unbatched input is wrong the same way).
        x = x.as_strided((1, *x.shape), (max(1, x.numel()), *x.stride()), x.storage_offset())
    dtype = _autocast_dtype(x.device.type)
    check_tensors(x, weight, bias, pointwise, depthwise, bias_delta, groups, order, dtype)
    if requested_backend(backend) == "reference":
        return Plan(x, stride, padding, dilation, dtype, "reference", False, unbatched)

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
    x = as_autocast(x, dtype)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if not torch.compiler.is_compiling() and transforms_active():
        return Plan(x, stride, padding, dilation, dtype, "composite", False, unbatched)
    backend = resolve_backend(backend, x, metadata_like(weight, x.dtype), groups)
    if backend != "auto-cuda":
        return Plan(x, stride, padding, dilation, dtype, backend, False, unbatched)
    fused = (unsupported_reason("triton", x, metadata_like(weight, x.dtype), groups) is None
             and not fused_prefers_library(weight, groups))
    candidates = tuple(c for c in backends.AUTO_CANDIDATES if fused or c != "triton")
    # Under torch.compile nothing is measured or looked up: the op itself still falls back at run time.
    if torch.compiler.is_compiling() or not settings.autotune():
        backend = candidates[0]
    else:
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, pointwise, depthwise))
        with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
            backend = fastest_backend(x, as_autocast(weight, dtype), as_autocast(pointwise, dtype),
                                      as_autocast(depthwise, dtype), stride, padding, dilation, groups, order,
                                      training, candidates)
    return Plan(x, stride, padding, dilation, dtype, backend, backends.TABLE[backend].falls_back, unbatched)


def chosen_backend(x: Tensor, weight: Tensor, bias: Optional[Tensor], pointwise: Tensor, depthwise: Tensor,
                   bias_delta: Optional[Tensor], stride=1, padding=0, dilation=1, groups: int = 1,
                   padding_mode: str = "zeros", order: str = "pointwise_first", backend: str = "auto") -> str:
    """The path `colora_conv` with these arguments takes now: "torch" (K0 + ΔK merged, library convs, adapter
    gradients by aten ops), "hybrid" (the same, adapter gradients by the one-pass Triton kernel), "triton" (the
    fused kernels), "reference" or "composite" (aten ops, under torch.func or forward AD).

    Under `auto` on CUDA this measures the shape if it has not been measured yet, as the call itself would;
    a shape on which Triton failed reports "torch".
    """
    plan = prepare(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, padding_mode,
                 order, backend)
    key = ops.shape_key(plan.x, weight, plan.stride, plan.padding, plan.dilation, groups, order)
    if plan.fallback and ops.triton_failed(key, plan.backend):
        return "torch"
    return plan.backend


def colora_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], pointwise: Tensor, depthwise: Tensor,
                bias_delta: Optional[Tensor], stride=1, padding=0, dilation=1, groups: int = 1,
                padding_mode: str = "zeros", order: str = "pointwise_first", backend: str = "auto", *,
                merge_cache: Optional[ops.MergedWeightCache] = None) -> Tensor:
    """A CoLoRA convolution O = (K0 + Kp⊛Kd) ⊛ x + b0 + Δb, shaped and padded as `F.conv{1,2,3}d` would.

    x: [N, C_in, *spatial] or unbatched [C_in, *spatial]; weight K0: [C_out, C_in/groups, *k];
    pointwise Kp: [C_out, C_in/groups]; depthwise Kd: [C_out, *k] (pointwise_first) or [C_in, *k]
    (depthwise_first). Every tensor must be strided, on x's device and of x's dtype (after autocast's casts):
    anything else raises (`check_tensors`). Under autocast the tensors are cast as for `F.conv2d`; gradients
    flow back in the parameters' own dtypes. All autograd modes work: reverse of any order, forward-mode AD
    and torch.func transforms (the last two through aten ops, `ops.merged_conv`).

    merge_cache: where the torch backend keeps K0 + ΔK between calls (a layer passes its own); not used under
    torch.compile, nor when COLORA_MERGE_CACHE=0.
    """
    args = (x, weight, bias, pointwise, depthwise, bias_delta)
    plan = prepare(*args, stride, padding, dilation, groups, padding_mode, order, backend)
    x, dtype = plan.x, plan.dtype
    if plan.backend == "reference":
        out = colora_conv_reference(x, *args[1:], plan.stride, plan.padding, plan.dilation, groups, padding_mode,
                                    order)
        return out.squeeze(0) if plan.unbatched else out
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        if plan.backend == "composite":
            out = ops.merged_conv(x, *(as_autocast(t, dtype) for t in args[1:]), plan.stride, plan.padding,
                                  plan.dilation, groups, order)
        else:
            merged = None
            if (backends.TABLE[plan.backend].merged_weight and merge_cache is not None and settings.merge_cache()
                    and not torch.compiler.is_compiling()):
                merged = merge_cache.get(weight, pointwise, depthwise, groups, order, x.dtype)
            # With a prebuilt K0 + ΔK the op reads K0 only for its gradient: no weight-sized cast when frozen.
            if merged is None or weight.requires_grad:
                weight = as_autocast(weight, dtype)
            bias, pointwise, depthwise, bias_delta = (as_autocast(t, dtype)
                                                      for t in (bias, pointwise, depthwise, bias_delta))
            # The registered op for torch.compile to trace; its eager twin (same body, less dispatch) otherwise.
            conv = ops.conv if torch.compiler.is_compiling() else ops.conv_eager
            out = conv(x, weight, bias, pointwise, depthwise, bias_delta, plan.stride, plan.padding, plan.dilation,
                       groups, order, plan.backend, merged, plan.fallback)
    return out.squeeze(0) if plan.unbatched else out


def clear_caches() -> None:
    """Forget what this process has cached: `auto`'s measured choices (`fastest_backend`), the shapes on which
    Triton failed under `auto` (`ops.clear_caches`), the CPU workspaces and every layer's merged K0 + ΔK. Each is
    rebuilt when next needed; useful between benchmarks, after changing the environment, and in tests."""
    _FASTEST.clear()
    ROUTE_CHOICES.clear()
    ops.clear_caches()
