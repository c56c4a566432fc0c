"""Input gradient of the fused CoLoRA convolution: a transposed implicit-GEMM convolution by `K0 + ΔK`, the merged
tile built in registers from K0, Kp and Kd, split into stride phases so that no stride hole is multiplied.

Every tensor is seen as 5-d `[N, C, D, H, W]` with arbitrary strides (Conv1d/2d arrive as views with unit
depth/height); dY and K0 are read and dX is written channels-innermost (NCHW ones are staged by one copy each,
`channels_innermost`, `channels_innermost_output`); dX takes x's layout. Offsets that scale with the batch are
int64 (one sample is assumed below 2³¹ elements). fp16/bf16 operands feed `tl.dot` with fp32 accumulation. With
`COLORA_NAN_FILL=1` the output starts as NaN, so a tile the kernel fails to write shows up (the tests set it).
"""
import contextlib
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .._conv import adapter_terms, conv_output_shape
from ._autotune import autotune
from ._common import (FIXED_CONFIG, channels_innermost, channels_innermost_output, check_backward_conv,
                      check_backward_tensors, decode_position, fail, finish_output_, fit_configs, k_split, launch, lift,
                      new_tensor, checked_sets, prune_by_registers, prune_by_shared_memory, split_partials, strides,
                      sum_partials_, Segments, WGMMA_ROWS)


def _bwd_input_configs():
    if FIXED_CONFIG:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4})]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 8, 4),
            (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (32, 64, 32, 4, 3),
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: channel tiles shrunk to the group's channels (down to tl.dot's 16, or wgmma's
    64 rows on the M side), duplicates dropped, then the configs whose pipeline (dY, K0 and Kp tiles per stage)
    overflows the device's shared memory, then (NCHW) those past a register budget. A shared-memory overflow fails
    the launch, a spill only slows it, so that limit is applied first."""
    named_args = {**named_args, **kwargs}  # the channel counts arrive as constexpr keyword arguments

    def fit(kw):
        # BLOCK_N is the M side of the transposed dot: not below WGMMA_ROWS once a group has 16 channels.
        n2 = triton.next_power_of_2(named_args["C_IN_G"])
        kw["BLOCK_N"] = min(kw["BLOCK_N"], 16 if n2 < 16 else max(WGMMA_ROWS, n2))
        kw["BLOCK_K"] = min(kw["BLOCK_K"], max(16, triton.next_power_of_2(named_args["C_OUT_G"])))
        return kw

    dy = named_args["dy_ptr"]

    def stage_bytes(cfg):
        kw = cfg.kwargs
        tiles = kw["BLOCK_M"] * kw["BLOCK_K"] + (1 + named_args.get("RANK", 1)) * kw["BLOCK_K"] * kw["BLOCK_N"]
        return tiles * dy.element_size()

    configs = prune_by_shared_memory(fit_configs(configs, fit), stage_bytes, dy.device)
    if named_args["s_dy_c"] != 1:
        # NCHW dY is gathered across channels: its [BM, BK] tile and the [BK, BN] merged tile then spill beyond
        # 32 elements a thread.
        configs = prune_by_registers(
            configs, lambda c: c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + c.kwargs["BLOCK_K"]), 32)
    return configs


@triton.jit
def _first_tap(r, P, DIL, S, K: tl.constexpr):
    """The smallest tap t < K whose offset r + P − t·DIL is a multiple of S (K when there is none)."""
    first = r * 0 + K
    for t in range(K):
        # the S·K·DIL shift keeps the numerator non-negative, so % needs no sign convention
        hit = (r + P - t * DIL + S * K * DIL) % S == 0
        first = tl.where(hit & (first == K), t, first)
    return first


@autotune(configs=_bwd_input_configs(),
                 key=["M_MAX", "s_dy_c", "s_w_o", "C_IN_G", "C_OUT_G", "RANK", "SPLIT_K", "KD", "KH", "KW", "SD",
                      "SH", "SW", "DD", "DH", "DW", "DEPTHWISE_FIRST", "SEGMENTED"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _conv_bwd_input_kernel(
        dy_ptr, w_ptr, kp_ptr, kd_ptr, dx_ptr, part_ptr, sample_ptr, seg_ptr,
        N, D, H, W, OD, OH, OW, M_MAX, S_PART,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_dx_n, s_dx_c, s_dx_d, s_dx_h, s_dx_w,
        s_w_o, s_w_c, s_w_d, s_w_h, s_w_w,
        s_kp_r, s_kp_o, s_kp_c, s_kd_r, s_kd_c, s_kd_d, s_kd_h, s_kd_w, s_kp_s, s_kd_s,
        C_IN_G: tl.constexpr, C_OUT_G: tl.constexpr, RANK: tl.constexpr, KD: tl.constexpr, KH: tl.constexpr,
        KW: tl.constexpr,
        SD: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PD: tl.constexpr, PH: tl.constexpr,
        PW: tl.constexpr, DD: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr, STEP_D: tl.constexpr,
        STEP_H: tl.constexpr, STEP_W: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr = 1, SEGMENTED: tl.constexpr = False):
    """dX = conv_transpose(dY, K0 + ΔK), the merged kernel built tile by tile, never stored.

        dX[n, g·C_IN_G + c, d, h, w] = Σ_{o < C_OUT_G, t} dY[n, g·C_OUT_G + o, od, oh, ow] · K[g·C_OUT_G + o, c, t]
        with d = od·SD − PD + td·DD (likewise h, w) and
        K[o, c, t] = K0[o, c, t] + Σ_i Kp[i, o, c]·Kd[i, o, t]               (pointwise_first)
                   = K0[o, c, t] + Σ_i Kp[i, o, c]·Kd[i, g·C_IN_G + c, t]    (depthwise_first), i < RANK

    Implicit GEMM per group g and stride phase (d mod SD, h mod SH, w mod SW): M = the phase's input positions
    [N, ⌈(D−rd)/SD⌉, ...], N = C_IN_G, K = (the phase's taps) × C_OUT_G. Within a phase the taps that land on an
    output position form the progression first + i·STEP (STEP = S / gcd(S, DIL)), so the K loop visits only them.
    The tile is computed transposed, dXᵀ = Kᵀ·dYᵀ, so that the merged tile (one fused multiply-add in dY's dtype)
    is the dot's register operand, as in the forward. Geometry and channel counts are compile-time constants;
    with stride 1 every phase is the whole input and the taps decompose by constants.
    SPLIT_K > 1 (stride 1 only, grids under one wave): program (tile, 0, g·SPLIT_K + s) reduces the s-th of
    SPLIT_K contiguous shares of the K loop into part [SPLIT_K, C_in, M_MAX] (fp32, contiguous), which the
    launcher sums in a fixed order.
    Grid: (M tiles × N tiles of the largest phase, SD·SH·SW, groups · SPLIT_K). dY: [N, C_out, OD, OH, OW],
    dX: [N, C_in, D, H, W], K0: [C_out, C_IN_G, KD, KH, KW], Kp: [RANK, C_out, C_IN_G],
    Kd: [RANK, C_out or C_in, KD, KH, KW], any strides.
    SEGMENTED (a mixed batch, `kernels.segmented`): grid axis 2 is g · S_PART + s over the adapter sets s (S_PART
    carries the number of sets; no split-K); set s's samples are sample[seg[s]:seg[s + 1]], its phase positions
    are tiled on their own (M_MAX: the largest set's), its merged tile is built from its own Kp, Kd (set strides
    s_kp_s, s_kd_s), and each position reads dY and writes dX at its own sample.
    """
    N_KC: tl.constexpr = (C_OUT_G + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = C_OUT_G % BLOCK_K == 0
    EVEN_N: tl.constexpr = C_IN_G % BLOCK_N == 0
    i_mn, i_ph = tl.program_id(0), tl.program_id(1)
    i_g, i_s = tl.program_id(2) // SPLIT_K, tl.program_id(2) % SPLIT_K
    if SEGMENTED:
        tl.static_assert(SPLIT_K == 1)
        i_set = tl.program_id(2) % S_PART
        i_g = tl.program_id(2) // S_PART
        seg_first = tl.load(seg_ptr + i_set)
        N = tl.load(seg_ptr + i_set + 1) - seg_first  # this set's samples
        kp_ptr += i_set * s_kp_s
        kd_ptr += i_set * s_kd_s
    rw = i_ph % SW
    rh = (i_ph // SW) % SH
    rd = i_ph // (SW * SH)
    PHD = (D - rd + SD - 1) // SD
    PHH = (H - rh + SH - 1) // SH
    PHW = (W - rw + SW - 1) // SW
    m_phase = N * PHD * PHH * PHW

    num_m = tl.cdiv(M_MAX, BLOCK_M)
    num_n: tl.constexpr = (C_IN_G + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (i_mn // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    i_m = first_m + (i_mn % width) % size_m
    i_n = (i_mn % width) // size_m
    if i_m * BLOCK_M >= m_phase:
        return

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < m_phase
    i_b, jd, jh, jw = decode_position(tl.where(m_m, o_m, 0), PHD, PHH, PHW)
    if SEGMENTED:  # the set's n-th sample is sample[seg_first + n]
        i_b = tl.load(sample_ptr + seg_first + i_b, mask=m_m, other=0)
    p_row = i_b.to(tl.int64) * s_dy_n + jd.to(tl.int64) * s_dy_d + jh.to(tl.int64) * s_dy_h + jw * s_dy_w  # [BM]
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = (o_n < C_IN_G) | EVEN_N
    o_cin = i_g * C_IN_G + o_n

    td0 = _first_tap(rd, PD, DD, SD, KD)
    th0 = _first_tap(rh, PH, DH, SH, KH)
    tw0 = _first_tap(rw, PW, DW, SW, KW)
    n_td = (KD - td0 + STEP_D - 1) // STEP_D
    n_th = (KH - th0 + STEP_H - 1) // STEP_H
    n_tw = (KW - tw0 + STEP_W - 1) // STEP_W

    p_kd_k = kd_ptr + (i_g * C_OUT_G + tl.arange(0, BLOCK_K)) * s_kd_c  # [BK] Kd rows of the first block
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if SPLIT_K == 1:
        it_lo = 0
        n_it = n_td * n_th * n_tw * N_KC
    else:  # a fixed trip count per share keeps wgmma asynchronous; the last share's overrun loads nothing
        n_it = (KD * KH * KW * N_KC + SPLIT_K - 1) // SPLIT_K
        it_lo = i_s * n_it
    td, th, tw = td0, th0, tw0  # the phase's tap, a cursor advanced after each tap's last channel block
    for kk in range(0, n_it):
        it = it_lo + kk
        i_kc = it % N_KC
        if SD * SH * SW == 1:  # one phase, every tap: the decomposition by constants
            tap = it // N_KC
            td = tap // (KH * KW)
            th = (tap // KW) % KH
            tw = tap % KW
        # the output position is the phase position shifted by one scalar per tap: o = j + q
        q_d = (rd + PD - td * DD + SD * KD * DD) // SD - KD * DD
        q_h = (rh + PH - th * DH + SH * KH * DH) // SH - KH * DH
        q_w = (rw + PW - tw * DW + SW * KW * DW) // SW - KW * DW
        od = jd + q_d
        oh = jh + q_h
        ow = jw + q_w
        m_row = m_m & (od >= 0) & (od < OD) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        p_dy = p_row + (q_d * s_dy_d + q_h * s_dy_h + q_w * s_dy_w)  # [BM]

        o_k = i_kc * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = (o_k < C_OUT_G) | EVEN_K
        if SPLIT_K > 1:
            m_k = m_k & (it < KD * KH * KW * N_KC)
        o_cout = i_g * C_OUT_G + o_k
        b_dy = tl.load(dy_ptr + p_dy[None, :] + (o_cout * s_dy_c)[:, None],
                       mask=m_row[None, :] & m_k[:, None], other=0.)  # [BK, BM]
        m_w = m_n[:, None] & m_k[None, :]
        p_tap = td * s_w_d + th * s_w_h + tw * s_w_w
        b_k = tl.load(w_ptr + o_cout[None, :] * s_w_o + o_n[:, None] * s_w_c + p_tap, mask=m_w, other=0.)
        p_kd = td * s_kd_d + th * s_kd_h + tw * s_kd_w
        for i in tl.static_range(RANK):
            b_kp = tl.load(kp_ptr + o_cout[None, :] * s_kp_o + o_n[:, None] * s_kp_c + i * s_kp_r, mask=m_w,
                           other=0.)
            if DEPTHWISE_FIRST:
                b_kd = tl.load(kd_ptr + o_cin * s_kd_c + (i * s_kd_r + p_kd), mask=m_n, other=0.)  # [BN]
                b_k = tl.fma(b_kp, b_kd[:, None], b_k)  # [BN, BK]
            else:
                b_kd = tl.load(p_kd_k + (i * s_kd_r + i_kc * BLOCK_K * s_kd_c + p_kd), mask=m_k, other=0.)  # [BK]
                b_k = tl.fma(b_kp, b_kd[None, :], b_k)  # [BN, BK]
        acc = tl.dot(b_k.to(b_dy.dtype), b_dy, acc)  # [BN, BM]
        if SD * SH * SW != 1:
            # A cursor, not a decomposition of the tap index by the phase's runtime tap counts: those divisions
            # make triton 3.6's TritonGPUCoalesceAsyncCopy pass fail at num_stages >= 2.
            tw = tl.where(i_kc == N_KC - 1, tw + STEP_W, tw)
            wrap_w = tw >= KW
            tw = tl.where(wrap_w, tw0, tw)
            th = tl.where(wrap_w, th + STEP_H, th)
            wrap_h = th >= KH
            th = tl.where(wrap_h, th0, th)
            td = tl.where(wrap_h, td + STEP_D, td)

    d = rd + jd * SD
    h = rh + jh * SH
    w = rw + jw * SW
    if SPLIT_K == 1:
        p_dx = (i_b.to(tl.int64) * s_dx_n + d.to(tl.int64) * s_dx_d + h.to(tl.int64) * s_dx_h
                + w.to(tl.int64) * s_dx_w)
        tl.store(dx_ptr + p_dx[None, :] + (o_cin * s_dx_c)[:, None], acc.to(dx_ptr.dtype.element_ty),
                 mask=m_n[:, None] & m_m[None, :])  # [BN, BM]
    else:
        p_part = part_ptr + i_s.to(tl.int64) * S_PART + (o_cin.to(tl.int64) * M_MAX)[:, None]
        tl.store(p_part + o_m[None, :], acc, mask=m_n[:, None] & m_m[None, :])  # [BN, BM] fp32


def colora_conv_backward_input(grad_out: torch.Tensor, weight: torch.Tensor, pointwise: torch.Tensor,
                               depthwise: torch.Tensor, x_shape: Sequence[int], x_channels_last: bool,
                               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                               order: str, split_k: Optional[int] = None,
                               segments: Optional[Segments] = None) -> torch.Tensor:
    """dL/dX of `conv(X, K0 + Kp ⊛ Kd, stride, padding, dilation, groups)` given dL/dO = grad_out.

    grad_out: [N, C_out, *out], any strides; stride/padding/dilation: one int per spatial dim (symmetric zero
    padding). Returns `x_shape` in grad_out's dtype, channels innermost when `x_channels_last`, else contiguous.
    `split_k`: K shares for a stride-1 conv (None: `k_split` on a GPU), fp32 partials summed in a fixed order.
    `segments` (a mixed batch, `kernels.segmented`): sample n uses its adapter set's factors, pointwise
    [S, R, C_out, C_in/groups] and depthwise [S, R, C_kd, *k] holding every set's (no split).
    """
    one_pointwise, one_depthwise = (pointwise, depthwise) if segments is None else checked_sets(
        pointwise, depthwise, segments, grad_out.shape[0])
    device = check_backward_tensors(grad_out=grad_out, weight=weight, pointwise=one_pointwise,
                                    depthwise=one_depthwise)
    stride3, pad3, dil3, k3 = check_backward_conv(weight, one_pointwise, one_depthwise, stride, padding, dilation,
                                                  groups, order)
    nd = weight.dim() - 2
    x_shape = tuple(int(s) for s in x_shape)
    c_out, c_in_g = weight.shape[:2]
    if len(x_shape) != nd + 2 or x_shape[1] != c_in_g * groups:
        fail(ValueError, f"x_shape {x_shape} does not fit weight {tuple(weight.shape)} with groups={groups}")
    out_spatial = conv_output_shape(x_shape, weight.shape, stride3[3 - nd:], pad3[3 - nd:], dil3[3 - nd:])[2:]
    if tuple(grad_out.shape) != (x_shape[0], c_out, *out_spatial):
        fail(ValueError, f"grad_out has shape {tuple(grad_out.shape)}, expected {(x_shape[0], c_out, *out_spatial)}")

    grad_x = new_tensor(x_shape, grad_out.dtype, device, channels_last=bool(x_channels_last))
    if grad_x.numel() == 0:
        return grad_x
    if segments is None:
        kps, kds = adapter_terms(pointwise, depthwise)
        set_strides = (0, 0)
    else:  # the set dim leads; the kernel steps over it per set (design §10)
        kps, kds = pointwise[0], depthwise[0]
        set_strides = (pointwise.stride(0), depthwise.stride(0))
    # The main loop reads dY and K0 channels-innermost (NCHW ones are staged); dX keeps x's layout.
    dy = lift(channels_innermost(grad_out), 2)
    w, kd = lift(channels_innermost(weight), 2), lift(kds, 2)
    n, _, d, h, wd = lift(grad_x, 2).shape
    od, oh, ow = dy.shape[2:]
    tiled = n if segments is None else max(1, segments.largest)  # the samples the grid's axis 0 covers
    m_max = tiled * math.prod(triton.cdiv(i, s) for i, s in zip((d, h, wd), stride3))
    steps = tuple(s // math.gcd(s, dl) for s, dl in zip(stride3, dil3))

    one_phase = math.prod(stride3) == 1
    tiles128 = groups * triton.cdiv(m_max, 128) * triton.cdiv(c_in_g, 128)
    split = split_k or (k_split(tiles128, triton.cdiv(c_out // groups, 64) * math.prod(k3), device)
                        if one_phase and segments is None else 1)
    if split > 1 and not one_phase:
        fail(ValueError, f"split_k={split} needs a stride-1 conv (one stride phase), got stride {tuple(stride)}")
    # The kernel writes dX channels-innermost (a split writes fp32 partials that sum_partials_ lays out itself).
    written = channels_innermost_output(grad_x) if split == 1 else grad_x
    dx = lift(written, 2)
    part = split_partials(split, c_in_g * groups, m_max, dx)
    axis2 = groups * (split if segments is None else segments.sets)
    sample, seg = (part, part) if segments is None else (segments.sample, segments.seg)
    flags = {} if segments is None else dict(SEGMENTED=True)

    def grid(meta):
        tiles = triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(c_in_g, meta["BLOCK_N"])
        return tiles, math.prod(stride3), axis2

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            _conv_bwd_input_kernel, grid,
            dy, w, pointwise, kd, dx, part, sample, seg,
            n, d, h, wd, od, oh, ow, m_max, c_in_g * groups * m_max if segments is None else segments.sets,
            *strides(dy), *strides(dx), *strides(w), *strides(kps), *strides(kd), *set_strides,
            C_IN_G=c_in_g, C_OUT_G=c_out // groups, RANK=kps.shape[0], KD=k3[0], KH=k3[1], KW=k3[2],
            **dict(zip(("SD", "SH", "SW", "PD", "PH", "PW", "DD", "DH", "DW", "STEP_D", "STEP_H", "STEP_W"),
                       (*stride3, *pad3, *dil3, *steps))),
            DEPTHWISE_FIRST=order == "depthwise_first", SPLIT_K=split, **flags)
    return finish_output_(sum_partials_(grad_x, part, split), written)
