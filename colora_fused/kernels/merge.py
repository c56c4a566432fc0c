"""Merging a CoLoRA residual into its base conv in place (paper eq. 10–13): K0 += ΔK.

ΔK[o, c, t] = Kp[o, c] · Kd[o, t] (pointwise_first) or Kp[o, c] · Kd[g(o)·C_in/groups + c, t] (depthwise_first),
g(o) = o // (C_out/groups). The merge also folds Δb into b0, in the same launch, with no temporary of K0's size.
`merge_many_` merges many layers in one launch per dtype combination: a model's merge.
"""
import itertools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._conv import MergeSpec, adapter_terms
from ._common import (TritonBackendError, TritonBackendTypeError, backend_error, check_conv_tensors, extent, launch,
                      pad3)

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def merge_config():
    """(BLOCK_O, BLOCK_R, num_warps): a memory-bound elementwise pass, one config everywhere."""
    return 16, 128, 4


@triton.jit
def _merge_block(
    w_ptr, out_ptr, kp_ptr, kd_ptr, b_ptr, db_ptr, i_blk, j_blk,
    C_OUT, C_IN_G, C_OUT_G, KD, KH, KW,
    sw_o, sw_c, sw_d, sw_h, sw_w,
    so_o, so_c, so_d, so_h, so_w,
    sp_r, sp_o, sp_c,
    sk_r, sk_c, sk_d, sk_h, sk_w,
    s_b, s_db, RANK,
    PW_FIRST, HAS_BIAS, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[o, c, t] = w[o, c, t] + Σ_{i<RANK} Kp[i, o, c] · Kd[i, ·, t] in fp32 on one [BLOCK_O, BLOCK_R] block;
    with HAS_BIAS the blocks with j_blk = 0 also fold b[o] += db[o].

    w, out: [C_OUT, C_IN_G, KD, KH, KW] by strides (out may be w: an in-place merge; each element is read and
    written by one block). Block (i_blk, j_blk) holds rows [i_blk·BLOCK_O, (i_blk+1)·BLOCK_O) and flat positions
    r = c·KD·KH·KW + t in [j_blk·BLOCK_R, (j_blk+1)·BLOCK_R). PW_FIRST and HAS_BIAS may be constexpr (one layer a
    launch) or runtime values (a row of `_merge_many_kernel`'s table).
    """
    i_o = (i_blk * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)  # [BO]
    r = (j_blk * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
    m_o = i_o < C_OUT
    if HAS_BIAS:
        m_b = m_o & (j_blk == 0)
        b_b = tl.load(b_ptr + i_o * s_b, mask=m_b).to(tl.float32)  # [BO]
        b_b += tl.load(db_ptr + i_o * s_db, mask=m_b).to(tl.float32)
        tl.store(b_ptr + i_o * s_b, b_b.to(b_ptr.dtype.element_ty), mask=m_b)
    n_taps = KD * KH * KW
    c = r // n_taps
    tap = r % n_taps
    t_d = tap // (KH * KW)
    t_h = (tap // KW) % KH
    t_w = tap % KW
    m = m_o[:, None] & (r < C_IN_G * n_taps)[None, :]  # [BO, BR]
    b_w = tl.load(w_ptr + i_o[:, None] * sw_o + (c * sw_c + t_d * sw_d + t_h * sw_h + t_w * sw_w)[None, :],
                  mask=m, other=0.0).to(tl.float32)  # [BO, BR]
    kd_tap = t_d * sk_d + t_h * sk_h + t_w * sk_w  # [BR]
    for i in range(RANK):
        b_p = tl.load(kp_ptr + i * sp_r + i_o[:, None] * sp_o + (c * sp_c)[None, :], mask=m, other=0.0)
        if PW_FIRST:
            b_d = tl.load(kd_ptr + i * sk_r + (i_o * sk_c)[:, None] + kd_tap[None, :], mask=m, other=0.0)
        else:
            kd_row = (i_o // C_OUT_G) * C_IN_G * sk_c  # [BO] Kd[g(o)·C_IN_G]
            b_d = tl.load(kd_ptr + i * sk_r + kd_row[:, None] + (c * sk_c + kd_tap)[None, :], mask=m, other=0.0)
        b_w += b_p.to(tl.float32) * b_d.to(tl.float32)
    p_o = out_ptr + i_o[:, None] * so_o + (c * so_c + t_d * so_d + t_h * so_h + t_w * so_w)[None, :]
    tl.store(p_o, b_w.to(out_ptr.dtype.element_ty), mask=m)  # [BO, BR]


@triton.jit
def _merge_kernel(
    w_ptr, out_ptr, kp_ptr, kd_ptr, b_ptr, db_ptr,
    C_OUT, C_IN_G, C_OUT_G, KD, KH, KW,
    sw_o, sw_c, sw_d, sw_h, sw_w,
    so_o, so_c, so_d, so_h, so_w,
    sp_r, sp_o, sp_c,
    sk_r, sk_c, sk_d, sk_h, sk_w,
    s_b, s_db,
    RANK: tl.constexpr, PW_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One layer: out = w + ΔK (and with HAS_BIAS b += db), program (i, j) on `_merge_block` (i, j), so the grid
    grows with the weight and fills the GPU."""
    _merge_block(w_ptr, out_ptr, kp_ptr, kd_ptr, b_ptr, db_ptr, tl.program_id(0), tl.program_id(1),
                 C_OUT, C_IN_G, C_OUT_G, KD, KH, KW, sw_o, sw_c, sw_d, sw_h, sw_w, so_o, so_c, so_d, so_h, so_w,
                 sp_r, sp_o, sp_c, sk_r, sk_c, sk_d, sk_h, sk_w, s_b, s_db, RANK, PW_FIRST, HAS_BIAS, BLOCK_O,
                 BLOCK_R)


# The columns of a `_merge_many_kernel` table row, in order (`_table_row` writes them).
_FIELDS = ("w", "kp", "kd", "b", "db", "C_OUT", "C_IN_G", "C_OUT_G", "KD", "KH", "KW",
           "sw_o", "sw_c", "sw_d", "sw_h", "sw_w", "sp_o", "sp_c", "sk_c", "sk_d", "sk_h", "sk_w", "s_b", "s_db",
           "PW_FIRST", "HAS_BIAS", "RANK", "sp_r", "sk_r")


@triton.jit
def _merge_many_kernel(
    starts_ptr, rows_ptr, N_LAYERS, N_STEPS,
    W_DTYPE: tl.constexpr, KP_DTYPE: tl.constexpr, KD_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr,
    DB_DTYPE: tl.constexpr, N_FIELDS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Many layers in place: w_l += ΔK_l (and b_l += db_l where the row's HAS_BIAS), one launch.

    rows: int64 [N_LAYERS, N_FIELDS], one row a layer, columns as `_FIELDS`: data pointers (cast here to the
    launch's dtypes), shapes, strides and the flags. starts: int64 [N_LAYERS], the first program of each layer,
    increasing; layer l owns cdiv(C_OUT, BLOCK_O)·cdiv(C_IN_G·KD·KH·KW, BLOCK_R) programs, so the grid is the sum
    over the layers and fills the GPU. A program finds its layer, the last l with starts[l] ≤ pid, by a binary
    search of N_STEPS = ⌈log2 N_LAYERS⌉ halvings, then merges its block of that layer as `_merge_kernel` does.
    """
    pid = tl.program_id(0)
    layer = tl.full([], 0, tl.int32)
    n = N_LAYERS
    for _ in range(N_STEPS):
        half = n // 2
        layer = tl.where(tl.load(starts_ptr + layer + half) <= pid, layer + half, layer)
        n -= half
    row = rows_ptr + layer.to(tl.int64) * N_FIELDS
    C_IN_G = tl.load(row + 6)
    KD = tl.load(row + 8)
    KH = tl.load(row + 9)
    KW = tl.load(row + 10)
    block = pid - tl.load(starts_ptr + layer)
    n_r = tl.cdiv(C_IN_G * KD * KH * KW, BLOCK_R)
    w_ptr = tl.load(row).to(tl.pointer_type(W_DTYPE))
    sw_o, sw_c, sw_d = tl.load(row + 11), tl.load(row + 12), tl.load(row + 13)
    sw_h, sw_w = tl.load(row + 14), tl.load(row + 15)
    _merge_block(w_ptr, w_ptr, tl.load(row + 1).to(tl.pointer_type(KP_DTYPE)),
                 tl.load(row + 2).to(tl.pointer_type(KD_DTYPE)), tl.load(row + 3).to(tl.pointer_type(B_DTYPE)),
                 tl.load(row + 4).to(tl.pointer_type(DB_DTYPE)), block // n_r, block % n_r,
                 tl.load(row + 5), C_IN_G, tl.load(row + 7), KD, KH, KW,
                 sw_o, sw_c, sw_d, sw_h, sw_w, sw_o, sw_c, sw_d, sw_h, sw_w,
                 tl.load(row + 27), tl.load(row + 16), tl.load(row + 17),
                 tl.load(row + 28), tl.load(row + 18), tl.load(row + 19), tl.load(row + 20), tl.load(row + 21),
                 tl.load(row + 22), tl.load(row + 23), tl.load(row + 26), tl.load(row + 24) != 0,
                 tl.load(row + 25) != 0, BLOCK_O, BLOCK_R)


def _pad_strides(t: torch.Tensor, lead: int):
    """Strides of t with its kernel dims padded in front to (KD, KH, KW) by stride 0."""
    return tuple(t.stride()[:lead]) + (0,) * (3 - (t.dim() - lead)) + tuple(t.stride()[lead:])


def _check_merge(spec: MergeSpec) -> None:
    weight, bias, pointwise, depthwise, bias_delta, groups, order = spec
    if weight.dim() not in (3, 4, 5) or groups < 1 or weight.shape[0] % groups:
        raise backend_error(f"weight {tuple(weight.shape)} with groups={groups} is not a 1d/2d/3d conv weight")
    check_conv_tensors(dict(weight=weight, bias=bias, pointwise=pointwise, depthwise=depthwise,
                            bias_delta=bias_delta), weight, groups, order)
    if bias_delta is not None and bias is None:
        raise backend_error("bias_delta needs a base bias to merge into, but bias is None")


def _launch(spec: MergeSpec) -> None:
    """One layer by `_merge_kernel`, in place (the kernel's output is the weight itself)."""
    weight, bias, pointwise, depthwise, bias_delta, groups, order = spec
    c_out = weight.shape[0]
    kd, kh, kw = pad3(weight.shape[2:], 1)
    kps, kds = adapter_terms(pointwise, depthwise)
    block_o, block_r, num_warps = merge_config()
    has_bias = bias is not None and bias_delta is not None
    with torch.cuda.device_of(weight):
        grid = (triton.cdiv(c_out, block_o), triton.cdiv(weight[0].numel(), block_r))
        launch(
            _merge_kernel, grid,
            weight, weight, pointwise, depthwise, bias if has_bias else weight, bias_delta if has_bias else weight,
            c_out, weight.shape[1], c_out // groups, kd, kh, kw,
            *_pad_strides(weight, 2), *_pad_strides(weight, 2), *kps.stride(), *_pad_strides(kds, 2),
            bias.stride(0) if has_bias else 0, bias_delta.stride(0) if has_bias else 0,
            RANK=kps.shape[0], PW_FIRST=order == "pointwise_first", HAS_BIAS=has_bias, BLOCK_O=block_o, BLOCK_R=block_r,
            num_warps=num_warps,
        )


def _table_row(spec: MergeSpec) -> List[int]:
    """The layer's `_merge_many_kernel` row: the columns of `_FIELDS`, in that order."""
    w, fold = spec.weight, spec.bias_delta is not None
    c_out = w.shape[0]
    kps, kds = adapter_terms(spec.pointwise, spec.depthwise)
    return [w.data_ptr(), spec.pointwise.data_ptr(), spec.depthwise.data_ptr(),
            (spec.bias if fold else w).data_ptr(), (spec.bias_delta if fold else w).data_ptr(),
            c_out, w.shape[1], c_out // spec.groups, *pad3(w.shape[2:], 1),
            *_pad_strides(w, 2), *kps.stride()[1:], *_pad_strides(kds, 2)[1:],
            spec.bias.stride(0) if fold else 0, spec.bias_delta.stride(0) if fold else 0,
            int(spec.order == "pointwise_first"), int(fold), kps.shape[0], kps.stride(0), kds.stride(0)]


def _launch_key(spec: MergeSpec) -> tuple:
    """What layers of one `_merge_many_kernel` launch share: device, and the dtypes of weight, Kp, Kd, b, Δb (a
    layer without Δb takes its weight's for the last two, so that it joins the layers with Δb of a model)."""
    w, b, db = spec.weight, spec.bias, spec.bias_delta
    bias_dtypes = (b.dtype, db.dtype) if db is not None else (w.dtype, w.dtype)
    return (w.device, w.dtype, spec.pointwise.dtype, spec.depthwise.dtype, *bias_dtypes)


def _launch_many(specs: Sequence[MergeSpec]) -> None:
    """One `_merge_many_kernel` launch over these layers: two or more of one `_launch_key`, none writing memory
    another writes."""
    block_o, block_r, num_warps = merge_config()
    blocks = [triton.cdiv(s.weight.shape[0], block_o) * triton.cdiv(s.weight[0].numel(), block_r) for s in specs]
    starts = [0] + list(itertools.accumulate(blocks))[:-1]
    device, *dtypes = _launch_key(specs[0])
    # One small host-to-device copy, from pinned memory so that the host need not wait for the stream.
    table = torch.tensor(starts + [v for s in specs for v in _table_row(s)], dtype=torch.int64,
                         pin_memory=device.type == "cuda").to(device, non_blocking=True)
    n = len(specs)
    w_dtype, kp_dtype, kd_dtype, b_dtype, db_dtype = (_TL_DTYPES[d] for d in dtypes)
    with torch.cuda.device_of(specs[0].weight):
        launch(
            _merge_many_kernel, (sum(blocks),),
            table, table[n:], n, (n - 1).bit_length(),
            W_DTYPE=w_dtype, KP_DTYPE=kp_dtype, KD_DTYPE=kd_dtype, B_DTYPE=b_dtype, DB_DTYPE=db_dtype,
            N_FIELDS=len(_FIELDS), BLOCK_O=block_o, BLOCK_R=block_r, num_warps=num_warps,
        )


def _written(spec: MergeSpec) -> List[torch.Tensor]:
    return [spec.weight] + ([spec.bias] if spec.bias_delta is not None else [])


def _span(t: torch.Tensor) -> Tuple[int, int]:
    """The bytes [start, end) that t's elements lie in."""
    return t.data_ptr(), t.data_ptr() + extent(t) * t.element_size()


def _launch_groups(specs: Sequence[MergeSpec]) -> List[List[MergeSpec]]:
    """The layers split into launches by `_launch_key`; a layer that writes memory another layer of its launch
    writes (tied weights) goes to a later launch, because each element must be read and written by one program."""
    launches: List[Tuple[tuple, List[Tuple[int, int]], List[MergeSpec]]] = []
    for spec in specs:
        key, spans = _launch_key(spec), [_span(t) for t in _written(spec)]
        group = next((g for g in launches if g[0] == key and not any(
            start < other_end and other_start < end for start, end in spans for other_start, other_end in g[1])),
            None)
        if group is None:
            group = (key, [], [])
            launches.append(group)
        group[1].extend(spans)
        group[2].append(spec)
    return [members for _, _, members in launches]


def merge_many_(specs: Sequence[MergeSpec]) -> None:
    """In place, for every layer: weight += ΔK and, when bias_delta is given, bias += bias_delta.

    One launch per `_launch_key` (device and dtypes: one for a model), whose grid is every block of its layers
    (`_merge_many_kernel`); a launch of a single layer runs `_merge_kernel`, which needs no table. Every layer
    is checked before anything is launched: an invalid one raises and changes nothing.
    """
    for i, spec in enumerate(specs):
        try:
            _check_merge(spec)
        except (TritonBackendError, TritonBackendTypeError) as err:
            if len(specs) == 1:
                raise
            raise type(err)(f"layer {i} of {len(specs)}: {err}") from None
    for group in _launch_groups([s for s in specs if s.weight.numel()]):
        if len(group) == 1:
            _launch(group[0])
        else:
            _launch_many(group)
    # The kernels write through raw pointers: tell autograd the tensors changed, as in-place ops would.
    for spec in specs:
        for t in _written(spec):
            torch.autograd.graph.increment_version(t)


def merge_(weight: torch.Tensor, bias: Optional[torch.Tensor], pointwise: torch.Tensor, depthwise: torch.Tensor,
           bias_delta: Optional[torch.Tensor], groups: int, order: str) -> None:
    """In place, one launch: weight += ΔK and, when bias_delta is given, bias += bias_delta."""
    merge_many_([MergeSpec(weight, bias, pointwise, depthwise, bias_delta, groups, order)])
