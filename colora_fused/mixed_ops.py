"""The computations of a mixed batch (design §10), below `mixed`'s dispatch: every set's factors stacked, the
"segments" formula in aten ops, and the "fused" route's autograd (the fused forward, input-gradient and
adapter-gradient kernels with segments)."""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from ._conv import CONV_FNS, adapter_rank, adapter_shapes, adapter_terms

Factors = Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]


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


# The "segments" route runs every set in one call, each padded to the largest set's samples, where that adds at
# most this share of samples (a balanced batch adds none); otherwise one call per set.
PAD_LIMIT = 1.25


def segments(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors], index: Tensor,
             stride, padding, dilation, groups: int, order: str,
             counts: Optional[Sequence[int]] = None) -> Tensor:
    """The "segments" route on a batched, zero-padded (symmetric `padding`), cast x: the base conv once over the
    whole batch, plus each sample's residual with its set's factors (`set_residuals`).

    With `counts` (samples per set, host ints; eager mode) the samples are sorted by set, channels innermost, and
    the residuals run per segment: all the sets in one call where padding each to the largest set costs little
    (PAD_LIMIT; the padding repeats a set's last sample, its residual unused), the result gathered back in sample
    order; else one call per set, copied to its samples' places (index_copy_ of whole samples, not index_add_'s
    element-wise scatter). Without (torch.compile, torch.func: no data-dependent sizes), `gathered_residual`:
    every sample its own "set", the factors gathered per sample, in static shapes."""
    conv = CONV_FNS[weight.dim() - 2]
    out = conv(x, weight, bias, stride, padding, dilation, groups)
    if counts is None:
        return out.add_(gathered_residual(x, weight, adapters, index, stride, padding, dilation, groups, order))
    if not any(count and adapters[s] is not None for s, count in enumerate(counts)):
        return out
    conv_args = (stride, padding, dilation, groups, order)
    sorted_samples = torch.argsort(index, stable=True)
    x_last = x.movedim(1, -1)  # [N, *spatial, C_in], a view (contiguous for channels_last x)
    present = [s for s, count in enumerate(counts) if count]
    largest, starts = max(counts), [sum(counts[:s]) for s in present]
    if len(present) * largest <= PAD_LIMIT * x.shape[0]:
        # Slot (j, i): the i-th sample of set present[j] in the sorted order (its last again past its count).
        slots = [start + min(i, counts[s] - 1) for s, start in zip(present, starts) for i in range(largest)]
        padded = sorted_samples[torch.tensor(slots, device=x.device)]
        x_sets = x_last.index_select(0, padded).view(len(present), largest, *x_last.shape[1:])
        residual = set_residuals(x_sets, *stacked_factors([adapters[s] for s in present], weight, groups, order),
                                 *conv_args).movedim(-2, 0)  # [sets, largest, *spatial_out, C_out]
        # Each sample's slot: sorted position q of set j holds slot (j, q - start_j); sample sorted_samples[q].
        where = torch.empty_like(sorted_samples).scatter_(0, sorted_samples, torch.arange(
            x.shape[0], device=x.device))  # sample n's sorted position
        set_of = torch.tensor([j for j, s in enumerate(present) for _ in range(counts[s])], device=x.device)
        place_of = torch.tensor([q for s in present for q in range(counts[s])], device=x.device)
        return out.add_(residual[set_of[where], place_of[where]].to(out.dtype).movedim(-1, 1))
    x_sorted = x_last.index_select(0, sorted_samples)
    residual = out.new_empty((out.shape[0], *out.shape[2:], out.shape[1]))  # [N, *spatial_out, C_out]
    for s, start in zip(present, starts):
        rows = sorted_samples[start:start + counts[s]]
        if adapters[s] is None:
            residual.index_fill_(0, rows, 0)
            continue
        kp, kd = adapter_terms(*adapters[s][:2])
        db = adapters[s][2]
        one = set_residuals(x_sorted[start:start + counts[s]].unsqueeze(0), kp.unsqueeze(0), kd.unsqueeze(0),
                            None if db is None else db.unsqueeze(0), *conv_args)
        residual.index_copy_(0, rows, one.squeeze(-2).to(out.dtype))
    return out.add_(residual.movedim(-1, 1))


def gathered_residual(x: Tensor, weight: Tensor, adapters: Sequence[Factors], index: Tensor, stride, padding,
                      dilation, groups: int, order: str) -> Tensor:
    """Every sample's residual at once, [N, C_out, *spatial_out]: `set_residuals` with each sample a set of one,
    its set's factors gathered by `index` ([N, r, C_out, C_in/groups]: adapter-sized, never a weight per
    sample); static shapes."""
    kp, kd, db = stacked_factors(adapters, weight, groups, order)
    kp, kd, db = (None if t is None else t.index_select(0, index) for t in (kp, kd, db))
    residual = set_residuals(x.movedim(1, -1).unsqueeze(1), kp, kd, db, stride, padding, dilation, groups, order)
    return residual[0].movedim(-2, 0).movedim(-1, 1)


def set_residuals(x: Tensor, pointwise: Tensor, depthwise: Tensor, bias_delta: Optional[Tensor], stride, padding,
                  dilation, groups: int, order: str) -> Tensor:
    """The residual Z2 + Δb of `reference.residual_reference` (summed over the rank-r terms) for S sets of L
    samples each: x [S, L, *spatial, C_in] (channels innermost), the sets' factors stacked, Kp [S, r, C_out,
    C_in/groups], Kd [S, r, C_kd, *k], Δb [S, C_out] or None; returns [L, *spatial_out, S, C_out].

    Two calls for all the sets: the 1×1 mix as one batched GEMM over each set's L·positions (per group; a GEMM
    rather than a 1×1 conv: on small maps CPU convs of a few samples cost more to set up than to run), the
    stencil as one depthwise conv of L samples with the S sets' channels side by side (S·r·C channels, laid out
    channels innermost, where torch's CPU depthwise conv is far faster than on NCHW). pointwise_first mixes into
    r·C_out channels, filters them, and sums the terms; depthwise_first filters each input channel r times
    (channels (c, r)) and the GEMM sums over (c, r). The layout changes between the two are copies only where S
    or the groups exceed 1."""
    conv = CONV_FNS[x.dim() - 3]
    sets, samples, spatial, c_in = x.shape[0], x.shape[1], x.shape[2:-1], x.shape[-1]
    rank, c_out, c_in_g = pointwise.shape[1:]
    c_out_g, taps = c_out // groups, depthwise.shape[3:]
    kp = pointwise.reshape(sets, rank, groups, c_out_g, c_in_g).permute(0, 2, 4, 1, 3)  # [S, G, C_in/g, r, C_out/g]
    if order == "pointwise_first":
        rows = x.reshape(sets, -1, groups, c_in_g).transpose(1, 2)  # [S, G, L·P, C_in/g]
        z1 = torch.matmul(rows, kp.reshape(sets, groups, c_in_g, rank * c_out_g))  # [S, G, L·P, (r, C_out/g)]
        z1 = z1.reshape(sets, groups, samples, -1, rank, c_out_g).permute(2, 3, 0, 4, 1, 5)  # [L, P, S, r, G, ·]
        channels = sets * rank * c_out
        z1 = z1.reshape(samples, *spatial, channels).movedim(-1, 1)
        z2 = conv(z1, depthwise.reshape(channels, 1, *taps), None, stride, padding, dilation, channels)
        residual = z2.movedim(1, -1).unflatten(-1, (sets, rank, c_out))
        residual = residual.sum(-2) if rank > 1 else residual.squeeze(-2)
    else:
        z1 = x.movedim(0, -2).reshape(samples, *spatial, sets * c_in).movedim(-1, 1)
        z1 = conv(z1, depthwise.transpose(1, 2).reshape(sets * c_in * rank, 1, *taps), None, stride, padding,
                  dilation, sets * c_in)  # [L, (S, C_in, r), *spatial_out]
        spatial_out = z1.shape[2:]
        z1 = z1.movedim(1, -1).reshape(samples, -1, sets, groups, c_in_g * rank).permute(2, 3, 0, 1, 4)
        z2 = torch.matmul(z1.reshape(sets, groups, -1, c_in_g * rank),
                          kp.reshape(sets, groups, c_in_g * rank, c_out_g))  # [S, G, L·P, C_out/g]
        residual = z2.reshape(sets, groups, samples, -1, c_out_g).permute(2, 3, 0, 1, 4)
        residual = residual.reshape(samples, *spatial_out, sets, c_out)
    return residual if bias_delta is None else residual + bias_delta


def fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors], index: Tensor,
          counts: Sequence[int], stride, padding, dilation, groups: int, order: str, backend: str,
          fallback: bool) -> Tensor:
    """The "fused" route on a batched, zero-padded, cast x: the fused forward kernel with segments
    (`kernels.segmented`), one launch for the whole batch; backward (`_backward`): with `backend` "triton", dX
    and the adapter gradients by the input-gradient and adapter-gradient kernels with segments, else per set by
    `backend`'s own backward (`ops`) on the set's samples. `counts`: samples per set (host ints)."""
    kp, kd, db = stacked_factors(adapters, weight, groups, order)
    return _Fused.apply(x, weight, bias, kp, kd, db, index, tuple(counts), stride, padding, dilation, groups, order,
                        backend, fallback)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, kp, kd, db, index, counts, stride, padding, dilation, groups, order, backend,
                fallback):
        from .kernels.conv_fwd import colora_conv_forward
        from .kernels.segmented import segments_of

        segments = segments_of(index, counts)
        out = colora_conv_forward(x, weight, bias, kp, kd, db, stride, padding, dilation, groups, order,
                                  segments=segments)
        ctx.save_for_backward(x, weight, bias, kp, kd, db, index, segments.sample, segments.seg)
        ctx.args = (counts, stride, padding, dilation, groups, order, backend, fallback)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, kp, kd, db, index, sample, _ = ctx.saved_tensors
        counts, stride, padding, dilation, groups, order, backend, fallback = ctx.args
        need_x, need_w, need_b, need_kp, need_kd, need_db = ctx.needs_input_grad[:6]
        sums = [0, *range(2, grad.dim())]
        if torch.is_grad_enabled():
            # backward(create_graph=True): the same gradients through the "segments" formula, differentiable again.
            adapters = [(kp[s], kd[s], None if db is None else db[s]) for s in range(kp.shape[0])]
            wanted = [t for t, need in ((x, need_x), (weight, need_w), (kp, need_kp), (kd, need_kd)) if need]
            out = segments(x, weight, None, adapters, index, stride, padding, dilation, groups, order)
            found = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
            d_x, d_w, d_kp, d_kd = (next(found) if need else None for need in (need_x, need_w, need_kp, need_kd))
        else:
            d_x, d_w, d_kp, d_kd = _backward(ctx, grad, x, weight, kp, kd, sample, need_x, need_w, need_kp or need_kd)
        d_b = grad.sum(sums) if need_b else None
        d_db = None
        if need_db:
            d_db = torch.zeros_like(db).index_add_(0, index, grad.sum(sums[1:]).to(db.dtype))
        return (d_x, d_w, d_b, d_kp if need_kp else None, d_kd if need_kd else None, d_db, None, None, None, None,
                None, None, None, None, None)


def _backward(ctx, grad, x, weight, kp, kd, sample, need_x: bool, need_w: bool, need_adapters: bool):
    """(dx, dK0, dKp, dKd) of the fused route, each None where not needed. With the "triton" backend, dx and the
    adapter gradients each in one segmented launch (`_segmented`); dK0, a gradient of the base conv alone, once
    over the whole batch. What Triton failed on, where the call may fall back, and every other backend: per set
    by the backend's own backward on the set's samples."""
    from ._conv import adapter_grad_route
    from .kernels._common import Segments
    from .kernels.conv_bwd_adapters import colora_conv_backward_adapters
    from .kernels.conv_bwd_input import colora_conv_backward_input

    counts, stride, padding, dilation, groups, order, backend, fallback = ctx.args
    *_, seg = ctx.saved_tensors
    conv = (stride, padding, dilation, groups, order)
    segments = Segments(sample, seg, max(counts))
    d_x = d_kp = d_kd = None
    if backend == "triton":
        channels_last = ops._memory_format(x) != torch.contiguous_format
        if need_x:
            d_x = _segmented(fallback, colora_conv_backward_input, grad, weight, kp, kd, x.shape, channels_last,
                             *conv, segments=segments)
        if need_adapters:
            route = adapter_grad_route(x.shape, weight.shape, grad.shape, order, kp.shape[1])
            d_kp, d_kd = _segmented(fallback, colora_conv_backward_adapters, x, grad, weight, kp, kd, *conv,
                                    route=route, segments=segments) or (None, None)
    d_w = None
    if need_w:
        d_w = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                  [0] * (x.dim() - 2), groups, [False, True, False])[1]
        d_w = d_w.contiguous(memory_format=ops._memory_format(weight))
    per_set_x, per_set_adapters = need_x and d_x is None, need_adapters and d_kp is None
    if not (per_set_x or per_set_adapters):
        return d_x, d_w, d_kp, d_kd
    d_x = torch.empty_like(x) if per_set_x else d_x
    if per_set_adapters:
        d_kp, d_kd = torch.zeros_like(kp), torch.zeros_like(kd)
    order_samples, start, rank = sample.long(), 0, kp.shape[1]  # the forward's sort by set
    for s, count in enumerate(counts):
        if not count:
            continue
        rows = order_samples[start:start + count]
        start += count
        one = (s,) if rank > 1 else (s, 0)
        g_x, _, g_kp, g_kd = ops._conv_backward(
            grad.index_select(0, rows), x.index_select(0, rows), weight, kp[one], kd[one], *conv, backend,
            per_set_x, False, per_set_adapters, None, fallback)
        if per_set_x:
            d_x.index_copy_(0, rows, g_x)
        if per_set_adapters:
            d_kp[one].copy_(g_kp)
            d_kd[one].copy_(g_kd)
    return d_x, d_w, d_kp, d_kd


def _segmented(fallback: bool, launcher, *args, **kwargs):
    """A segmented Triton launcher's result, or None where Triton fails on it and the call may fall back (the
    caller then runs that part per set)."""
    try:
        return launcher(*args, **kwargs)
    except Exception:
        if not fallback:
            raise
        return None
