"""The computations of a mixed batch (design §10), below `mixed`'s dispatch: every set's factors stacked, the
"segments" formula in aten ops, and the "fused" route's autograd (the fused forward, input-gradient and
adapter-gradient kernels with segments)."""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
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


def segments(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Factors], index: Tensor,
             stride, padding, dilation, groups: int, order: str,
             counts: Optional[Sequence[int]] = None) -> Tensor:
    """The "segments" route on a batched, zero-padded (symmetric `padding`), cast x: the base conv once over the
    whole batch, plus each sample's residual with its set's factors.

    With `counts` (samples per set, host ints; eager mode), the residual runs per segment: the samples sorted by
    set once, channels innermost, each set's residual on its run (`set_residual`: the 1×1 mix as one GEMM, the
    stencil as one depthwise conv), put back in sample order by one copy of whole samples (index_copy_, not
    index_add_'s element-wise scatter) and one add. Without (torch.compile, torch.func: no data-dependent
    sizes), `gathered_residual`: the same residual with the factors gathered per sample, in static shapes."""
    conv = CONV_FNS[weight.dim() - 2]
    out = conv(x, weight, bias, stride, padding, dilation, groups)
    if counts is None:
        return out.add_(gathered_residual(x, weight, adapters, index, out.shape, stride, padding, dilation, groups,
                                          order))
    if not any(count and adapters[s] is not None for s, count in enumerate(counts)):
        return out
    sorted_samples = torch.argsort(index, stable=True)
    x_sorted = x.movedim(1, -1).index_select(0, sorted_samples)  # [N, *spatial, C_in], contiguous
    pieces, start = [], 0
    for s, count in enumerate(counts):
        if count:
            part = x_sorted[start:start + count]
            start += count
            pieces.append(out.new_zeros((count, *out.shape[2:], out.shape[1])) if adapters[s] is None else
                          set_residual(part, *adapters[s], stride, padding, dilation, groups, order))
    residual = torch.cat(pieces).to(out.dtype)
    return out.add_(torch.empty_like(residual).index_copy_(0, sorted_samples, residual).movedim(-1, 1))


def set_residual(part: Tensor, pointwise: Tensor, depthwise: Tensor, bias_delta: Optional[Tensor], stride, padding,
                 dilation, groups: int, order: str) -> Tensor:
    """One adapter set's residual Z2 + Δb (`reference.residual_reference`'s, summed over the rank-r terms) on its
    samples `part`, laid out channels innermost ([n, *spatial, C_in], contiguous); returns [n, *spatial_out, C_out]
    likewise. The 1×1 mix is one GEMM over all the set's positions (per group), not a 1×1 conv: on small maps,
    where CPU convs of a few samples cost more to set up than to run, it is the cheaper form (F.linear, whose
    weight operand is contiguous: a matmul against a transposed view of a 3-channel Kp took 60× longer on CPU
    than F.linear, the stem's case). The rank-r terms run
    as one: pointwise_first mixes into r·C_out channels, one depthwise conv filters them, the terms are summed;
    depthwise_first filters each input channel r times (channels (c, r)) and the GEMM sums over (c, r)."""
    conv = CONV_FNS[part.dim() - 2]
    kps, kds = adapter_terms(pointwise, depthwise)
    rank, c_out, c_in_g = kps.shape
    n, spatial, c_in = part.shape[0], part.shape[1:-1], part.shape[-1]
    c_out_g, taps = c_out // groups, kds.shape[2:]
    if order == "pointwise_first":
        rows = part.reshape(-1, c_in)
        if groups == 1:
            z1 = F.linear(rows, kps.reshape(rank * c_out, c_in))  # channels (r, o)
        else:
            w = kps.reshape(rank, groups, c_out_g, c_in_g).permute(1, 3, 0, 2).reshape(groups, c_in_g, -1)
            z1 = torch.bmm(rows.view(-1, groups, c_in_g).transpose(0, 1), w)  # [G, M, (r, o_g)]
            z1 = z1.view(groups, -1, rank, c_out_g).permute(1, 2, 0, 3).reshape(-1, rank * c_out)
        z1 = z1.view(n, *spatial, rank * c_out).movedim(-1, 1)
        z2 = conv(z1, kds.reshape(rank * c_out, 1, *taps), None, stride, padding, dilation, rank * c_out)
        residual = z2.movedim(1, -1)
        if rank > 1:
            residual = residual.unflatten(-1, (rank, c_out)).sum(-2)
    else:
        z1 = conv(part.movedim(-1, 1), kds.transpose(0, 1).reshape(c_in * rank, 1, *taps), None, stride, padding,
                  dilation, c_in)  # channels (c, r)
        spatial_out = z1.shape[2:]
        z1 = z1.movedim(1, -1).reshape(-1, c_in * rank)
        if groups == 1:  # columns (c, r)
            residual = F.linear(z1, kps.permute(1, 2, 0).reshape(c_out, c_in * rank))
        else:
            w = kps.reshape(rank, groups, c_out_g, c_in_g).permute(1, 3, 0, 2).reshape(groups, -1, c_out_g)
            residual = torch.bmm(z1.view(-1, groups, c_in_g * rank).transpose(0, 1), w).transpose(0, 1)
        residual = residual.reshape(n, *spatial_out, c_out)
    return residual if bias_delta is None else residual + bias_delta


def gathered_residual(x: Tensor, weight: Tensor, adapters: Sequence[Factors], index: Tensor, out_shape,
                      stride, padding, dilation, groups: int, order: str) -> Tensor:
    """Every sample's residual at once, its set's factors gathered by `index` into [N, r, ...] tensors
    (adapter-sized: never a weight per sample). One formula per order, the reference's (design §1) with a
    per-sample Kp and Kd.

    The per-sample depthwise stencil is one depthwise conv of a single "sample" with N·r·C channels, laid out
    channels-innermost (memory [*spatial, N, r, C]): torch's CPU depthwise conv is ~10× faster on that layout
    than on NCHW, and the 1×1 GEMM writes it at no extra cost."""
    conv = CONV_FNS[weight.dim() - 2]
    kp, kd, db = stacked_factors(adapters, weight, groups, order)
    n, c_in, (c_out, c_in_g), rank, taps = x.shape[0], x.shape[1], weight.shape[:2], kp.shape[1], kd.shape[3:]
    c_out_g = c_out // groups
    kp_n = kp.index_select(0, index).reshape(n, rank, groups, c_out_g, c_in_g)  # [N, R, G, C_out/g, C_in/g]
    kd_n = kd.index_select(0, index)
    spatial_in, spatial_out = x.shape[2:], out_shape[2:]
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
    return residual


def _one_sample(t: Tensor, spatial: Sequence[int], channels: int) -> Tensor:
    """t (any shape whose elements run [*spatial, channels] in order) as [1, channels, *spatial], laid out
    channels-innermost (one copy when t is not already)."""
    return t.contiguous().reshape(1, *spatial, channels).movedim(-1, 1)


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
        channels_last = x.dim() in (4, 5) and x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()
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
