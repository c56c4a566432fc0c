"""Mixed batches: every sample of a batch convolved with its own set of adapters (design §10).

`colora_conv_mixed(x, weight, bias, adapters, index, ...)` computes, for each sample n, the CoLoRA convolution
with K0 + ΔK and b0 + Δb of `adapters[index[n]]`: a (Kp, Kd, Δb) triple as `colora_conv` takes them (a set of
named adapters summed, as `layer.factors(names)` gives it), or None for the base conv alone. `index` is a long
tensor of one set number per sample, so the assignment is data, not Python: a compiled model serves any batch
with the same number of sets without recompiling.

Three routes (`route`):

- "single": one set for the whole batch, which is `colora_conv` itself (the layer's cached merge included);
- "segments": the base conv once over the whole batch; then the residual of every sample at once, its factors
  gathered per sample by `index` (adapter-sized, [N, r, C_out, C_in/groups]: never a weight per sample). The
  1×1 channel mix is one batched matmul, the depthwise stencil one depthwise conv over N·r·C channels, Δb one
  gathered add. Static shapes, aten ops only: autograd sums each adapter's gradient over its samples, and it
  runs under torch.compile without a graph break, autocast, torch.func and every conv hyper-parameter;
- "per_set": the samples sorted by set and `colora_conv` run once per set on its samples, with the layer's
  backend (its merged weight, or the fused kernels), the outputs put back in order. One host sync for the
  set sizes. dLoRA's "merge" mode, for batches of few, large sets.

`auto` on CUDA measures "segments" against "per_set" once per shape and number of sets
(`functional.measured_choice`); COLORA_MIXED_ROUTE forces one (`settings.mixed_route`).
"""
import contextlib
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import functional, ops, settings
from ._conv import CONV_FNS, adapter_rank, adapter_shapes, adapter_terms

Factors = Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]
ROUTES = ("single", "segments", "per_set")


class MixedBatch(NamedTuple):
    """What a CoLoRA layer runs a mixed batch with (`per_sample.adapters_per_sample` sets it on every layer):
    `sets`, the distinct adapter sets (tuples of adapter names; () for the base conv alone), `index`, the set of
    each sample (a long tensor), and `name`, the layer's name in its model (for errors)."""
    sets: Tuple[Tuple[str, ...], ...]
    index: Tensor
    name: str


def colora_conv_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors],
                      index: Tensor, stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                      order: str = "pointwise_first", backend: str = "auto", *,
                      merge_cache=None) -> Tensor:
    """O[n] = colora_conv(x[n], weight, bias, *adapters[index[n]], ...) for every sample n, computed for the
    whole batch at once (module docstring); arguments as `colora_conv`'s, `index` a long tensor of x's batch
    size with values below len(adapters). `merge_cache` serves the "single" route only."""
    index = _checked_index(index, x, weight, len(adapters))
    chosen = route(x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode, order,
                   backend)
    if chosen == "single":
        return _one_set(x, weight, bias, adapters[0], stride, padding, dilation, groups, padding_mode, order,
                        backend, merge_cache)
    if chosen == "per_set":
        return per_set(lambda s, part: _one_set(part, weight, bias, adapters[s], stride, padding, dilation, groups,
                                                padding_mode, order, backend, None), x, index, len(adapters))
    return _segments_call(x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode, order,
                          backend)


def route(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors], index: Tensor, stride,
          padding, dilation, groups: int, padding_mode: str, order: str, backend: str) -> str:
    """Which route computes this mixed batch: "single" for one set; else COLORA_MIXED_ROUTE when set;
    "segments" under torch.compile and torch.func, for the torch and composite backends, and when no set has an
    adapter; "per_set" for "reference", "triton" and "hybrid" (which then run their own kernels per set); under
    `auto` on CUDA the faster of the two, measured once per shape and number of sets."""
    if len(adapters) == 1:
        return "single"
    forced = settings.mixed_route()
    if forced is not None:
        if forced not in ROUTES[1:]:
            raise ValueError(f"COLORA_MIXED_ROUTE={forced!r}; choose one of {ROUTES[1:]}")
        return forced
    first = _first(adapters)
    if first is None or torch.compiler.is_compiling() or functional.transforms_active():
        return "segments"
    plan = functional.prepare(x, weight, bias, *first, stride, padding, dilation, groups, padding_mode, order,
                              backend)
    if plan.backend in ("torch", "composite"):
        return "segments"
    if plan.backend == "reference" or functional.requested_backend(backend) != "auto" or not settings.autotune():
        return "per_set"
    return _measured_route(x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode, order,
                           backend, plan)


def per_set(fn: Callable[[int, Tensor], Tensor], x: Tensor, index: Tensor, n_sets: int) -> Tensor:
    """fn(s, x[samples of set s]) for every set s with samples, put back in sample order: the per-set loop (and
    the route for what has no segmented form, such as a weight-standardised conv's merged weight)."""
    order = torch.argsort(index, stable=True)
    counts = torch.bincount(index, minlength=n_sets).tolist()
    parts = x.index_select(0, order).split(counts)
    outs = torch.cat([fn(s, part) for s, part in enumerate(parts) if counts[s]])
    return torch.index_copy(torch.empty_like(outs), 0, order, outs)


def _checked_index(index: Tensor, x: Tensor, weight: Tensor, n_sets: int) -> Tensor:
    batch = x.shape[0] if x.dim() == weight.dim() else 1
    if index.dim() != 1 or index.shape[0] != batch or index.dtype != torch.long:
        raise ValueError(f"colora_conv_mixed: index must be a 1-d long tensor of the batch size {batch}, got "
                         f"{index.dtype} {tuple(index.shape)}")
    if n_sets < 1:
        raise ValueError("colora_conv_mixed: adapters is empty (None stands for the base conv alone)")
    return index.to(x.device)


def _first(adapters: Sequence[Factors]) -> Factors:
    return next((a for a in adapters if a is not None), None)


def _one_set(x, weight, bias, factors: Factors, stride, padding, dilation, groups, padding_mode, order, backend,
             merge_cache) -> Tensor:
    """colora_conv with one set's factors; the base conv (a zero adapter on the torch backend) for None."""
    if factors is None:
        kp_shape, kd_shape = adapter_shapes(weight.shape, groups, order)
        zeros = dict(device=weight.device, dtype=weight.dtype)
        factors, backend = (torch.zeros(kp_shape, **zeros), torch.zeros(kd_shape, **zeros), None), "torch"
    return functional.colora_conv(x, weight, bias, *factors, stride, padding, dilation, groups, padding_mode, order,
                                  backend, merge_cache=merge_cache)


def _segments_call(x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode, order,
                   backend) -> Tensor:
    """The "segments" route: checks, padding and autocast as `colora_conv` does them, then `segments`."""
    first = _first(adapters)
    if first is None:
        return _one_set(x, weight, bias, None, stride, padding, dilation, groups, padding_mode, order, backend, None)
    plan = functional.prepare(x, weight, bias, *first, stride, padding, dilation, groups, padding_mode, order,
                              "torch")
    for factors in adapters:
        if factors is not None:
            functional.check_tensors(plan.x, weight, bias, *factors, groups, order, plan.dtype)
    cast = lambda t: functional.as_autocast(t, plan.dtype)  # noqa: E731
    with torch.autocast(plan.x.device.type, enabled=False) if plan.dtype is not None else contextlib.nullcontext():
        adapters = [None if a is None else tuple(cast(t) for t in a) for a in adapters]
        out = segments(plan.x, cast(weight), cast(bias), adapters, index, plan.stride, plan.padding, plan.dilation,
                       groups, order)
    return out.squeeze(0) if plan.unbatched else out


def stacked_factors(adapters: Sequence[Factors], weight: Tensor, groups: int, order: str):
    """Every set's factors in one tensor each, sets along dim 0, padded with zero terms to the largest rank R:
    Kp [S, R, C_out, C_in/groups], Kd [S, R, C_kd, *k], Δb [S, C_out] (None when no set has one); a set of None
    is all zeros."""
    rank = max(adapter_rank(a[0]) for a in adapters if a is not None)
    kp_shape, kd_shape = adapter_shapes(weight.shape, groups, order)
    new = dict(device=weight.device, dtype=weight.dtype)
    kps, kds, dbs = [], [], []
    for a in adapters:
        kp, kd = adapter_terms(a[0], a[1]) if a is not None else (weight.new_zeros(0, *kp_shape),
                                                                   weight.new_zeros(0, *kd_shape))
        missing = rank - kp.shape[0]
        kps.append(torch.cat([kp, torch.zeros(missing, *kp_shape, **new)]) if missing else kp)
        kds.append(torch.cat([kd, torch.zeros(missing, *kd_shape, **new)]) if missing else kd)
        dbs.append(a[2] if a is not None else None)
    db = None
    if any(d is not None for d in dbs):
        db = torch.stack([d if d is not None else torch.zeros(weight.shape[0], **new) for d in dbs])
    return torch.stack(kps), torch.stack(kds), db


def segments(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors], index: Tensor,
             stride, padding, dilation, groups: int, order: str) -> Tensor:
    """The "segments" route on a batched, zero-padded (symmetric `padding`), cast x: base conv + the residual
    of every sample with its set's factors gathered by `index` (module docstring). One formula per order, the
    reference's (design §1) with a per-sample Kp and Kd.

    The per-sample depthwise stencil is one depthwise conv of a single "sample" with N·r·C channels, laid out
    channels-innermost (memory [*spatial, N, r, C]): torch's CPU depthwise conv is ~10× faster on that layout
    than on NCHW, and the 1×1 GEMM writes it at no extra cost."""
    conv = CONV_FNS[weight.dim() - 2]
    kp, kd, db = stacked_factors(adapters, weight, groups, order)
    n, c_in, (c_out, c_in_g), rank, taps = x.shape[0], x.shape[1], weight.shape[:2], kp.shape[1], kd.shape[3:]
    c_out_g = c_out // groups
    kp_n = kp.index_select(0, index).reshape(n, rank, groups, c_out_g, c_in_g)  # [N, R, G, C_out/g, C_in/g]
    kd_n = kd.index_select(0, index)
    out = conv(x, weight, bias, stride, padding, dilation, groups)
    spatial_in, spatial_out = x.shape[2:], out.shape[2:]
    # x as [N, G, S, C_in/g] (a view for channels_last x): each sample's 1×1 mix is one matmul per group.
    x_last = x.movedim(1, -1).reshape(n, -1, groups, c_in_g).transpose(1, 2)
    if order == "pointwise_first":
        channels = n * rank * c_out
        z1 = torch.matmul(x_last, kp_n.permute(0, 2, 4, 1, 3).reshape(n, groups, c_in_g, rank * c_out_g))
        z1 = z1.reshape(n, groups, -1, rank, c_out_g).permute(2, 0, 3, 1, 4)  # [S, N, R, G, C_out/g]
        z2 = conv(_one_sample(z1, spatial_in, channels), kd_n.reshape(channels, 1, *taps), None, stride, padding,
                  dilation, channels)
        z2 = z2.movedim(1, -1).reshape(-1, n, rank, c_out)
        residual = (z2.sum(2) if rank > 1 else z2[:, :, 0]).reshape(*spatial_out, n, c_out)
        residual = residual.movedim(-2, 0).movedim(-1, 1)  # [N, C_out, *spatial_out], a view
    else:
        channels = n * rank * c_in
        z1 = x.movedim(1, -1).movedim(0, -2).unsqueeze(-2).expand(*spatial_in, n, rank, c_in)
        z1 = conv(_one_sample(z1, spatial_in, channels), kd_n.reshape(channels, 1, *taps), None, stride, padding,
                  dilation, channels)
        z1 = z1.movedim(1, -1).reshape(-1, n, rank, groups, c_in_g).permute(1, 3, 0, 2, 4)  # [N, G, S, R, C_in/g]
        z2 = torch.matmul(z1.reshape(n, groups, -1, rank * c_in_g),
                          kp_n.permute(0, 2, 1, 4, 3).reshape(n, groups, rank * c_in_g, c_out_g))
        residual = z2.transpose(1, 2).reshape(n, *spatial_out, c_out).movedim(-1, 1)  # [N, C_out, *spatial_out]
    if db is not None:
        residual = residual + db.index_select(0, index).reshape(n, c_out, *(1 for _ in spatial_out))
    return out.add_(residual)


def _one_sample(t: Tensor, spatial: Sequence[int], channels: int) -> Tensor:
    """t (any shape whose elements run [*spatial, channels] in order) as [1, channels, *spatial], laid out
    channels-innermost (one copy when t is not already)."""
    return t.contiguous().reshape(1, *spatial, channels).movedim(-1, 1)


def _measured_route(x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode, order,
                    backend, plan) -> str:
    """`auto` on CUDA: "segments" or "per_set", whichever runs this batch faster (forward, plus the adapter
    gradients when they are wanted), measured once per shape, number of sets and backend."""
    tensors = [t for a in adapters if a is not None for t in a if t is not None and t.requires_grad]
    training = torch.is_grad_enabled() and bool(tensors)
    key = ("mixed", ops.shape_key(plan.x, weight, plan.stride, plan.padding, plan.dilation, groups,
                                             order), len(adapters), plan.backend, training)

    def run(name):
        with torch.enable_grad() if training else torch.no_grad():
            if name == "segments":
                out = _segments_call(x, weight, bias, adapters, index, stride, padding, dilation, groups,
                                     padding_mode, order, backend)
            else:
                out = per_set(lambda s, part: _one_set(part, weight, bias, adapters[s], stride, padding, dilation,
                                                       groups, padding_mode, order, backend, None),
                              x, index, len(adapters))
            if training:
                torch.autograd.grad(out, tensors, torch.ones_like(out), allow_unused=True)

    return functional.measured_choice(key, {name: (lambda name=name: run(name)) for name in ROUTES[1:]}, x.device,
                                      f"mixed-batch route for x {tuple(x.shape)}, {len(adapters)} sets:")
