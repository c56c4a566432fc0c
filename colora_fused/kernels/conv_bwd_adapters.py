"""Adapter gradients of the fused CoLoRA convolution (DESIGN §5), chosen per layer:

- cheap route (≈ 2F/prod(k)): one pass (`_adapter_grads_one_pass_kernel`) that reads each tile of X and dY once,
  builds the depthwise stencil (G = Kd-transpose of dY, or Z1 = Kd ⊛ X) from per-tap shifted tiles, and
  accumulates dKp on tensor cores and dKd against the same taps from the tile's share of the 1×1 product
  (Z1 = Kp ⊛ X, or dZ1 = Kpᵀ ⊛ dY). Depthwise base convs and kernels of many taps take the two-kernel form: a
  grouped 1×1 weight-gradient GEMM for dKp with the stencil in its operand prologue, and a GEMM + stencil kernel
  for dKd. Neither form ever writes G or Z1 to memory;
- gradW route (1×1 and 1×2 kernels, F): a weight-gradient GEMM per tap whose tile is folded into dKp and dKd in
  the epilogue; gradW is never stored.

Tensors are seen as 5-d `[N, C, D, H, W]` with arbitrary strides, as in the input gradient. Reductions over
positions are split into `SPLIT` programs writing fp32 partials that are summed in a fixed order
(bit-reproducible); `deterministic=False` accumulates with fp32 atomics instead. With `COLORA_NAN_FILL=1` every
partial buffer starts as NaN (the tests set it).
"""
import contextlib
import logging
import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._conv import ROUTES, conv_output_shape
from ._autotune import autotune
from ._common import (FIXED_CONFIG, channels_innermost, check_backward_conv, check_backward_tensors, device_limits,
                      extent, fail, flat_offset, launch, lift, locate_position, new_tensor, position_stride,
                      prune_by_registers, prune_by_shared_memory, strides, widen, WGMMA_ROWS)

logger = logging.getLogger(__name__)


@triton.jit
def _tuple_add(tup, i: tl.constexpr, value):
    """`tup` with `value` added to item i: one loop-carried accumulator per tap (tuples are immutable)."""
    return tup[:i] + (tup[i] + value,) + tup[i + 1:]


@triton.jit
def _store_partial(ptr, value, mask, USE_ATOMIC: tl.constexpr):
    if USE_ATOMIC:
        tl.atomic_add(ptr, value, mask=mask)
    else:
        tl.store(ptr, value, mask=mask)


def _channel_gemm_configs():
    """BLOCK_K (positions per step), warps and stages; the launcher sets the channel tiles (BLOCK_M, BLOCK_N)."""
    if FIXED_CONFIG:
        return [triton.Config({"BLOCK_K": 64})]
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk, w, s in [(64, 8, 3), (32, 8, 4), (64, 4, 3), (32, 4, 4), (16, 4, 4), (16, 8, 3), (16, 4, 2)]]


def _prune_pointwise_grad(configs, named_args, **kwargs):
    """Configs whose pipeline fits the device's shared memory (per stage the plain operand's [BK, BN] or [BM, BK]
    tile and, for the stencil operand, one tile per tap); of those, with NCHW operands (gathered across
    channels), the ones whose accumulator and tiles stay within 128 elements a thread."""
    taps = kwargs["KD"] * kwargs["KH"] * kwargs["KW"]
    bm, bn, x = kwargs["BLOCK_M"], kwargs["BLOCK_N"], named_args["x_ptr"]

    def stage_bytes(cfg):
        bk = cfg.kwargs["BLOCK_K"]
        plain, stencil = (bm * bk, bk * bn) if kwargs["DEPTHWISE_FIRST"] else (bk * bn, bm * bk)
        return (plain + taps * stencil) * x.element_size()

    configs = prune_by_shared_memory(configs, stage_bytes, x.device)
    if named_args["s_x_c"] != 1:
        configs = prune_by_registers(configs, lambda c: bm * bn + c.kwargs["BLOCK_K"] * (bm + bn), 128)
    return configs


def _prune_gradw(configs, named_args, **kwargs):
    """Configs whose pipeline fits shared memory and, of those, whose two fp32 [BM, BN] accumulators stay in
    registers.

    A thread may hold 128 accumulator elements with one tap and channels_last operands, 64 with several taps
    (the per-tap fold into dKd needs registers beside them) or NCHW: the largest that compile spill-free for
    sm_90 (see `colora_fused.audit`).
    """
    bm, bn, x = kwargs["BLOCK_M"], kwargs["BLOCK_N"], named_args["x_ptr"]
    one_tap = kwargs["KD"] * kwargs["KH"] * kwargs["KW"] == 1
    per_thread = 128 if one_tap and named_args["s_x_c"] == 1 else 64
    configs = prune_by_shared_memory(configs, lambda c: (bm + bn) * c.kwargs["BLOCK_K"] * x.element_size(), x.device)
    if not one_tap:
        # Several taps: a 64-deep pipeline of 3 stages spills even on 16×16 tiles.
        configs = [c for c in configs if c.kwargs["BLOCK_K"] * c.num_stages <= 128] or configs
    return prune_by_registers(configs, lambda c: 2 * bm * bn, per_thread)


@autotune(configs=_channel_gemm_configs(),
                 key=["C_IN_G", "C_OUT_G", "P", "KD", "KH", "KW", "DEPTHWISE_FIRST", "s_x_c"],
                 reset_to_zero=["dkp_ptr", "db_ptr"], prune_configs_by={"early_config_prune": _prune_pointwise_grad})
@triton.jit
def _pointwise_grad_kernel(
        x_ptr, dy_ptr, kd_ptr, dkp_ptr, db_ptr,
        N, D, H, W, OD, OH, OW, C_IN_G, C_OUT_G, P, SPLIT, s_dkp_s, s_db_s,
        SD, SH, SW, PD, PH, PW, DD, DH, DW,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kd_c, s_kd_d, s_kd_h, s_kd_w,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dKp[o, c] = Σ_{n, pos} A[n, o, pos] · B[n, c, pos] per group; one operand is a depthwise stencil in registers.

    pointwise_first, pos = input positions [N, D, H, W]:
        A = G = depthwise_conv_transpose(dY, Kd): G[n, o, d] = Σ_t dY[n, o, (d + PD − td·DD)/SD]·Kd[o, t]
            (likewise h, w; terms whose quotient is fractional or out of range drop out), B = X.
    depthwise_first, pos = output positions [N, OD, OH, OW]:
        A = dY, B = Z1 = depthwise_conv(X, Kd): Z1[n, c, od] = Σ_t X[n, c, od·SD − PD + td·DD]·Kd[c, t];
        with HAS_BIAS also dΔb[o] = Σ dY[n, o, pos] from the same A tiles.
    M = C_OUT_G, N = C_IN_G, K = P positions split over SPLIT programs. Grid: (M tiles × N tiles, groups, SPLIT).
    Writes fp32 partials dkp[s, g·C_OUT_G + o, c] and db[s, o] ([SPLIT, C_out, C_IN_G], [SPLIT, C_out]); with
    USE_ATOMIC the split strides are 0 and the partials are added atomically.
    """
    i_mn, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_n = tl.cdiv(C_IN_G, BLOCK_N)
    i_m, i_n = i_mn // num_n, i_mn % num_n
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < C_OUT_G
    o_cout = i_g * C_OUT_G + o_m
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < C_IN_G
    o_cin = i_g * C_IN_G + o_n

    chunk = tl.cdiv(tl.cdiv(P, SPLIT), BLOCK_K) * BLOCK_K
    start = i_s * chunk
    end = tl.minimum(start + chunk, P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < end
        if DEPTHWISE_FIRST:
            i_b, od, oh, ow, p_dy = locate_position(o_k, m_k, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
            b_a = tl.load(dy_ptr + (o_cout * s_dy_c)[:, None] + p_dy[None, :],
                          mask=m_m[:, None] & m_k[None, :], other=0.)  # [BM, BK]
            if HAS_BIAS:
                acc_b += tl.sum(b_a.to(tl.float32), axis=1)
            b_b = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for td in range(KD):
                d = od * SD - PD + td * DD
                for th in tl.static_range(KH):
                    h = oh * SH - PH + th * DH
                    for tw in tl.static_range(KW):
                        w = ow * SW - PW + tw * DW
                        m_tap = m_k & (d >= 0) & (d < D) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                        p_x = i_b.to(tl.int64) * s_x_n + d.to(tl.int64) * s_x_d + h.to(tl.int64) * s_x_h + w * s_x_w
                        b_x = tl.load(x_ptr + p_x[:, None] + (o_cin * s_x_c)[None, :],
                                      mask=m_tap[:, None] & m_n[None, :], other=0.)  # [BK, BN]
                        b_kd = tl.load(kd_ptr + o_cin * s_kd_c + td * s_kd_d + th * s_kd_h + tw * s_kd_w,
                                       mask=m_n, other=0.)  # [BN]
                        b_b += b_x.to(tl.float32) * b_kd.to(tl.float32)[None, :]
            acc = tl.dot(b_a, b_b.to(b_a.dtype), acc)
        else:
            i_b, d, h, w, p_x = locate_position(o_k, m_k, D, H, W, s_x_n, s_x_d, s_x_h, s_x_w)
            b_b = tl.load(x_ptr + p_x[:, None] + (o_cin * s_x_c)[None, :],
                          mask=m_k[:, None] & m_n[None, :], other=0.)  # [BK, BN]
            b_a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for td in range(KD):
                ed = d + PD - td * DD + SD * KD * DD
                od = ed // SD - KD * DD
                for th in tl.static_range(KH):
                    eh = h + PH - th * DH + SH * KH * DH
                    oh = eh // SH - KH * DH
                    for tw in tl.static_range(KW):
                        ew = w + PW - tw * DW + SW * KW * DW
                        ow = ew // SW - KW * DW
                        m_tap = (m_k & (ed % SD == 0) & (eh % SH == 0) & (ew % SW == 0)
                                 & (od >= 0) & (od < OD) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW))
                        p_dy = (i_b.to(tl.int64) * s_dy_n + od.to(tl.int64) * s_dy_d + oh.to(tl.int64) * s_dy_h
                                + ow * s_dy_w)
                        b_dy = tl.load(dy_ptr + (o_cout * s_dy_c)[:, None] + p_dy[None, :],
                                       mask=m_m[:, None] & m_tap[None, :], other=0.)  # [BM, BK]
                        b_kd = tl.load(kd_ptr + o_cout * s_kd_c + td * s_kd_d + th * s_kd_h + tw * s_kd_w,
                                       mask=m_m, other=0.)  # [BM]
                        b_a += b_dy.to(tl.float32) * b_kd.to(tl.float32)[:, None]
            acc = tl.dot(b_a.to(b_b.dtype), b_b, acc)

    _store_partial(dkp_ptr + i_s * s_dkp_s + o_cout[:, None] * C_IN_G + o_n[None, :], acc,
                   m_m[:, None] & m_n[None, :], USE_ATOMIC)
    if HAS_BIAS:
        _store_partial(db_ptr + i_s * s_db_s + o_cout, acc_b, m_m & (i_n == 0), USE_ATOMIC)


def _depthwise_grad_configs():
    """BLOCK_M (positions per row tile), BLOCK_K (the 1×1 GEMM's channel step), warps, stages; the launcher sets
    BLOCK_N (channels)."""
    if FIXED_CONFIG:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_K": 16})]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)]]


def _prune_depthwise_grad(configs, named_args, **kwargs):
    """Configs whose pipeline (the 1×1 GEMM's [BM, BK] and [BK, BN] tiles per stage) fits shared memory; with
    NCHW operands (gathered across channels) only those whose two tiles stay within 24 elements a thread."""
    bn, x = kwargs["BLOCK_N"], named_args["x_ptr"]
    configs = prune_by_shared_memory(
        configs, lambda c: (c.kwargs["BLOCK_M"] + bn) * c.kwargs["BLOCK_K"] * x.element_size(), x.device)
    if named_args["s_x_c"] != 1:
        configs = prune_by_registers(configs, lambda c: (c.kwargs["BLOCK_M"] + bn) * c.kwargs["BLOCK_K"], 24)
    return configs


@autotune(configs=_depthwise_grad_configs(),
                 key=["C_IN_G", "C_OUT_G", "P", "KD", "KH", "KW", "DEPTHWISE_FIRST", "s_x_c"],
                 reset_to_zero=["dkd_ptr"], prune_configs_by={"early_config_prune": _prune_depthwise_grad})
@triton.jit
def _depthwise_grad_kernel(
        x_ptr, dy_ptr, kp_ptr, dkd_ptr,
        N, D, H, W, OD, OH, OW, C_IN_G, C_OUT_G, P, SPLIT, s_dkd_s,
        SD, SH, SW, PD, PH, PW, DD, DH, DW,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kp_o, s_kp_c,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, T_PAD: tl.constexpr,
        DEPTHWISE_FIRST: tl.constexpr, USE_ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dKd[ch, t] = Σ_{n, pos} Y[n, ch, pos] · S_t[n, ch, pos]: a grouped 1×1 GEMM per row tile against a gather.

    pointwise_first, pos = input positions, ch = o:
        Y = Z1 = Kp ⊛ X: Z1[n, o, pos] = Σ_c Kp[o, c]·X[n, g·C_IN_G + c, pos]
        S_t[n, o, d] = dY[n, o, (d + PD − td·DD)/SD] (likewise h, w; zero where fractional or out of range)
    depthwise_first, pos = output positions, ch = c:
        Y = dZ1 = Kpᵀ ⊛ dY: dZ1[n, g·C_IN_G + c, pos] = Σ_o Kp[g·C_OUT_G + o, c]·dY[n, g·C_OUT_G + o, pos]
        S_t[n, c, od] = X[n, c, od·SD − PD + td·DD]
    Grid: (channel tiles, groups, SPLIT); a program walks the row tiles of its share of the P positions, keeping
    [BN, T_PAD] sums, t = (td·KH + th)·KW + tw. Writes fp32 partials dkd[s, ch, t] ([SPLIT, C_out or C_in,
    KD·KH·KW]); with USE_ATOMIC the split stride is 0 and the partials are added atomically.
    """
    i_n, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if DEPTHWISE_FIRST:
        CH_G = C_IN_G
        K_G = C_OUT_G
    else:
        CH_G = C_OUT_G
        K_G = C_IN_G
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < CH_G
    o_ch = i_g * CH_G + o_n
    T: tl.constexpr = KD * KH * KW
    o_t = tl.arange(0, T_PAD)

    chunk = tl.cdiv(tl.cdiv(P, SPLIT), BLOCK_M) * BLOCK_M
    start = i_s * chunk
    end = tl.minimum(start + chunk, P)
    acc = tl.zeros((BLOCK_N, T_PAD), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < end
        if DEPTHWISE_FIRST:
            i_b, i1, i2, i3, p_a = locate_position(o_m, m_m, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
        else:
            i_b, i1, i2, i3, p_a = locate_position(o_m, m_m, D, H, W, s_x_n, s_x_d, s_x_h, s_x_w)

        b_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_G, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K_G
            if DEPTHWISE_FIRST:
                b_a = tl.load(dy_ptr + p_a[:, None] + ((i_g * C_OUT_G + o_k) * s_dy_c)[None, :],
                              mask=m_m[:, None] & m_k[None, :], other=0.)  # [BM, BK]
                b_kp = tl.load(kp_ptr + (i_g * C_OUT_G + o_k)[:, None] * s_kp_o + o_n[None, :] * s_kp_c,
                               mask=m_k[:, None] & m_n[None, :], other=0.)  # [BK, BN]
            else:
                b_a = tl.load(x_ptr + p_a[:, None] + ((i_g * C_IN_G + o_k) * s_x_c)[None, :],
                              mask=m_m[:, None] & m_k[None, :], other=0.)  # [BM, BK]
                b_kp = tl.load(kp_ptr + o_ch[None, :] * s_kp_o + o_k[:, None] * s_kp_c,
                               mask=m_k[:, None] & m_n[None, :], other=0.)  # [BK, BN]
            b_y = tl.dot(b_a, b_kp.to(b_a.dtype), b_y)

        for t in range(T):
            td = t // (KH * KW)
            th = (t // KW) % KH
            tw = t % KW
            if DEPTHWISE_FIRST:
                d = i1 * SD - PD + td * DD
                h = i2 * SH - PH + th * DH
                w = i3 * SW - PW + tw * DW
                m_tap = m_m & (d >= 0) & (d < D) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                p_s = i_b.to(tl.int64) * s_x_n + d.to(tl.int64) * s_x_d + h.to(tl.int64) * s_x_h + w * s_x_w
                b_s = tl.load(x_ptr + p_s[:, None] + (o_ch * s_x_c)[None, :],
                              mask=m_tap[:, None] & m_n[None, :], other=0.)  # [BM, BN]
            else:
                ed = i1 + PD - td * DD + SD * KD * DD
                eh = i2 + PH - th * DH + SH * KH * DH
                ew = i3 + PW - tw * DW + SW * KW * DW
                od = ed // SD - KD * DD
                oh = eh // SH - KH * DH
                ow = ew // SW - KW * DW
                m_tap = (m_m & (ed % SD == 0) & (eh % SH == 0) & (ew % SW == 0)
                         & (od >= 0) & (od < OD) & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW))
                p_s = i_b.to(tl.int64) * s_dy_n + od.to(tl.int64) * s_dy_d + oh.to(tl.int64) * s_dy_h + ow * s_dy_w
                b_s = tl.load(dy_ptr + p_s[:, None] + (o_ch * s_dy_c)[None, :],
                              mask=m_tap[:, None] & m_n[None, :], other=0.)  # [BM, BN]
            b_r = tl.sum(b_y * b_s.to(tl.float32), axis=0)  # [BN]
            acc += tl.where(o_t[None, :] == t, b_r[:, None], 0.)

    _store_partial(dkd_ptr + i_s * s_dkd_s + o_ch[:, None] * T + o_t[None, :], acc,
                   m_n[:, None] & (o_t < T)[None, :], USE_ATOMIC)


def _one_pass_configs():
    """BLOCK_K (positions per step), warps and stages; the launcher sets the channel tiles (BLOCK_S, BLOCK_P)."""
    if FIXED_CONFIG:
        return [triton.Config({"BLOCK_K": 16})]
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk, w, s in [(64, 8, 3), (64, 8, 2), (32, 8, 3), (32, 8, 2), (64, 4, 3), (32, 4, 3), (128, 8, 2),
                             (16, 8, 3), (16, 8, 2)]]


def _prune_one_pass(configs, named_args, **kwargs):
    """Configs whose pipeline fits shared memory (per stage the plain [BK, BP] tile and one [BK, BS] stencil tile
    per tap, which the pipeliner stages; plus the Kp tile held throughout) and whose fp32 tiles (the [BP, BS]
    accumulator, one [BK, BS] dKd accumulator per tap, the 1×1 product and G) stay within a register budget a
    thread: 160 elements where a tap's source is a fixed offset from the block's position (stride 1, or
    depthwise_first), 112 for pointwise_first with a stride (the transposed taps' index arithmetic), 80 with
    operands not channels-innermost; before sm_90 at most 100 (mma.sync layouts). The largest the audit finds
    spill-free."""
    bs, bp, x = kwargs["BLOCK_S"], kwargs["BLOCK_P"], named_args["x_ptr"]
    taps = kwargs["KD"] * kwargs["KH"] * kwargs["KW"]
    size = x.element_size()

    def stage_bytes(cfg):
        bk = cfg.kwargs["BLOCK_K"]
        return (bk * bp + taps * bk * bs) * size + bp * bs * size // cfg.num_stages

    configs = prune_by_shared_memory(configs, stage_bytes, x.device)
    strided = not kwargs["DEPTHWISE_FIRST"] and (kwargs["SD"], kwargs["SH"], kwargs["SW"]) != (1, 1, 1)
    per_thread = (112 if strided else 160) if named_args["s_x_c"] == 1 else 80
    if device_limits(x.device).capability < 90:
        per_thread = min(per_thread, 100)
    return prune_by_registers(configs, lambda c: bs * bp + (taps + 2) * c.kwargs["BLOCK_K"] * bs, per_thread)


@autotune(configs=_one_pass_configs(),
                 key=["C_IN_G", "C_OUT_G", "P", "s_x_c", "KD", "KH", "KW", "SD", "SH", "SW", "DD", "DH", "DW",
                      "DEPTHWISE_FIRST"],
                 reset_to_zero=["dkp_ptr", "dkd_ptr"], prune_configs_by={"early_config_prune": _prune_one_pass})
@triton.jit
def _adapter_grads_one_pass_kernel(
        x_ptr, dy_ptr, kp_ptr, kd_ptr, dkp_ptr, dkd_ptr,
        C_IN_G, C_OUT_G, P, SPLIT, s_dkp_s, s_dkd_s, s_dkd_tile,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kp_o, s_kp_c, s_kd_c, s_kd_d, s_kd_h, s_kd_w, s_q_pos, s_s_pos,
        FLAT_Q: tl.constexpr, FLAT_S: tl.constexpr, I64: tl.constexpr,
        D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OD: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SD: tl.constexpr, SH: tl.constexpr,
        SW: tl.constexpr, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DD: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        USE_ATOMIC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """dKp and dKd of the cheap route in one pass over X and dY (DESIGN §5), per group.

    A program owns a tile of the stencil channels s (C_out with pointwise_first, C_in with depthwise_first), a
    tile of the plain channels p (the other side) and a share of the positions (input positions with
    pointwise_first, output positions with depthwise_first). Per block of BK positions it loads the plain
    operand Q[pos, p] once (X, or dY) and, for each tap t, the shifted stencil source S_t[pos, s] (dY at the
    transposed position, or X at the forward one; zero where fractional or out of range). Then:

        A[pos, s]  = Σ_t Kd[s, t]·S_t[pos, s]          (G = Kdᵀ-stencil of dY, or Z1 = Kd ⊛ X)
        dKp        += Qᵀ·A  on tensor cores            ([BP, BS]: dKp[o, c]ᵀ, or dKp[o, c])
        Y[pos, s]  = Σ_{p in tile} Q[pos, p]·Kp[·, ·]   (the tile's share of Z1 = Kp ⊛ X, or dZ1 = Kpᵀ ⊛ dY)
        dKd[s, t]  += Σ_pos Y[pos, s]·S_t[pos, s]

    Every [BK, BS] tile (Y, A, each S_t) shares Y's MMA layout, in which a thread holds pairs of adjacent
    channels, so S_t is read from shared memory once per tap and widened two bf16 at a time (`widen`). dKd keeps
    one [BK, BS] fp32 accumulator per tap (a tuple) and reduces over positions once, after the loop: no shuffles
    or barriers per tap. dKd is linear in Y, so each plain-channel tile contributes its share; the launcher sums
    the shares with the position splits in a fixed order. The conv geometry and the spatial sizes are
    compile-time, so the taps unroll and decoding a position is a multiply-shift; where positions are evenly
    spaced (FLAT_Q, FLAT_S: `position_stride`) an address is the flat position times one stride, and a tap's
    source (stride 1, equal input and output sizes) that plus a constant. Grid: (S tiles × P tiles, groups,
    SPLIT). Writes fp32 partials dkp[split, o, c] ([SPLIT, C_out, C_IN_G]) and dkd[split, p tile, s, t]; with
    USE_ATOMIC the split and tile strides are 0 and the partials are added atomically.
    """
    i_sp, i_g, i_split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if DEPTHWISE_FIRST:
        S_G = C_IN_G
        P_G = C_OUT_G
    else:
        S_G = C_OUT_G
        P_G = C_IN_G
    num_p = tl.cdiv(P_G, BLOCK_P)
    i_s, i_p = i_sp // num_p, i_sp % num_p
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    m_s = o_s < S_G
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < P_G
    T: tl.constexpr = KD * KH * KW
    if DEPTHWISE_FIRST:
        ch_s = i_g * C_IN_G + o_s  # channels of X and rows of Kd
        ch_p = i_g * C_OUT_G + o_p  # channels of dY
        p_kp = kp_ptr + ch_p[:, None] * s_kp_o + o_s[None, :] * s_kp_c
        q_ptr = dy_ptr + (ch_p * s_dy_c)[None, :]
        s_ptr = x_ptr + (ch_s * s_x_c)[None, :]
    else:
        ch_s = i_g * C_OUT_G + o_s  # channels of dY and rows of Kd
        ch_p = i_g * C_IN_G + o_p  # channels of X
        p_kp = kp_ptr + ch_s[None, :] * s_kp_o + o_p[:, None] * s_kp_c
        q_ptr = x_ptr + (ch_p * s_x_c)[None, :]
        s_ptr = dy_ptr + (ch_s * s_dy_c)[None, :]
    # Kp for the tile as [BP, BS] (Kp[s, p]ᵀ or Kp[p, s]), held for the whole pass.
    b_kp = tl.load(p_kp, mask=m_p[:, None] & m_s[None, :], other=0.).to(x_ptr.dtype.element_ty)  # [BP, BS]

    chunk = tl.cdiv(tl.cdiv(P, SPLIT), BLOCK_K) * BLOCK_K
    start = i_split * chunk
    end = tl.minimum(start + chunk, P)
    acc = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    # One [BK, BS] accumulator per tap, reduced over positions once after the loop.
    acc_kd = ()
    for _ in tl.static_range(T):
        acc_kd = acc_kd + (tl.zeros((BLOCK_K, BLOCK_S), dtype=tl.float32),)
    for k0 in range(start, end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < end
        if DEPTHWISE_FIRST:
            i_b, i1, i2, i3, p_q = locate_position(o_k, m_k, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
        else:
            i_b, i1, i2, i3, p_q = locate_position(o_k, m_k, D, H, W, s_x_n, s_x_d, s_x_h, s_x_w)
        if FLAT_Q:
            # Evenly spaced positions: the offset is the flat index times one stride (no decode, no int64 sum).
            p_q = flat_offset(o_k, m_k, s_q_pos, I64)
        b_q = tl.load(q_ptr + p_q[:, None], mask=m_k[:, None] & m_p[None, :], other=0.)  # [BK, BP]
        # Positions on the M side (BK of them: at 32, the best sm_90 config, mma.sync; wgmma needs 64, which would
        # double the per-tap accumulators).
        b_y = tl.dot(b_q, b_kp)  # [BK, BS] fp32
        # G starts as a zero computed from Y (min(|Y|, 0): zero for inf and NaN too, and not folded away), so it
        # takes Y's layout and the S_t tiles are read once, in it.
        b_a = tl.minimum(tl.abs(b_y), 0.0)
        # With depthwise_first, or stride 1, a tap's source position is the block's position (scaled by the
        # stride) plus a constant: one address per position per block, a scalar offset per tap.
        DIRECT: tl.constexpr = DEPTHWISE_FIRST or (SD == 1 and SH == 1 and SW == 1)
        if DEPTHWISE_FIRST:
            LD, LH, LW = D, H, W
            s_sd, s_sh, s_sw = s_x_d, s_x_h, s_x_w
            p_base = i_b.to(tl.int64) * s_x_n + (i1 * SD).to(tl.int64) * s_x_d + (i2 * SH).to(tl.int64) * s_x_h \
                + (i3 * SW) * s_x_w
            v1, v2, v3 = i1 * SD, i2 * SH, i3 * SW
        else:
            LD, LH, LW = OD, OH, OW
            s_sd, s_sh, s_sw = s_dy_d, s_dy_h, s_dy_w
            p_base = i_b.to(tl.int64) * s_dy_n + i1.to(tl.int64) * s_dy_d + i2.to(tl.int64) * s_dy_h + i3 * s_dy_w
            v1, v2, v3 = i1, i2, i3
        if FLAT_S:
            # Stride 1, equal input and output sizes, evenly spaced positions: a tap's source is the block's own
            # flat position plus a constant.
            p_q_s = flat_offset(o_k, m_k, s_s_pos, I64)
        for td in tl.static_range(KD):
            for th in tl.static_range(KH):
                for tw in tl.static_range(KW):
                    if DIRECT:
                        if DEPTHWISE_FIRST:
                            c1, c2, c3 = td * DD - PD, th * DH - PH, tw * DW - PW
                        else:
                            c1, c2, c3 = PD - td * DD, PH - th * DH, PW - tw * DW
                        m_tap = (m_k & (v1 >= -c1) & (v1 < LD - c1) & (v2 >= -c2) & (v2 < LH - c2) & (v3 >= -c3)
                                 & (v3 < LW - c3))
                        if FLAT_S:
                            p_t = p_q_s + (c1 * s_sd + c2 * s_sh + c3 * s_sw)
                        else:
                            p_t = p_base + (c1 * s_sd + c2 * s_sh + c3 * s_sw)
                    else:
                        # Offsets kept non-negative so that // and % are floor division.
                        ed = i1 + (PD - td * DD + SD * KD * DD)
                        eh = i2 + (PH - th * DH + SH * KH * DH)
                        ew = i3 + (PW - tw * DW + SW * KW * DW)
                        d = ed // SD - KD * DD
                        h = eh // SH - KH * DH
                        w = ew // SW - KW * DW
                        m_tap = (m_k & (d >= 0) & (d < OD) & (h >= 0) & (h < OH) & (w >= 0) & (w < OW)
                                 & (ed % SD == 0) & (eh % SH == 0) & (ew % SW == 0))
                        p_t = (i_b.to(tl.int64) * s_dy_n + d.to(tl.int64) * s_dy_d + h.to(tl.int64) * s_dy_h
                               + w * s_dy_w)
                    b_src = widen(tl.load(s_ptr + p_t[:, None], mask=m_tap[:, None] & m_s[None, :],
                                          other=0.))  # [BK, BS] fp32
                    b_kd = tl.load(kd_ptr + ch_s * s_kd_c + (td * s_kd_d + th * s_kd_h + tw * s_kd_w), mask=m_s,
                                   other=0.).to(tl.float32)  # [BS]
                    b_a += b_src * b_kd[None, :]
                    acc_kd = _tuple_add(acc_kd, (td * KH + th) * KW + tw, b_y * b_src)
        acc = tl.dot(tl.trans(b_q), b_a.to(b_q.dtype), acc)  # [BP, BS]

    p_dkp = dkp_ptr + i_split * s_dkp_s
    if DEPTHWISE_FIRST:
        p_dkp += ch_p[:, None] * C_IN_G + o_s[None, :]
    else:
        p_dkp += ch_s[None, :] * C_IN_G + o_p[:, None]
    _store_partial(p_dkp, acc, m_p[:, None] & m_s[None, :], USE_ATOMIC)
    for t in tl.static_range(T):
        _store_partial(dkd_ptr + i_split * s_dkd_s + i_p * s_dkd_tile + ch_s * T + t, tl.sum(acc_kd[t], axis=0), m_s,
                       USE_ATOMIC)


def _channel_sum_configs():
    if FIXED_CONFIG:
        return [triton.Config({"BLOCK_M": 64})]
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in [(64, 4), (128, 4), (128, 8)]]


def _prune_channel_sum(configs, named_args, **kwargs):
    """With NCHW dY (gathered across channels) a [BM, BN] tile beyond 8192 elements spills."""
    if named_args["s_dy_c"] == 1:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * kwargs["BLOCK_N"] <= 8192] or configs


@autotune(configs=_channel_sum_configs(), key=["C_OUT", "P", "s_dy_c"], reset_to_zero=["db_ptr"],
                 prune_configs_by={"early_config_prune": _prune_channel_sum})
@triton.jit
def _channel_sum_kernel(
        dy_ptr, db_ptr, OD, OH, OW, C_OUT, P, SPLIT, s_db_s,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        USE_ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dΔb[o] = Σ_{n, pos} dY[n, o, pos] over P output positions, split over SPLIT programs.

    Grid: (channel tiles, SPLIT). Writes fp32 partials db[s, o] ([SPLIT, C_out]); atomically with USE_ATOMIC.
    """
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < C_OUT
    chunk = tl.cdiv(tl.cdiv(P, SPLIT), BLOCK_M) * BLOCK_M
    start = i_s * chunk
    end = tl.minimum(start + chunk, P)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < end
        i_b, od, oh, ow, p_dy = locate_position(o_m, m_m, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
        b_dy = tl.load(dy_ptr + p_dy[:, None] + (o_n * s_dy_c)[None, :], mask=m_m[:, None] & m_n[None, :], other=0.)
        acc += tl.sum(b_dy.to(tl.float32), axis=0)
    _store_partial(db_ptr + i_s * s_db_s + o_n, acc, m_n, USE_ATOMIC)


@autotune(configs=_channel_gemm_configs(),
                 key=["C_IN_G", "C_OUT_G", "P", "KD", "KH", "KW", "DEPTHWISE_FIRST", "s_x_c"],
                 reset_to_zero=["dkp_ptr", "dkd_ptr", "db_ptr"], prune_configs_by={"early_config_prune": _prune_gradw})
@triton.jit
def _gradw_adapter_kernel(
        x_ptr, dy_ptr, kp_ptr, kd_ptr, dkp_ptr, dkd_ptr, db_ptr,
        N, D, H, W, OD, OH, OW, C_IN_G, C_OUT_G, P, SPLIT, s_dkp_s, s_dkd_s, s_dkd_tile, s_db_s,
        SD, SH, SW, PD, PH, PW, DD, DH, DW,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kp_o, s_kp_c, s_kd_c, s_kd_d, s_kd_h, s_kd_w,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        HAS_BIAS: tl.constexpr, USE_ATOMIC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Adapter gradients through the weight gradient, folded in the epilogue (the route for prod(k) ≤ 2).

        gradW[o, c, t] = Σ_{n, pos} dY[n, g·C_OUT_G + o, pos] · X[n, g·C_IN_G + c, pos·S − P + t·DIL]
        dKp[o, c] = Σ_t gradW[o, c, t]·Kd[·, t]                      (Kd[o, t] or Kd[g·C_IN_G + c, t])
        dKd[o, t] = Σ_c gradW[o, c, t]·Kp[o, c]                      (pointwise_first)
        dKd[g·C_IN_G + c, t] = Σ_o gradW[o, c, t]·Kp[o, c]           (depthwise_first)
        dΔb[o] = Σ_{n, pos} dY[n, o, pos]                             (HAS_BIAS)
    One [BM, BN] gradW tile per tap (M = C_OUT_G, N = C_IN_G, K = P output positions split over SPLIT), never
    stored. All three are linear in gradW, so each split folds its own partial: fp32 dkp[s, o, c]
    ([SPLIT, C_out, C_IN_G]), dkd[s, tile, ch, t] where tile is the N tile (pointwise_first, C_out rows) or the
    M tile (depthwise_first, C_in rows), db[s, o]; with USE_ATOMIC the split/tile strides are 0 and the partials
    are added atomically.
    Grid: (M tiles × N tiles, groups, SPLIT).
    """
    i_mn, i_g, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    num_n = tl.cdiv(C_IN_G, BLOCK_N)
    i_m, i_n = i_mn // num_n, i_mn % num_n
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < C_OUT_G
    o_cout = i_g * C_OUT_G + o_m
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < C_IN_G
    o_cin = i_g * C_IN_G + o_n
    m_mn = m_m[:, None] & m_n[None, :]

    chunk = tl.cdiv(tl.cdiv(P, SPLIT), BLOCK_K) * BLOCK_K
    start = i_s * chunk
    end = tl.minimum(start + chunk, P)
    T: tl.constexpr = KD * KH * KW
    acc_kp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for t in range(T):
        td = t // (KH * KW)
        th = (t // KW) % KH
        tw = t % KW
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < end
            i_b, od, oh, ow, p_dy = locate_position(o_k, m_k, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
            b_dy = tl.load(dy_ptr + (o_cout * s_dy_c)[:, None] + p_dy[None, :],
                           mask=m_m[:, None] & m_k[None, :], other=0.)  # [BM, BK]
            if HAS_BIAS:
                acc_b += tl.where(t == 0, tl.sum(b_dy.to(tl.float32), axis=1), 0.)
            d = od * SD - PD + td * DD
            h = oh * SH - PH + th * DH
            w = ow * SW - PW + tw * DW
            m_tap = m_k & (d >= 0) & (d < D) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            p_x = i_b.to(tl.int64) * s_x_n + d.to(tl.int64) * s_x_d + h.to(tl.int64) * s_x_h + w * s_x_w
            b_x = tl.load(x_ptr + p_x[:, None] + (o_cin * s_x_c)[None, :],
                          mask=m_tap[:, None] & m_n[None, :], other=0.)  # [BK, BN]
            acc = tl.dot(b_dy, b_x, acc)
        # Kp is reloaded per tap (a [BM, BN] tile from L2, once per T·P/SPLIT positions) rather than held: three
        # fp32 [BM, BN] tiles live across the loop would spill.
        b_kp = tl.load(kp_ptr + o_cout[:, None] * s_kp_o + o_n[None, :] * s_kp_c, mask=m_mn, other=0.).to(tl.float32)
        p_kd = td * s_kd_d + th * s_kd_h + tw * s_kd_w
        if DEPTHWISE_FIRST:
            b_kd = tl.load(kd_ptr + o_cin * s_kd_c + p_kd, mask=m_n, other=0.).to(tl.float32)  # [BN]
            acc_kp += acc * b_kd[None, :]
            p_dkd = dkd_ptr + i_s * s_dkd_s + i_m * s_dkd_tile + o_cin * T + t
            _store_partial(p_dkd, tl.sum(acc * b_kp, axis=0), m_n, USE_ATOMIC)
        else:
            b_kd = tl.load(kd_ptr + o_cout * s_kd_c + p_kd, mask=m_m, other=0.).to(tl.float32)  # [BM]
            acc_kp += acc * b_kd[:, None]
            p_dkd = dkd_ptr + i_s * s_dkd_s + i_n * s_dkd_tile + o_cout * T + t
            _store_partial(p_dkd, tl.sum(acc * b_kp, axis=1), m_m, USE_ATOMIC)

    _store_partial(dkp_ptr + i_s * s_dkp_s + o_cout[:, None] * C_IN_G + o_n[None, :], acc_kp, m_mn, USE_ATOMIC)
    if HAS_BIAS:
        _store_partial(db_ptr + i_s * s_db_s + o_cout, acc_b, m_m & (i_n == 0), USE_ATOMIC)


def _split(tiles: int, positions: int, device: torch.device, min_rows: int = 512) -> int:
    """Programs per tile along the position reduction: about two waves of the device, each program reducing at
    least `min_rows` positions (32 on CPU)."""
    min_rows = 32 if device.type == "cpu" else min_rows
    return max(1, min(triton.cdiv(2 * device_limits(device).sm_count, tiles), positions // min_rows))


# The one-pass kernel unrolls every tap and keeps one register accumulator per tap: beyond this many taps
# (sm_90; before sm_90, where mma.sync layouts need more registers, ONE_PASS_MAX_TAPS_SM80) it spills in the audit.
ONE_PASS_MAX_TAPS = 25
ONE_PASS_MAX_TAPS_SM80 = 9


def one_pass_unsupported(c_in_g: int, c_out_g: int, taps: int, capability: int = 90) -> Optional[str]:
    """Why the one-pass adapter-gradient kernel does not serve a conv of these group widths and taps on a GPU of
    this compute capability, or None.

    Depthwise base convs (one input or output channel per group) leave both of its GEMMs one channel wide, so
    the two-kernel cheap route, which does not tile that side, serves them.
    """
    if c_in_g == 1 or c_out_g == 1:
        return "one channel per group on a side (a depthwise base conv)"
    most = ONE_PASS_MAX_TAPS if capability >= 90 else ONE_PASS_MAX_TAPS_SM80
    if taps > most:
        return f"{taps} taps (the one-pass kernel keeps one accumulator per tap, at most {most} here)"
    return None


_TWO_PASS_LOGGED = set()


def _log_two_pass(reason: str, x_shape, weight_shape, groups: int) -> None:
    key = (reason, x_shape, weight_shape, groups)
    if key not in _TWO_PASS_LOGGED:
        _TWO_PASS_LOGGED.add(key)
        logger.info("colora_fused: adapter gradients of x %s, weight %s, groups %d by the two-kernel cheap route: %s",
                    list(x_shape), list(weight_shape), groups, reason)


def _one_pass_blocks(s_g: int, p_g: int, taps: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_P) of the one-pass kernel. BP is the dKp accumulator's M side ([BP, BS]), kept at ≥ 64 on a
    GPU for wgmma, up to 256: the per-tap stencil work, which does not grow with BP, is spread over as many plain
    channels as fit (the estimate's tensor-core share grows with BP). BS (the stencil channels) is the N side of
    both products; it shrinks with the taps, because the kernel keeps one [BK, BS] fp32 accumulator per tap in
    registers: 64 up to 9 taps, 32 up to 25, else 16. Before sm_90 (no wgmma: both products on mma.sync, whose
    layouts need more registers) 16, the widest the audit finds spill-free for sm_80."""
    bs_cap = 64 if taps <= 9 else 32 if taps <= 25 else 16
    if device_limits(device).capability < 90:
        bs_cap = 16
    return _channel_block(s_g, bs_cap), _channel_block(p_g, 256, rows=True, device=device)


def _bias_delta(dy: torch.Tensor, c_out: int, p_out: int, use_atomic: bool, device: torch.device) -> torch.Tensor:
    """fp32 partials of dΔb = Σ dY over every position and image, [splits, C_out]."""
    bo = _channel_block(c_out)
    split = _split(triton.cdiv(c_out, bo), p_out, device)
    db = _partials((split,), (c_out,), use_atomic, device)
    launch(_channel_sum_kernel, (triton.cdiv(c_out, bo), split),
           dy, db, *dy.shape[2:], c_out, p_out, split, _lead_stride(db, 0), *strides(dy),
           USE_ATOMIC=use_atomic, BLOCK_N=bo)
    return db


def _partials(lead: Tuple[int, ...], shape: Tuple[int, ...], use_atomic: bool, device: torch.device) -> torch.Tensor:
    """fp32 partial sums [*lead, *shape]; for atomics one zeroed [1, ..., *shape] buffer that every program adds to."""
    if use_atomic:
        return torch.zeros((1,) * len(lead) + shape, dtype=torch.float32, device=device)
    return new_tensor((*lead, *shape), torch.float32, device)


def _lead_stride(buf: torch.Tensor, dim: int) -> int:
    """The kernel's stride along a partial-index dim: 0 where the dim is shared (atomics, or a single split)."""
    return 0 if buf.shape[dim] == 1 else buf.stride(dim)


def _channel_block(channels: int, cap: int = 128, rows: bool = False, device: Optional[torch.device] = None) -> int:
    """A power-of-two channel tile of at least 16 (tl.dot's minimum), at most `cap`. `rows`: the tile is a dot's
    M side, kept at WGMMA_ROWS or more on a GPU for groups of 16 channels or more (wgmma instead of mma.sync)."""
    floor = WGMMA_ROWS if rows and channels >= 16 and device is not None and device.type != "cpu" else 16
    return min(cap, max(floor, triton.next_power_of_2(channels)))


def _stencil_gemm_blocks(c_out_g: int, c_in_g: int, dw_first: bool, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the dKp GEMM. Its stencil operand (G over o, or Z1 over c) is rebuilt, on CUDA cores,
    once per tile of the other channel dim, so that dim's tile spans up to 256 channels; the stencil side stays
    ≤ 128 and keeps the fp32 accumulator at ≤ 128×128 elements. BLOCK_M (over C_out) is the dot's M side."""
    wide = _channel_block(c_in_g if not dw_first else c_out_g, 256, rows=dw_first, device=device)
    narrow = _channel_block(c_out_g if not dw_first else c_in_g, min(128, 128 * 128 // wide), rows=not dw_first,
                            device=device)
    return (wide, narrow) if dw_first else (narrow, wide)


def colora_conv_backward_adapters(x: torch.Tensor, grad_out: torch.Tensor, weight: torch.Tensor,
                                  pointwise: torch.Tensor, depthwise: torch.Tensor, stride: Sequence[int],
                                  padding: Sequence[int], dilation: Sequence[int], groups: int, order: str,
                                  need_bias_delta: bool, deterministic: bool = True, *, route: Optional[str] = None,
                                  two_pass: bool = False
                                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dKp, dKd, dΔb or None) of `conv(X, K0 + Kp ⊛ Kd, ...) + Δb` given dL/dO = grad_out.

    x: [N, C_in, *in], grad_out: [N, C_out, *out] (one dtype, any strides); dKp in pointwise's dtype, dKd in
    depthwise's, dΔb ([C_out], only with `need_bias_delta`) in pointwise's.

    `route`: "cheap" (≈ 2F/prod(k) plus the stencils) or "gradw" (weight gradient folded in its epilogue, F);
    None picks "gradw" for prod(k) ≤ 2, where both cost about F, and "cheap" otherwise. The cheap route runs the
    one-pass kernel where it serves the shape (`one_pass_unsupported`; else the reason is logged once) and the
    two-kernel route (a dKp GEMM with the stencil in its prologue, a dKd GEMM-and-stencil kernel) otherwise or
    with `two_pass`.
    `deterministic=False` trades bit-reproducibility for fp32 atomics instead of split partials.
    Rank r (Kp [r, C_out, C_in/groups], Kd [r, C_kd, *k]): each term's gradients are those of a rank-1 adapter
    of that term (ΔK is linear in the terms), so the terms run one after another (r times the cost) and dΔb is
    computed once.
    """
    if pointwise.dim() == 3:
        check_backward_conv(weight, pointwise, depthwise, stride, padding, dilation, groups, order)
        check_backward_tensors(x=x, grad_out=grad_out)
        x, grad_out = channels_innermost(x), channels_innermost(grad_out)  # staged once for all the terms
        grads = [colora_conv_backward_adapters(x, grad_out, weight, kp, kd, stride, padding, dilation, groups, order,
                                               need_bias_delta and i == 0, deterministic, route=route,
                                               two_pass=two_pass)
                 for i, (kp, kd) in enumerate(zip(pointwise, depthwise))]
        return torch.stack([g[0] for g in grads]), torch.stack([g[1] for g in grads]), grads[0][2]
    device = check_backward_tensors(x=x, grad_out=grad_out, weight=weight, pointwise=pointwise, depthwise=depthwise)
    stride3, pad3, dil3, k3 = check_backward_conv(weight, pointwise, depthwise, stride, padding, dilation, groups,
                                                  order)
    nd = weight.dim() - 2
    c_out, c_in_g = weight.shape[:2]
    c_in = c_in_g * groups
    if x.dim() != nd + 2 or x.shape[1] != c_in:
        fail(ValueError, f"x has shape {tuple(x.shape)}, which does not fit weight {tuple(weight.shape)} "
                          f"with groups={groups}")
    if x.dtype != grad_out.dtype:
        fail(TypeError, f"x ({x.dtype}) and grad_out ({grad_out.dtype}) must share a dtype")
    out_spatial = conv_output_shape(x.shape, weight.shape, stride3[3 - nd:], pad3[3 - nd:], dil3[3 - nd:])[2:]
    if tuple(grad_out.shape) != (x.shape[0], c_out, *out_spatial):
        fail(ValueError, f"grad_out has shape {tuple(grad_out.shape)}, expected {(x.shape[0], c_out, *out_spatial)}")
    taps = math.prod(k3)
    route = route or ("gradw" if taps <= 2 else "cheap")
    if route not in ROUTES:
        fail(ValueError, f"unknown route {route!r}; choose one of {ROUTES} or None")

    # The main loops read X and dY channels-innermost (NCHW ones are staged).
    xs, dy, kd = lift(channels_innermost(x), 2), lift(channels_innermost(grad_out), 2), lift(depthwise, 1)
    n, _, d, h, w = xs.shape
    od, oh, ow = dy.shape[2:]
    p_in = n * d * h * w
    one_pass = None
    if route == "cheap":
        one_pass = "two_pass forced" if two_pass else one_pass_unsupported(c_in_g, c_out // groups, taps,
                                                                          device_limits(device).capability)
        if one_pass is not None and not two_pass:
            _log_two_pass(one_pass, tuple(x.shape), tuple(weight.shape), groups)
    c_out_g = c_out // groups
    dw_first = order == "depthwise_first"
    use_atomic = not deterministic
    conv_args = (*stride3, *pad3, *dil3)
    io_strides = (*strides(xs), *strides(dy))
    kd_ch = kd.shape[0]
    p_out = n * od * oh * ow

    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if route == "gradw":
            # Two fp32 [BM, BN] accumulators live across the loop: 128×64 at most keeps them in registers.
            bm = _channel_block(c_out_g, rows=True, device=device)
            bn = _channel_block(c_in_g, min(128, 128 * 64 // bm))
            gemm_tiles = triton.cdiv(c_out_g, bm) * triton.cdiv(c_in_g, bn)
            split = _split(gemm_tiles * groups, p_out, device)
            dkd_tiles = triton.cdiv(c_out_g, bm) if dw_first else triton.cdiv(c_in_g, bn)
            dkp = _partials((split,), (c_out, c_in_g), use_atomic, device)
            dkd = _partials((split, dkd_tiles), (kd_ch, taps), use_atomic, device)
            db = _partials((split,), (c_out,), use_atomic, device) if need_bias_delta else dkp
            launch(
                _gradw_adapter_kernel, (gemm_tiles, groups, split),
                xs, dy, pointwise, kd, dkp, dkd, db,
                n, d, h, w, od, oh, ow, c_in_g, c_out_g, p_out, split,
                _lead_stride(dkp, 0), _lead_stride(dkd, 0), _lead_stride(dkd, 1), _lead_stride(db, 0),
                *conv_args, *io_strides, *strides(pointwise), *strides(kd),
                KD=k3[0], KH=k3[1], KW=k3[2], DEPTHWISE_FIRST=dw_first, HAS_BIAS=need_bias_delta,
                USE_ATOMIC=use_atomic, BLOCK_M=bm, BLOCK_N=bn)
            dkd = dkd.sum(1)
        elif one_pass is None:
            p_pos = p_out if dw_first else p_in
            s_g, p_g = (c_in_g, c_out_g) if dw_first else (c_out_g, c_in_g)
            bs, bp = _one_pass_blocks(s_g, p_g, taps, device)
            q, src = (dy, xs) if dw_first else (xs, dy)
            q_pos = position_stride(q)
            # The taps' sources as flat offsets too: stride 1 and equal input and output sizes.
            same = math.prod(stride3) == 1 and (d, h, w) == (od, oh, ow)
            s_pos = position_stride(src) if same and q_pos else 0
            tiles = triton.cdiv(s_g, bs) * triton.cdiv(p_g, bp)
            split = _split(tiles * groups, p_pos, device, min_rows=128)
            dkp = _partials((split,), (c_out, c_in_g), use_atomic, device)
            dkd = _partials((split, triton.cdiv(p_g, bp)), (kd_ch, taps), use_atomic, device)
            launch(
                _adapter_grads_one_pass_kernel, (tiles, groups, split),
                xs, dy, pointwise, kd, dkp, dkd,
                c_in_g, c_out_g, p_pos, split,
                _lead_stride(dkp, 0), _lead_stride(dkd, 0), _lead_stride(dkd, 1),
                *io_strides, *strides(pointwise), *strides(kd), q_pos, s_pos,
                FLAT_Q=q_pos != 0, FLAT_S=s_pos != 0, I64=max(extent(xs), extent(dy)) >= 2 ** 31,
                D=d, H=h, W=w, OD=od, OH=oh, OW=ow,
                KD=k3[0], KH=k3[1], KW=k3[2], SD=stride3[0], SH=stride3[1], SW=stride3[2], PD=pad3[0],
                PH=pad3[1], PW=pad3[2], DD=dil3[0], DH=dil3[1], DW=dil3[2],
                DEPTHWISE_FIRST=dw_first, USE_ATOMIC=use_atomic, BLOCK_S=bs, BLOCK_P=bp)
            dkd = dkd.sum(1)
            if need_bias_delta:
                db = _bias_delta(dy, c_out, p_out, use_atomic, device)
        else:
            p_kp = p_out if dw_first else p_in
            bm, bn = _stencil_gemm_blocks(c_out_g, c_in_g, dw_first, device)
            gemm_tiles = triton.cdiv(c_out_g, bm) * triton.cdiv(c_in_g, bn)
            split = _split(gemm_tiles * groups, p_kp, device)
            dkp = _partials((split,), (c_out, c_in_g), use_atomic, device)
            db = _partials((split,), (c_out,), use_atomic, device) if need_bias_delta and dw_first else dkp
            launch(
                _pointwise_grad_kernel, (gemm_tiles, groups, split),
                xs, dy, kd, dkp, db,
                n, d, h, w, od, oh, ow, c_in_g, c_out_g, p_kp, split, _lead_stride(dkp, 0), _lead_stride(db, 0),
                *conv_args, *io_strides, *strides(kd),
                KD=k3[0], KH=k3[1], KW=k3[2], DEPTHWISE_FIRST=dw_first, HAS_BIAS=need_bias_delta and dw_first,
                USE_ATOMIC=use_atomic, BLOCK_M=bm, BLOCK_N=bn)

            ch_g = c_in_g if dw_first else c_out_g
            # NCHW operands are gathered across channels: 32-channel tiles keep the gathers in registers.
            bc = _channel_block(ch_g, 128 if xs.stride(1) == 1 else 32)
            p_kd = p_out if dw_first else p_in
            split_d = _split(triton.cdiv(ch_g, bc) * groups, p_kd, device)
            dkd = _partials((split_d,), (kd_ch, taps), use_atomic, device)
            launch(
                _depthwise_grad_kernel, (triton.cdiv(ch_g, bc), groups, split_d),
                xs, dy, pointwise, dkd,
                n, d, h, w, od, oh, ow, c_in_g, c_out_g, p_kd, split_d, _lead_stride(dkd, 0), *conv_args, *io_strides,
                *strides(pointwise),
                KD=k3[0], KH=k3[1], KW=k3[2], T_PAD=triton.next_power_of_2(taps), DEPTHWISE_FIRST=dw_first,
                USE_ATOMIC=use_atomic, BLOCK_N=bc)

            if need_bias_delta and not dw_first:
                db = _bias_delta(dy, c_out, p_out, use_atomic, device)

    d_pointwise = dkp.sum(0).to(pointwise.dtype)
    d_depthwise = dkd.sum(0).reshape(depthwise.shape).to(depthwise.dtype)
    d_bias = db.sum(0).to(pointwise.dtype) if need_bias_delta else None
    return d_pointwise, d_depthwise, d_bias
