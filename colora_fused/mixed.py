"""Mixed batches: every sample of a batch convolved with its own set of adapters (design §10).

`colora_conv_mixed(x, weight, bias, adapters, index, ...)` computes, for each sample n, the CoLoRA convolution
with K0 + ΔK and b0 + Δb of `adapters[index[n]]`: a (Kp, Kd, Δb) triple as `colora_conv` takes them (a set of
named adapters summed, as `layer.factors(names)` gives it), or None for the base conv alone. `index` is a long
tensor of one set number per sample, so the assignment is data, not Python: a compiled model serves any batch
with the same number of sets without recompiling.

Five routes (`route`):

- "single": one set for the whole batch, which is `colora_conv` itself (the layer's cached merge included);
- "segments": the base conv once over the whole batch; then the residuals of the segments of samples sharing a
  set (the samples sorted by set, host counts) by `mixed_ops.set_residuals` (the 1×1 mix as one batched GEMM,
  the stencil as one depthwise conv): all sets in one call where they are about equally large, else one call per
  set. Never a loop over the samples; autograd sums each adapter's gradient over its samples;
- "gathered": the same residual with every sample a set of one, its factors gathered by `index` (adapter-sized,
  [N, r, C_out, C_in/groups]: never a weight per sample). Static shapes, aten ops only: the route under
  torch.compile (no graph break) and torch.func;
- "per_set": the samples sorted by set and `colora_conv` run once per set on its samples, with the layer's
  backend (its merged weight, or the fused kernels), the outputs put back in order. dLoRA's "merge" mode, for
  batches of few, large sets;
- "fused": the fused forward kernel with segments (`kernels.segmented`): one launch for the whole batch,
  tiles that never straddle two sets, each set's K0 + ΔK tile built in registers; the backward's dX and adapter
  gradients likewise, one segmented launch per kernel (`mixed_ops.fused`).

`auto` on CUDA measures the candidates once per shape and number of sets (`functional.measured_choice`);
COLORA_MIXED_ROUTE forces one (`settings.mixed_route`). design §10.
"""
import contextlib
import logging
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import functional, mixed_ops, ops, settings
from ._conv import adapter_shapes

logger = logging.getLogger(__name__)

Factors = Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]
ROUTES = ("single", "segments", "gathered", "per_set", "fused")


class MixedBatch(NamedTuple):
    """What a CoLoRA layer runs a mixed batch with (`per_sample.adapters_per_sample` sets it on every layer):
    `sets`, the distinct adapter sets (tuples of adapter names; () for the base conv alone), `index`, the set of
    each sample (a long tensor), `counts`, the samples of each set (host ints: the per-set routes need no sync for
    them), and `name`, the layer's name in its model (for errors)."""
    sets: Tuple[Tuple[str, ...], ...]
    index: Tensor
    counts: Tuple[int, ...]
    name: str


def colora_conv_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors],
                      index: Tensor, stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                      order: str = "pointwise_first", backend: str = "auto", *, counts: Optional[Sequence[int]] = None,
                      merge_cache=None) -> Tensor:
    """O[n] = colora_conv(x[n], weight, bias, *adapters[index[n]], ...) for every sample n, computed for the
    whole batch at once (module docstring); arguments as `colora_conv`'s, `index` a long tensor of x's batch
    size with values below len(adapters). `counts` (optional): the samples of each set, if the caller knows
    them on the host; `merge_cache` serves the "single" route only."""
    index = _checked_index(index, x, weight, len(adapters))
    chosen = route(x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode, order,
                   backend)
    return _run(chosen, x, weight, bias, adapters, index, counts, stride, padding, dilation, groups, padding_mode,
                order, backend, merge_cache)


def _run(chosen, x, weight, bias, adapters, index, counts, stride, padding, dilation, groups, padding_mode, order,
         backend, merge_cache=None) -> Tensor:
    if chosen == "single":
        return _one_set(x, weight, bias, adapters[0], stride, padding, dilation, groups, padding_mode, order,
                        backend, merge_cache)
    if chosen == "per_set":
        return per_set(lambda s, part: _one_set(part, weight, bias, adapters[s], stride, padding, dilation, groups,
                                                padding_mode, order, backend, None), x, index, len(adapters), counts)
    return _prepared(chosen, x, weight, bias, adapters, index, counts, stride, padding, dilation, groups,
                     padding_mode, order, backend)


def route(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors], index: Tensor, stride,
          padding, dilation, groups: int, padding_mode: str, order: str, backend: str) -> str:
    """Which route computes this mixed batch (module docstring): "single" for one set; else COLORA_MIXED_ROUTE
    when set (under torch.compile and torch.func a forced "segments" or "per_set" becomes "gathered", which has
    no data-dependent size); "gathered" under torch.compile and torch.func and when no set has an adapter;
    "segments" for the torch and composite backends; "per_set" for "reference" and "hybrid" (which then run their
    own kernels per set); "fused" for "triton" ("per_set" where the fused kernel does not serve the conv). Under
    `auto` on CUDA the fastest candidate, measured once per shape, number of sets and backend: "segments",
    "gathered", "per_set" and, where the fused kernel serves the conv, "fused"."""
    if len(adapters) == 1:
        return "single"
    traced = torch.compiler.is_compiling() or functional.transforms_active()
    forced = settings.mixed_route()
    if forced is not None:
        if forced not in ROUTES[1:]:
            raise ValueError(f"COLORA_MIXED_ROUTE={forced!r}; choose one of {ROUTES[1:]}")
        return "gathered" if traced and forced in ("segments", "per_set") else forced
    first = _first(adapters)
    if first is None or traced:
        return "gathered"
    plan = functional.prepare(x, weight, bias, *first, stride, padding, dilation, groups, padding_mode, order,
                              backend)
    fused = plan.backend not in ("torch", "composite", "reference") and functional.unsupported_reason(
        "triton", plan.x, functional.metadata_like(weight, plan.x.dtype), groups) is None
    if (functional.requested_backend(backend) != "auto" or not settings.autotune() or not x.is_cuda
            or plan.backend == "composite"):
        # Not measured on CPU: one timing per shape there is noisier than the routes differ ("segments" measured
        # fastest on ResNet-50, design §10).
        return {"torch": "segments", "composite": "segments", "triton": "fused" if fused else "per_set"}.get(
            plan.backend, "per_set")
    candidates = ("segments", "gathered", "per_set")
    if fused and not functional.fused_prefers_library(weight, groups):
        candidates += ("fused",)
    return _measured_route(candidates, x, weight, bias, adapters, index, stride, padding, dilation, groups,
                           padding_mode, order, backend, plan)


def per_set(fn: Callable[[int, Tensor], Tensor], x: Tensor, index: Tensor, n_sets: int,
            counts: Optional[Sequence[int]] = None) -> Tensor:
    """fn(s, x[samples of set s]) for every set s with samples, put back in sample order: the per-set loop (and
    the route for what has no segmented form, such as a weight-standardised conv's merged weight). `counts`:
    the samples per set, when the caller knows them (else one host sync finds them)."""
    order = torch.argsort(index, stable=True)
    counts = _counts(index, n_sets, counts)
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


def _counts(index: Tensor, n_sets: int, counts: Optional[Sequence[int]]) -> List[int]:
    return list(counts) if counts is not None else torch.bincount(index, minlength=n_sets).tolist()


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


def _prepared(chosen, x, weight, bias, adapters, index, counts, stride, padding, dilation, groups, padding_mode,
              order, backend) -> Tensor:
    """The "segments", "gathered" and "fused" routes: checks, padding and autocast as `colora_conv` does them,
    then `mixed_ops.segments` (aten ops) or `mixed_ops.fused` (the segmented fused kernel)."""
    first = _first(adapters)
    if first is None:
        return _one_set(x, weight, bias, None, stride, padding, dilation, groups, padding_mode, order, backend, None)
    plan = functional.prepare(x, weight, bias, *first, stride, padding, dilation, groups, padding_mode, order,
                              "torch" if chosen in ("segments", "gathered") else backend)
    for factors in adapters:
        if factors is not None:
            functional.check_tensors(plan.x, weight, bias, *factors, groups, order, plan.dtype)
    cast = lambda t: functional.as_autocast(t, plan.dtype)  # noqa: E731
    with torch.autocast(plan.x.device.type, enabled=False) if plan.dtype is not None else contextlib.nullcontext():
        adapters = [None if a is None else tuple(cast(t) for t in a) for a in adapters]
        conv = (plan.stride, plan.padding, plan.dilation, groups, order)
        if chosen in ("segments", "gathered"):
            # "segments": one residual per segment of samples (host counts); "gathered": static shapes.
            out = mixed_ops.segments(plan.x, cast(weight), cast(bias), adapters, index, *conv,
                                     _counts(index, len(adapters), counts) if chosen == "segments" else None)
        else:
            kernel_backend = plan.backend if plan.backend in ("triton", "hybrid") else "triton"
            out = mixed_ops.fused(plan.x, cast(weight), cast(bias), adapters, index,
                                  _counts(index, len(adapters), counts), *conv, kernel_backend, plan.fallback)
    return out.squeeze(0) if plan.unbatched else out


def _measured_route(candidates, x, weight, bias, adapters, index, stride, padding, dilation, groups, padding_mode,
                    order, backend, plan) -> str:
    """`auto` on CUDA: the candidate route that runs this batch fastest (forward, plus the adapter gradients when
    they are wanted), measured once per shape, number of sets and backend."""
    tensors = [t for a in adapters if a is not None for t in a if t is not None and t.requires_grad]
    training = torch.is_grad_enabled() and bool(tensors)
    key = ("mixed", ops.shape_key(plan.x, weight, plan.stride, plan.padding, plan.dilation, groups, order),
           len(adapters), plan.backend, training, candidates)
    counts = _counts(index, len(adapters), None)

    def run(name):
        with torch.enable_grad() if training else torch.no_grad():
            try:
                out = _run(name, x, weight, bias, adapters, index, counts, stride, padding, dilation, groups,
                           padding_mode, order, backend)
                if training:
                    torch.autograd.grad(out, tensors, torch.ones_like(out), allow_unused=True)
            except Exception as exc:  # a Triton failure on this shape: the route is never chosen
                if name == "segments":
                    raise
                logger.warning("colora_fused: mixed-batch route %s failed on x %s (%s: %s); not using it", name,
                               tuple(x.shape), type(exc).__name__, exc)
                return False

    return functional.measured_choice(key, {name: (lambda name=name: run(name)) for name in candidates}, x.device,
                                      f"mixed-batch route for x {tuple(x.shape)}, {len(adapters)} sets:",
                                      functional.ROUTE_CHOICES)
