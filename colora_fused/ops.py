"""The CoLoRA convolution as registered torch.library ops, with autograd, and the `torch` backend.

`colora_fused::conv` computes O = (K0 + ΔK) ⊛ x + b0 + Δb for an x already padded by `functional` (so the
ops see symmetric zero padding only). `colora_fused::conv_backward` returns the gradients of x, K0, Kp, Kd
and Δb. Both take `backend` (one of `backends.OP_BACKENDS`) and dispatch inside, so `torch.compile` sees two
opaque ops and no graph break, whichever backend runs them.

The `torch` backend merges the weight once and runs one cuDNN/oneDNN convolution forward; its backward gets
the input gradient through the merged weight and the adapter gradients by whichever route of design §5 costs
fewer multiply-adds for the layer (`_conv.adapter_grad_route`): for k×k kernels over many channels that is the
cheap route, which never forms the full weight gradient. A caller may hand both ops `merged`, a K0 + ΔK it
keeps between calls (`MergedWeightCache`, one per layer): the torch backend then convolves with it instead of
merging again.

Every autograd mode: the ops' backward is differentiable again when autograd records it (`create_graph=True`:
gradient penalties, Hessian-vector products), by a composition of aten ops; `torch.func` transforms and
forward-mode AD have no rule on a custom op, so `functional` routes them to `merged_conv`, the same convolution
as plain aten ops.

The ops' `backend` is "torch", "triton" or "hybrid" ("hybrid" is the torch backend with the cheap route's
adapter gradients by the one-pass Triton kernel). With `fallback` (what `auto` passes) a Triton compile or launch
failure logs one warning naming the shape and runs the torch path; without it, it raises.
"""
import logging
import math
import threading
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import backends
from ._conv import CONV_FNS, MergeSpec, adapter_grad_route, adapter_rank, adapter_terms, conv_output_shape

logger = logging.getLogger(__name__)


def _factor_views(pointwise: Tensor, depthwise: Tensor, groups: int, order: str):
    """Views of Kp and Kd whose elementwise product broadcasts to ΔK (design §1 table), and its shape there.

    pointwise_first: ΔK[o, c, t] = Kp[o, c]·Kd[o, t] in K0's own shape. depthwise_first: ΔK[o, c, t] =
    Kp[o, c]·Kd[g(o)·C_in/groups + c, t], computed as [groups, C_out/groups, C_in/groups, *k].
    """
    c_out, c_in_g = pointwise.shape
    k = tuple(depthwise.shape[1:])
    ones = (1,) * len(k)
    if order == "pointwise_first":
        return pointwise.reshape(c_out, c_in_g, *ones), depthwise.unsqueeze(1), (c_out, c_in_g, *k)
    return (pointwise.reshape(groups, c_out // groups, c_in_g, *ones), depthwise.reshape(groups, 1, c_in_g, *k),
            (groups, c_out // groups, c_in_g, *k))


def delta_weight(pointwise: Tensor, depthwise: Tensor, groups: int, order: str) -> Tensor:
    """ΔK = Σ_i Kp[i] ⊛ Kd[i] (one term at rank 1) shaped like K0 [C_out, C_in/groups, *k], differentiable."""
    if pointwise.dim() == 3:
        return sum(delta_weight(kp, kd, groups, order) for kp, kd in zip(pointwise, depthwise))
    kp, kd, _ = _factor_views(pointwise, depthwise, groups, order)
    return (kp * kd).reshape(*pointwise.shape, *depthwise.shape[1:])


def merged_weight(weight: Tensor, pointwise: Tensor, depthwise: Tensor, groups: int, order: str,
                  out: Optional[Tensor] = None) -> Tensor:
    """K0 + ΔK in one fused pass per term (addcmul), shaped like K0 (written into `out`, and `out` returned, when
    given: a view reshaped back can carry other strides on size-1 dims, which send aten's conv backward to a path
    that refuses them)."""
    merged = weight
    for kp_i, kd_i in zip(*adapter_terms(pointwise, depthwise)):
        kp, kd, shape = _factor_views(kp_i, kd_i, groups, order)
        merged = torch.addcmul(merged.reshape(shape), kp, kd, out=None if out is None else out.view(shape))
    return merged.reshape(weight.shape) if out is None else out


@torch.no_grad()
def merge_(specs: Sequence[MergeSpec], backend: str) -> None:
    """In place, for every layer: K0 += ΔK and b0 += Δb (when Δb is given). backend "triton": one kernel launch
    per dtype combination (`kernels.merge.merge_many_`), every layer checked first; "torch": aten ops, layer by
    layer."""
    if backend == "triton":
        from .kernels.merge import merge_many_
        merge_many_(specs)
        return
    for spec in specs:
        spec.weight.add_(delta_weight(spec.pointwise, spec.depthwise, spec.groups, spec.order))
        if spec.bias_delta is not None:
            spec.bias.add_(spec.bias_delta)


_WORKSPACES = threading.local()


def _workspace(like: Tensor, purpose: str) -> Optional[Tensor]:
    """On CPU, a buffer shaped and laid out like `like`, kept per purpose, shape, layout and dtype, per thread;
    None elsewhere (CUDA's caching allocator makes fresh buffers cheap).

    A fresh weight-sized allocation on CPU costs page faults that exceed the arithmetic done in it. Sharing a
    buffer between layers is safe because each use rewrites it fully and consumes it at once.
    """
    if like.device.type != "cpu":
        return None
    buffers = getattr(_WORKSPACES, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACES.buffers = {}
    key = (purpose, tuple(like.shape), like.stride(), like.dtype)
    if key not in buffers:
        buffers[key] = torch.empty_like(like)
    return buffers[key]


def _merged_weight_workspace(weight: Tensor, pointwise: Tensor, depthwise: Tensor, groups: int,
                             order: str) -> Tensor:
    """K0 + ΔK for the torch backend when the caller keeps no merged weight: in a workspace on CPU."""
    return merged_weight(weight, pointwise, depthwise, groups, order, out=_workspace(weight, "merged"))


_OPTIMIZER_STEPS = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _OPTIMIZER_STEPS
    _OPTIMIZER_STEPS += 1


class MergedWeightCache:
    """K0 + ΔK for one layer, one buffer per (dtype, inference mode), rebuilt only when K0, Kp or Kd changed.

    A buffer is valid while the three tensors are the same objects with the same `_version` (every in-place
    write through autograd's view of a tensor bumps it: optimizer steps, `copy_` in `load_state_dict`,
    `merge_`, `reset_adapter_`) and the same storage (`.to()`, `.cuda()` and `param.data = t` replace it), and
    no `torch.optim` optimizer has stepped since (fused optimizers write parameters without bumping versions).
    A write through `param.data` bumps no version and is invisible here: call `clear()` after one.
    Under autocast the buffer of the autocast dtype merges the cast factors, as the uncached op would.
    Costs one weight-sized tensor per dtype; thread-safe.
    """

    _hooked = False
    _all: "weakref.WeakSet[MergedWeightCache]" = weakref.WeakSet()  # for `clear_caches`

    def __init__(self):
        self._entries: Dict[tuple, Tuple[tuple, Tensor]] = {}
        self._lock = threading.Lock()
        MergedWeightCache._all.add(self)
        if not MergedWeightCache._hooked:
            register_optimizer_step_post_hook(_count_optimizer_step)
            MergedWeightCache._hooked = True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    # Copies and pickles of a layer start with an empty cache (a lock cannot be copied; the buffers need not be).
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, weight: Tensor, pointwise: Tensor, depthwise: Tensor, groups: int, order: str,
            dtype: torch.dtype) -> Tensor:
        """K0 + ΔK in `dtype`, from the buffer when none of K0, Kp, Kd has changed since it was built."""
        # The storage by a weak reference, not its address: `.float().double()` frees a storage and may get a
        # new one at the same address, whose tensor still has the old version count. A held weak reference
        # keeps its StorageImpl from being reused, so equal references mean the same storage.
        stamp = (_OPTIMIZER_STEPS,) + tuple(
            (t, t._version, StorageWeakRef(t.untyped_storage()), t.storage_offset(), t.dtype, t.device, t.shape)
            for t in (weight, pointwise, depthwise))
        slot = (dtype, torch.is_inference_mode_enabled())
        with self._lock:
            entry = self._entries.get(slot)
            if entry is not None and _same_stamp(entry[0], stamp, groups, order):
                return entry[1]
            with torch.no_grad():
                factors = [t.to(dtype) for t in (weight, pointwise, depthwise)]
                buffer = entry[1] if entry is not None and _rewritable(entry[1], factors[0]) else None
                if buffer is None:
                    buffer = torch.empty_like(factors[0])
                # The buffer itself, not merged_weight's reshaped view of it: _rewritable reads its use count.
                merged_weight(*factors, groups, order, out=buffer)
            self._entries[slot] = ((stamp, groups, order), buffer)
            return buffer


def _same_stamp(old, stamp, groups: int, order: str) -> bool:
    old_stamp, old_groups, old_order = old
    return (old_groups == groups and old_order == order and old_stamp[0] == stamp[0]
            and all(a[0] is b[0] and a[1:] == b[1:] for a, b in zip(old_stamp[1:], stamp[1:])))


def _rewritable(buffer: Tensor, like: Tensor) -> bool:
    """Whether the old buffer can be rebuilt in place: same layout, and nothing but this cache holds it.

    A pending autograd graph saves the buffer; writing into it would make that graph's backward fail, so a buffer
    still referenced (by a saved tensor, a view, an op in flight) is replaced rather than reused. The tensor's
    C++ use count is 1 when only its Python object (kept here) holds it.
    """
    return (buffer.shape == like.shape and buffer.stride() == like.stride() and buffer.device == like.device
            and buffer._use_count() == 1)


def _summed_bias(bias: Optional[Tensor], bias_delta: Optional[Tensor]) -> Optional[Tensor]:
    if bias is None:
        return bias_delta
    return bias if bias_delta is None else bias + bias_delta


def merged_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], pointwise: Tensor, depthwise: Tensor,
                bias_delta: Optional[Tensor], stride, padding, dilation, groups: int, order: str) -> Tensor:
    """O = (K0 + ΔK) ⊛ x + b0 + Δb as plain aten ops (addcmul, one conv): differentiable in every autograd mode
    (reverse of any order, forward-mode AD, torch.func transforms), at the cost of autograd's full weight
    gradient. The route for what the custom op has no rule for."""
    return CONV_FNS[weight.dim() - 2](x, merged_weight(weight, pointwise, depthwise, groups, order),
                                      _summed_bias(bias, bias_delta), stride, padding, dilation, groups)


def _torch_forward(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order,
                   merged):
    if merged is None:
        merged = _merged_weight_workspace(weight, pointwise, depthwise, groups, order)
    return CONV_FNS[weight.dim() - 2](x, merged, _summed_bias(bias, bias_delta), stride, padding, dilation, groups)


def _reduce_gradw(grad_weight: Tensor, pointwise: Tensor, depthwise: Tensor, groups: int, order: str,
                  owned: bool = False):
    """dKp, dKd from the full weight gradient gradW = ∂L/∂(K0 + ΔK) (the route for 1×1 and 1×2 kernels);
    `owned`: gradW is a temporary of the caller, which may be overwritten.

    Broadcast multiply-and-sum rather than einsum: with one or two taps, einsum's batched GEMMs cost more than
    the arithmetic. These are weight-sized passes, which is what a 1×1 layer's step costs beyond the convs.
    """
    c_out, c_in_g = pointwise.shape
    taps = depthwise[0].numel()
    if taps == 1 and order == "pointwise_first" and owned:
        # ΔK = Kp·Kd elementwise. dKd first (its product in a workspace), then dKp = gradW·Kd in gradW's own
        # memory: on CPU every fresh weight-sized buffer costs page faults, about what the arithmetic costs.
        gw = grad_weight.reshape(c_out, c_in_g)
        d_kd = torch.mul(gw, pointwise, out=_workspace(gw, "product")).sum(1).view_as(depthwise)
        return gw.mul_(depthwise.reshape(c_out, 1)), d_kd
    if order == "pointwise_first":
        gw = grad_weight.reshape(c_out, c_in_g, taps)
        kd = depthwise.reshape(c_out, 1, taps)
        return (gw * kd).sum(2), (gw * pointwise.unsqueeze(2)).sum(1).view_as(depthwise)
    gw = grad_weight.reshape(groups, c_out // groups, c_in_g, taps)
    kp = pointwise.reshape(groups, c_out // groups, c_in_g, 1)
    kd = depthwise.reshape(groups, 1, c_in_g, taps)
    return (gw * kd).sum(3).reshape(c_out, c_in_g), (gw * kp).sum(1).reshape(depthwise.shape)


def _memory_format(t: Tensor) -> torch.memory_format:
    if t.dim() in (4, 5) and not t.is_contiguous():
        channels_last = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
        if t.is_contiguous(memory_format=channels_last):
            return channels_last
    return torch.contiguous_format


def _grad_input(grad: Tensor, shape, weight: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """∂L/∂input of conv(input, weight) for an input of `shape`, laid out like `grad`.

    `torch.nn.grad.conv*_input` passes oneDNN an expanded (stride-0) input, which sends depthwise convs down a
    path an order of magnitude slower on CPU; an empty tensor in grad's layout avoids it.
    """
    like = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=_memory_format(grad))
    return torch.ops.aten.convolution_backward(grad, like, weight, None, stride, padding, dilation, False,
                                               [0] * (len(shape) - 2), groups, [True, False, False])[0]


def _grad_weight(grad: Tensor, x: Tensor, weight_shape, stride, padding, dilation, groups: int) -> Tensor:
    """∂L/∂weight of conv(x, weight) for a weight of `weight_shape`."""
    like = x.new_empty(weight_shape)
    return torch.ops.aten.convolution_backward(grad, x, like, None, stride, padding, dilation, False,
                                               [0] * (x.dim() - 2), groups, [False, True, False])[1]


def _adapter_grads_cheap(grad, x, pointwise, depthwise, stride, padding, dilation, groups, order):
    """dKp, dKd at ≈ 2F/prod(k) FLOPs: one 1×1 weight-gradient GEMM, one recomputed 1×1 conv, two stencils."""
    nd = x.dim() - 2
    conv = CONV_FNS[nd]
    c_out, c_in_g = pointwise.shape
    c_in = x.shape[1]
    ones, unit = (1,) * nd, [1] * nd
    kp = pointwise.reshape(c_out, c_in_g, *ones)
    if order == "pointwise_first":
        # G = ∂L/∂Z1: the depthwise transpose of dO by Kd, at the input's resolution.
        g = _grad_input(grad, (x.shape[0], c_out, *x.shape[2:]), depthwise.unsqueeze(1), stride, padding,
                        dilation, c_out)
        d_kp = _grad_weight(g, x, kp.shape, unit, [0] * nd, unit, groups)
        z1 = conv(x, kp, None, 1, 0, 1, groups)
        d_kd = _grad_weight(grad, z1, (c_out, 1, *depthwise.shape[1:]), stride, padding, dilation, c_out)
    else:
        # Z1 = Kd ⊛ x (depthwise, at the output's resolution); ∂L/∂Z1 is the 1×1 transpose of dO by Kp.
        z1 = conv(x, depthwise.unsqueeze(1), None, stride, padding, dilation, c_in)
        d_kp = _grad_weight(grad, z1, kp.shape, unit, [0] * nd, unit, groups)
        d_z1 = _grad_input(grad, z1.shape, kp, unit, [0] * nd, unit, groups)
        d_kd = _grad_weight(d_z1, x, (c_in, 1, *depthwise.shape[1:]), stride, padding, dilation, c_in)
    return d_kp.view_as(pointwise), d_kd.view_as(depthwise)


def adapter_grads(grad, x, pointwise, depthwise, stride, padding, dilation, groups: int, order: str, route: str,
                  grad_weight: Optional[Tensor] = None, grad_weight_owned: bool = False,
                  weight: Optional[Tensor] = None, use_triton: bool = False):
    """dKp, dKd of the merged-weight path by `route` (design §5): "gradw" reduces `grad_weight`, the full weight
    gradient the caller computed next to dx (and may be overwritten when `grad_weight_owned`); "cheap" runs the
    ≈ 2F/prod(k) route, by aten ops or, with `use_triton` (the `hybrid` backend), by the one-pass Triton kernel
    (`weight`, K0 or any tensor of its shape, gives it the conv's geometry).

    The one place that picks how the adapter gradients of the merged path are computed. At rank r each term's
    gradients are those of a rank-1 adapter of that term (ΔK is linear in the terms): the terms run one after
    another (the gradW route reducing the one weight gradient against each; the Triton launcher takes all the
    terms at once, staging X and dY once) and stack.
    """
    if use_triton and route == "cheap":
        from .kernels.conv_bwd_adapters import colora_conv_backward_adapters
        d_kp, d_kd = colora_conv_backward_adapters(x, grad, weight, pointwise, depthwise, stride, padding,
                                                   dilation, groups, order, route=route)
        return d_kp, d_kd
    if pointwise.dim() == 3:
        grads = [adapter_grads(grad, x, kp, kd, stride, padding, dilation, groups, order, route, grad_weight)
                 for kp, kd in zip(pointwise, depthwise)]
        return torch.stack([g[0] for g in grads]), torch.stack([g[1] for g in grads])
    if route == "gradw":
        return _reduce_gradw(grad_weight, pointwise, depthwise, groups, order, grad_weight_owned)
    return _adapter_grads_cheap(grad, x, pointwise, depthwise, stride, padding, dilation, groups, order)


def _torch_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups, order,
                    need_x, need_weight, need_adapters, merged, triton_adapters: bool = False):
    """Gradients of x, K0, Kp and Kd for the torch backend (the hybrid backend with `triton_adapters`), each None
    when not needed."""
    route = (adapter_grad_route(x.shape, weight.shape, grad.shape, order, adapter_rank(pointwise))
             if need_adapters else None)
    need_gradw = need_weight or route == "gradw"
    grad_x = grad_w = None
    if need_x or need_gradw:
        if merged is None:
            merged = _merged_weight_workspace(weight, pointwise, depthwise, groups, order)
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, merged, None, stride, padding, dilation, False, [0] * (x.dim() - 2), groups,
            [need_x, need_gradw, False])
    d_kp = d_kd = None
    if need_adapters:
        d_kp, d_kd = adapter_grads(grad, x, pointwise, depthwise, stride, padding, dilation, groups, order, route,
                                   grad_w, grad_weight_owned=not need_weight,
                                   weight=weight if merged is None else merged, use_triton=triton_adapters)
    return grad_x, (grad_w if need_weight else None), d_kp, d_kd


def _hybrid_backward(*args):
    """The hybrid backend's backward: the torch backend's, with the cheap route's adapter gradients by the one-pass
    Triton kernel."""
    return _torch_backward(*args, triton_adapters=True)


def _differentiable_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups, order,
                             need_x, need_weight, need_adapters):
    """The gradients `conv_backward` returns, by aten ops autograd can differentiate again (create_graph=True).

    aten.convolution_backward has a derivative (itself convolutions), and dKp, dKd come from the full weight
    gradient by the differentiable gradW reduction, so every order of derivative exists.
    """
    merged = merged_weight(weight.to(x.dtype), pointwise, depthwise, groups, order)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad, x, merged, None, stride, padding, dilation, False, [0] * (x.dim() - 2), groups,
        [need_x, need_weight or need_adapters, False])
    d_kp = d_kd = None
    if need_adapters:
        d_kp, d_kd = adapter_grads(grad, x, pointwise, depthwise, stride, padding, dilation, groups, order, "gradw",
                                   grad_w)
    return grad_x, (grad_w if need_weight else None), d_kp, d_kd


def _triton_forward(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order,
                    merged):
    from .kernels.conv_fwd import colora_conv_forward
    out = torch.empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), dtype=x.dtype,
                      device=x.device, memory_format=_memory_format(x))
    return colora_conv_forward(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation,
                               groups, order, out=out)


def _triton_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups, order,
                     need_x, need_weight, need_adapters, merged):
    from .kernels.conv_bwd_adapters import colora_conv_backward_adapters
    from .kernels.conv_bwd_input import colora_conv_backward_input
    grad_x = grad_w = d_kp = d_kd = None
    if need_x:
        channels_last = _memory_format(x) != torch.contiguous_format
        grad_x = colora_conv_backward_input(grad, weight, pointwise, depthwise, tuple(x.shape), channels_last,
                                            stride, padding, dilation, groups, order)
    if need_adapters:
        d_kp, d_kd = colora_conv_backward_adapters(
            x, grad, weight, pointwise, depthwise, stride, padding, dilation, groups, order,
            route=adapter_grad_route(x.shape, weight.shape, grad.shape, order, adapter_rank(pointwise)))
    if need_weight:
        grad_w = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                     [0] * (x.dim() - 2), groups, [False, True, False])[1]
    return grad_x, grad_w, d_kp, d_kd


# What each of `backends.OP_BACKENDS` runs. "hybrid": the torch backend's merged weight and library convolutions,
# with the adapter gradients of the cheap route by the one-pass Triton kernel.
_FORWARD = {"torch": _torch_forward, "triton": _triton_forward, "hybrid": _torch_forward}
_BACKWARD = {"torch": _torch_backward, "triton": _triton_backward, "hybrid": _hybrid_backward}

# (backend, shape) pairs on which Triton failed under `auto`: the warning was logged once; `auto` runs torch for
# them from now on.
_TRITON_FAILURES: Dict[tuple, str] = {}


def shape_key(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int, order: str) -> tuple:
    """What identifies a conv for `auto`'s choices: shapes, layout, hyper-parameters, dtype and device."""
    return (tuple(x.shape), x.stride(), tuple(weight.shape), tuple(stride), tuple(padding), tuple(dilation), groups,
            x.dtype, x.device, order)


def triton_failed(key: tuple, backend: str) -> bool:
    """Whether Triton already failed on this conv (`shape_key`) under `auto`, in `backend` (one with a Triton
    part)."""
    return (backend, key) in _TRITON_FAILURES


def clear_caches() -> None:
    """Forget the shapes on which Triton failed under `auto`, this thread's CPU workspaces and every
    `MergedWeightCache`'s buffers (`functional.clear_caches` clears these and `auto`'s choices)."""
    _TRITON_FAILURES.clear()
    _WORKSPACES.__dict__.pop("buffers", None)
    for cache in list(MergedWeightCache._all):
        cache.clear()


def _dispatch(table, backend: str, fallback: bool, key: tuple, *args):
    """Run `table[backend]`; with `fallback`, run torch instead (one warning per shape) where Triton fails."""
    if not backends.TABLE[backend].triton:
        return table[backend](*args)
    from .kernels._common import TritonBackendError, TritonBackendTypeError
    if fallback and (backend, key) in _TRITON_FAILURES:
        return table["torch"](*args)
    try:
        return table[backend](*args)
    except Exception as exc:  # a compile, launch or resource failure, whatever Triton raises for it
        if not fallback:
            if isinstance(exc, (TritonBackendError, TritonBackendTypeError)):
                raise
            raise RuntimeError(f"backend={backend!r} failed on x {list(key[0])}, weight {list(key[2])}: "
                               f"{type(exc).__name__}: {exc}; backend='torch' (or 'auto') runs this "
                               "convolution") from exc
        _TRITON_FAILURES[(backend, key)] = f"{type(exc).__name__}: {exc}"
        logger.warning("colora_fused: Triton failed (%s backend) on x %s, weight %s, stride %s, padding %s, "
                       "dilation %s, groups %d (%s: %s); running the torch backend for this shape instead", backend,
                       list(key[0]), list(key[2]), list(key[3]), list(key[4]), list(key[5]), key[6],
                       type(exc).__name__, exc)
        return table["torch"](*args)


# One layout rule for both backends and the fake (meta) functions, so that torch.compile's stride assumptions
# hold: outputs and dx are channels_last exactly when x is, dK0 follows K0's layout, adapter gradients are
# contiguous.


def _conv(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order, backend,
          merged=None, fallback=False):
    if forward_ad._current_level >= 0:
        # Reached only by calling the op directly: it has no forward-AD rule and would return a zero tangent.
        raise RuntimeError("colora_fused::conv has no forward-mode AD rule; call colora_fused.colora_conv (or a "
                           "CoLoRA layer), which runs forward-mode AD through aten ops")
    key = shape_key(x, weight, stride, padding, dilation, groups, order)
    out = _dispatch(_FORWARD, backend, fallback, key, x, weight, bias, pointwise, depthwise, bias_delta, stride,
                    padding, dilation, groups, order, merged)
    return out.contiguous(memory_format=_memory_format(x))


def _conv_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups, order, backend,
                   need_x, need_weight, need_adapters, merged=None, fallback=False):
    key = shape_key(x, weight, stride, padding, dilation, groups, order)
    grads = _dispatch(_BACKWARD, backend, fallback, key, grad, x, weight, pointwise, depthwise, stride, padding,
                      dilation, groups, order, need_x, need_weight, need_adapters, merged)
    layouts = (_memory_format(x), _memory_format(weight), torch.contiguous_format, torch.contiguous_format)
    return tuple(grad.new_empty(0) if g is None else g.contiguous(memory_format=f) for g, f in zip(grads, layouts))


@torch.library.custom_op("colora_fused::conv", mutates_args=())
def conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], pointwise: Tensor, depthwise: Tensor,
         bias_delta: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int], groups: int,
         order: str, backend: str, merged: Optional[Tensor] = None, fallback: bool = False) -> Tensor:
    """O = (K0 + ΔK) ⊛ x + b0 + Δb with symmetric zero padding; `backend` one of `backends.OP_BACKENDS`.

    `merged`, when given, is K0 + ΔK already built by the caller: the torch backend convolves with it (and so
    does the backward), reading `weight` only for its gradient. `fallback`: a Triton failure runs torch instead
    of raising (`_dispatch`).
    """
    return _conv(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order,
                 backend, merged, fallback)


@conv.register_fake
def _(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order, backend,
      merged=None, fallback=False):
    return x.new_empty(conv_output_shape(x.shape, weight.shape, stride, padding, dilation)).contiguous(
        memory_format=_memory_format(x))


@torch.library.custom_op("colora_fused::conv_backward", mutates_args=())
def conv_backward(grad: Tensor, x: Tensor, weight: Tensor, pointwise: Tensor, depthwise: Tensor,
                  stride: List[int], padding: List[int], dilation: List[int], groups: int, order: str,
                  backend: str, need_x: bool, need_weight: bool, need_adapters: bool,
                  merged: Optional[Tensor] = None, fallback: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dK0, dKp, dKd); a gradient not asked for is an empty tensor (custom ops return no None)."""
    return _conv_backward(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups, order, backend,
                          need_x, need_weight, need_adapters, merged, fallback)


@conv_backward.register_fake
def _(grad, x, weight, pointwise, depthwise, stride, padding, dilation, groups, order, backend, need_x,
      need_weight, need_adapters, merged=None, fallback=False):
    def like(t, needed):
        return t.new_empty(t.shape).contiguous(memory_format=_memory_format(t)) if needed else grad.new_empty(0)

    return (like(x, need_x), like(weight, need_weight), like(pointwise, need_adapters),
            like(depthwise, need_adapters))


def _setup_context(ctx, inputs, output):
    x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order, backend = inputs[:12]
    merged = inputs[12] if len(inputs) > 12 else None
    ctx.fallback = inputs[13] if len(inputs) > 13 else False
    ctx.save_for_backward(x, weight, pointwise, depthwise, merged)
    ctx.conv_args = (stride, padding, dilation, groups, order, backend)


def _gradients(ctx, grad, conv_backward_fn):
    """The gradients of every input of `conv`, the adapters' by `conv_backward_fn` (the op or its body)."""
    x, weight, pointwise, depthwise, merged = ctx.saved_tensors
    need_x, need_w, need_b, need_kp, need_kd, need_db = ctx.needs_input_grad[:6]
    needs = (need_x, need_w, need_kp or need_kd)
    if torch.is_grad_enabled():
        # backward(create_graph=True): the gradients must be differentiable again, which the opaque op is not.
        stride, padding, dilation, groups, order, _ = ctx.conv_args
        grad_x, grad_w, d_kp, d_kd = _differentiable_backward(grad, x, weight, pointwise, depthwise, stride, padding,
                                                              dilation, groups, order, *needs)
    else:
        grad_x, grad_w, d_kp, d_kd = conv_backward_fn(grad, x, weight, pointwise, depthwise, *ctx.conv_args, *needs,
                                                      merged, ctx.fallback)
    d_bias = grad.sum([0, *range(2, grad.dim())]) if (need_b or need_db) else None
    return (grad_x if need_x else None, grad_w if need_w else None, d_bias if need_b else None,
            d_kp if need_kp else None, d_kd if need_kd else None, d_bias if need_db else None,
            None, None, None, None, None, None, None, None)


torch.library.register_autograd("colora_fused::conv",
                                lambda ctx, grad: _gradients(ctx, grad, torch.ops.colora_fused.conv_backward),
                                setup_context=_setup_context)


class _EagerConv(torch.autograd.Function):
    """`conv` for eager mode: the same body, saved context and gradients, without the custom-op dispatch and its
    autograd wrapper (about 60 µs a forward and more a backward, several % of a small CPU training step).
    torch.compile must see the registered op instead (`functional` picks)."""

    @staticmethod
    def forward(ctx, *args):
        # Context set here rather than in a setup_context, whose apply() binds arguments by inspect.signature.
        out = _conv(*args)
        _setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _gradients(ctx, grad, _conv_backward)


def conv_eager(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups: int,
               order: str, backend: str, merged: Optional[Tensor] = None, fallback: bool = False) -> Tensor:
    """What `torch.ops.colora_fused.conv` computes, with its gradients, at less overhead; not traceable."""
    return _EagerConv.apply(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups,
                            order, backend, merged, fallback)


def _register_flop_formulas():
    """FLOPs for torch.utils.flop_counter: F = 2·N·prod(out spatial)·C_out·C_in/groups·prod(k) per merged conv;
    the backward counts F for dx and dK0 each and its adapter route's cost (design §5)."""
    from torch.utils.flop_counter import register_flop_formula

    def conv_flops(x_shape, weight_shape, out_shape) -> int:
        return 2 * out_shape[0] * math.prod(out_shape[2:]) * math.prod(weight_shape)

    @register_flop_formula(torch.ops.colora_fused.conv)
    def _(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flops(x_shape, weight_shape, out_shape)

    @register_flop_formula(torch.ops.colora_fused.conv_backward)
    def _(grad_shape, x_shape, weight_shape, pointwise_shape, depthwise_shape, stride, padding, dilation, groups,
          order, backend, need_x, need_weight, need_adapters, merged_shape=None, fallback=False, out_shape=None,
          **kwargs) -> int:
        f = conv_flops(x_shape, weight_shape, grad_shape)
        adapters = 0
        if need_adapters:
            rank = pointwise_shape[0] if len(pointwise_shape) == 3 else 1
            route = adapter_grad_route(x_shape, weight_shape, grad_shape, order, rank)
            adapters = f if route == "gradw" else rank * 2 * f // math.prod(weight_shape[2:])
        return f * (int(need_x) + int(need_weight)) + adapters


_register_flop_formulas()
