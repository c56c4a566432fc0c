"""The cheap route's adapter gradients in two passes (design §5), for what the one-pass kernel leaves (depthwise base
convs, kernels of many taps: `adapters_one_pass.one_pass_unsupported`): a grouped 1×1 weight-gradient GEMM for dKp
with the depthwise stencil in its operand prologue (`_pointwise_grad_kernel`), and a GEMM + stencil kernel for dKd
(`_depthwise_grad_kernel`). Neither writes the stencil (G or Z1) to memory.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._common import (FIXED_CONFIG, channel_block, channel_gemm_configs, launch, locate_in_set, new_tensor,
                      position_split, prune_by_registers, prune_by_shared_memory, reduction_over, set_of_split,
                      split_stride, strides, Segments)


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


@autotune(configs=channel_gemm_configs(),
          key=["C_IN_G", "C_OUT_G", "P", "KD", "KH", "KW", "DEPTHWISE_FIRST", "s_x_c", "SEGMENTED"],
          prune_configs_by={"early_config_prune": _prune_pointwise_grad})
@triton.jit
def _pointwise_grad_kernel(
        x_ptr, dy_ptr, kd_ptr, dkp_ptr, sample_ptr, seg_ptr,
        N, D, H, W, OD, OH, OW, C_IN_G, C_OUT_G, P, SPLIT, s_dkp_s, s_kd_set,
        SD, SH, SW, PD, PH, PW, DD, DH, DW,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kd_c, s_kd_d, s_kd_h, s_kd_w,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGMENTED: tl.constexpr = False):
    """dKp[o, c] = Σ_{n, pos} A[n, o, pos] · B[n, c, pos] per group; one operand is a depthwise stencil in registers.

    pointwise_first, pos = input positions [N, D, H, W]:
        A = G = depthwise_conv_transpose(dY, Kd): G[n, o, d] = Σ_t dY[n, o, (d + PD − td·DD)/SD]·Kd[o, t]
            (likewise h, w; terms whose quotient is fractional or out of range drop out), B = X.
    depthwise_first, pos = output positions [N, OD, OH, OW]:
        A = dY, B = Z1 = depthwise_conv(X, Kd): Z1[n, c, od] = Σ_t X[n, c, od·SD − PD + td·DD]·Kd[c, t].
    M = C_OUT_G, N = C_IN_G, K = P positions split over SPLIT programs. Grid: (M tiles × N tiles, groups, SPLIT).
    Writes fp32 partials dkp[s, g·C_OUT_G + o, c] ([SPLIT, C_out, C_IN_G]). SEGMENTED (a mixed batch): each set's
    samples against its own Kd, as in `adapters_one_pass`, partials [sets·SPLIT, C_out, C_IN_G].
    """
    i_mn, i_g = tl.program_id(0), tl.program_id(1)
    i_s, seg_first, P, _, kd_ptr = set_of_split(SPLIT, seg_ptr, kd_ptr, kd_ptr, 0, s_kd_set, P, SEGMENTED)
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
    for k0 in range(start, end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < end
        if DEPTHWISE_FIRST:
            i_b, od, oh, ow, p_dy = locate_in_set(o_k, m_k, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w, sample_ptr,
                                                  seg_first, SEGMENTED)
            b_a = tl.load(dy_ptr + (o_cout * s_dy_c)[:, None] + p_dy[None, :],
                          mask=m_m[:, None] & m_k[None, :], other=0.)  # [BM, BK]
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
            i_b, d, h, w, p_x = locate_in_set(o_k, m_k, D, H, W, s_x_n, s_x_d, s_x_h, s_x_w, sample_ptr, seg_first,
                                              SEGMENTED)
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

    tl.store(dkp_ptr + tl.program_id(2) * s_dkp_s + o_cout[:, None] * C_IN_G + o_n[None, :], acc,
             mask=m_m[:, None] & m_n[None, :])


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
          key=["C_IN_G", "C_OUT_G", "P", "KD", "KH", "KW", "DEPTHWISE_FIRST", "s_x_c", "SEGMENTED"],
          prune_configs_by={"early_config_prune": _prune_depthwise_grad})
@triton.jit
def _depthwise_grad_kernel(
        x_ptr, dy_ptr, kp_ptr, dkd_ptr, sample_ptr, seg_ptr,
        N, D, H, W, OD, OH, OW, C_IN_G, C_OUT_G, P, SPLIT, s_dkd_s, s_kp_set,
        SD, SH, SW, PD, PH, PW, DD, DH, DW,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kp_o, s_kp_c,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, T_PAD: tl.constexpr,
        DEPTHWISE_FIRST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGMENTED: tl.constexpr = False):
    """dKd[ch, t] = Σ_{n, pos} Y[n, ch, pos] · S_t[n, ch, pos]: a grouped 1×1 GEMM per row tile against a gather.

    pointwise_first, pos = input positions, ch = o:
        Y = Z1 = Kp ⊛ X: Z1[n, o, pos] = Σ_c Kp[o, c]·X[n, g·C_IN_G + c, pos]
        S_t[n, o, d] = dY[n, o, (d + PD − td·DD)/SD] (likewise h, w; zero where fractional or out of range)
    depthwise_first, pos = output positions, ch = c:
        Y = dZ1 = Kpᵀ ⊛ dY: dZ1[n, g·C_IN_G + c, pos] = Σ_o Kp[g·C_OUT_G + o, c]·dY[n, g·C_OUT_G + o, pos]
        S_t[n, c, od] = X[n, c, od·SD − PD + td·DD]
    Grid: (channel tiles, groups, SPLIT); a program walks the row tiles of its share of the P positions, keeping
    [BN, T_PAD] sums, t = (td·KH + th)·KW + tw. Writes fp32 partials dkd[s, ch, t] ([SPLIT, C_out or C_in,
    KD·KH·KW]). SEGMENTED (a mixed batch): each set's samples against its own Kp, partials [sets·SPLIT, ...].
    """
    i_n, i_g = tl.program_id(0), tl.program_id(1)
    i_s, seg_first, P, kp_ptr, _ = set_of_split(SPLIT, seg_ptr, kp_ptr, kp_ptr, s_kp_set, 0, P, SEGMENTED)
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
            i_b, i1, i2, i3, p_a = locate_in_set(o_m, m_m, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w, sample_ptr,
                                                 seg_first, SEGMENTED)
        else:
            i_b, i1, i2, i3, p_a = locate_in_set(o_m, m_m, D, H, W, s_x_n, s_x_d, s_x_h, s_x_w, sample_ptr,
                                                 seg_first, SEGMENTED)

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

    tl.store(dkd_ptr + tl.program_id(2) * s_dkd_s + o_ch[:, None] * T + o_t[None, :], acc,
             mask=m_n[:, None] & (o_t < T)[None, :])


def _stencil_gemm_blocks(c_out_g: int, c_in_g: int, dw_first: bool, device: torch.device) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the dKp GEMM. Its stencil operand (G over o, or Z1 over c) is rebuilt, on CUDA cores,
    once per tile of the other channel dim, so that dim's tile spans up to 256 channels; the stencil side stays
    ≤ 128 and keeps the fp32 accumulator at ≤ 128×128 elements. BLOCK_M (over C_out) is the dot's M side."""
    wide = channel_block(c_in_g if not dw_first else c_out_g, 256, rows=dw_first, device=device)
    narrow = channel_block(c_out_g if not dw_first else c_in_g, min(128, 128 * 128 // wide), rows=not dw_first,
                           device=device)
    return (wide, narrow) if dw_first else (narrow, wide)


def adapter_grads_two_pass(xs: torch.Tensor, dy: torch.Tensor, kp: torch.Tensor, kd: torch.Tensor,
                           stride: Tuple[int, int, int], padding: Tuple[int, int, int],
                           dilation: Tuple[int, int, int], groups: int, dw_first: bool,
                           segments: Optional[Segments] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (dKp [C_out, C_in/groups], dKd [C_kd, taps]) of one rank-1 term by `_pointwise_grad_kernel` and
    `_depthwise_grad_kernel`.

    xs: [N, C_in, D, H, W], dy: [N, C_out, OD, OH, OW] (channels innermost), kp: [C_out, C_in/groups],
    kd: [C_kd, KD, KH, KW]; stride, padding, dilation over (D, H, W). With `segments` (a mixed batch), kp and kd
    are every set's, stacked along a leading set dim, and so are the results.
    """
    device = xs.device
    n, _, d, h, w = xs.shape
    od, oh, ow = dy.shape[2:]
    # Both reduce over the positions Z1 lives at: the input's with pointwise_first, the output's with depthwise_first.
    red = reduction_over(kp, kd, n, od * oh * ow if dw_first else d * h * w, segments)
    c_out, c_in_g = red.kp.shape
    c_out_g = c_out // groups
    k3 = tuple(red.kd.shape[1:])
    taps = math.prod(k3)
    conv_args = (*stride, *padding, *dilation)
    io_strides = (*strides(xs), *strides(dy))

    bm, bn = _stencil_gemm_blocks(c_out_g, c_in_g, dw_first, device)
    gemm_tiles = triton.cdiv(c_out_g, bm) * triton.cdiv(c_in_g, bn)
    split = position_split(gemm_tiles * groups * red.sets, red.positions, device)
    dkp = new_tensor((red.sets * split, c_out, c_in_g), torch.float32, device)
    launch(
        _pointwise_grad_kernel, (gemm_tiles, groups, red.sets * split),
        xs, dy, kd, dkp, *red.tables,
        n, d, h, w, od, oh, ow, c_in_g, c_out_g, red.p, split, split_stride(dkp, 0), red.set_strides[1],
        *conv_args, *io_strides, *strides(red.kd),
        KD=k3[0], KH=k3[1], KW=k3[2], DEPTHWISE_FIRST=dw_first, BLOCK_M=bm, BLOCK_N=bn, **red.flags)

    ch_g = c_in_g if dw_first else c_out_g
    # NCHW operands are gathered across channels: 32-channel tiles keep the gathers in registers.
    bc = channel_block(ch_g, 128 if xs.stride(1) == 1 else 32)
    split_d = position_split(triton.cdiv(ch_g, bc) * groups * red.sets, red.positions, device)
    dkd = new_tensor((red.sets * split_d, red.kd.shape[0], taps), torch.float32, device)
    launch(
        _depthwise_grad_kernel, (triton.cdiv(ch_g, bc), groups, red.sets * split_d),
        xs, dy, kp, dkd, *red.tables,
        n, d, h, w, od, oh, ow, c_in_g, c_out_g, red.p, split_d, split_stride(dkd, 0), red.set_strides[0],
        *conv_args, *io_strides, *strides(red.kp),
        KD=k3[0], KH=k3[1], KW=k3[2], T_PAD=triton.next_power_of_2(taps), DEPTHWISE_FIRST=dw_first, BLOCK_N=bc,
        **red.flags)
    return red.sum_splits(dkp), red.sum_splits(dkd)
