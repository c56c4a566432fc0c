"""The gradW route's adapter gradients (design §5; `_conv.adapter_grad_route` takes it where the full weight
gradient costs fewer multiply-adds than the cheap route: small kernels): a weight-gradient GEMM per tap whose tile is
folded into dKp and dKd in the epilogue (`_gradw_adapter_kernel`); gradW is never stored.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._common import (channel_block, channel_gemm_configs, launch, locate_in_set, new_tensor, position_split,
                      prune_by_registers, prune_by_shared_memory, reduction_over, set_of_split, split_stride,
                      strides, Segments)


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


@autotune(configs=channel_gemm_configs(),
          key=["C_IN_G", "C_OUT_G", "P", "KD", "KH", "KW", "DEPTHWISE_FIRST", "s_x_c", "SEGMENTED"],
          prune_configs_by={"early_config_prune": _prune_gradw})
@triton.jit
def _gradw_adapter_kernel(
        x_ptr, dy_ptr, kp_ptr, kd_ptr, dkp_ptr, dkd_ptr, sample_ptr, seg_ptr,
        N, D, H, W, OD, OH, OW, C_IN_G, C_OUT_G, P, SPLIT, s_dkp_s, s_dkd_s, s_dkd_tile, s_kp_set, s_kd_set,
        SD, SH, SW, PD, PH, PW, DD, DH, DW,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kp_o, s_kp_c, s_kd_c, s_kd_d, s_kd_h, s_kd_w,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEGMENTED: tl.constexpr = False):
    """Adapter gradients through the weight gradient, folded in the epilogue (the gradW route).

        gradW[o, c, t] = Σ_{n, pos} dY[n, g·C_OUT_G + o, pos] · X[n, g·C_IN_G + c, pos·S − P + t·DIL]
        dKp[o, c] = Σ_t gradW[o, c, t]·Kd[·, t]                      (Kd[o, t] or Kd[g·C_IN_G + c, t])
        dKd[o, t] = Σ_c gradW[o, c, t]·Kp[o, c]                      (pointwise_first)
        dKd[g·C_IN_G + c, t] = Σ_o gradW[o, c, t]·Kp[o, c]           (depthwise_first)
    One [BM, BN] gradW tile per tap (M = C_OUT_G, N = C_IN_G, K = P output positions split over SPLIT), never
    stored. Both are linear in gradW, so each split folds its own partial: fp32 dkp[s, o, c]
    ([SPLIT, C_out, C_IN_G]) and dkd[s, tile, ch, t], where tile is the N tile (pointwise_first, C_out rows) or
    the M tile (depthwise_first, C_in rows).
    Grid: (M tiles × N tiles, groups, SPLIT). SEGMENTED (a mixed batch): each set's samples against its own Kp
    and Kd, as in `adapters_one_pass`; partials [sets·SPLIT, ...].
    """
    i_mn, i_g = tl.program_id(0), tl.program_id(1)
    i_s, seg_first, P, kp_ptr, kd_ptr = set_of_split(SPLIT, seg_ptr, kp_ptr, kd_ptr, s_kp_set, s_kd_set, P,
                                                     SEGMENTED)
    i_part = tl.program_id(2)  # the split, or the set's·SPLIT + the split
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
    for t in range(T):
        td = t // (KH * KW)
        th = (t // KW) % KH
        tw = t % KW
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(start, end, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < end
            i_b, od, oh, ow, p_dy = locate_in_set(o_k, m_k, OD, OH, OW, s_dy_n, s_dy_d, s_dy_h, s_dy_w, sample_ptr,
                                                  seg_first, SEGMENTED)
            b_dy = tl.load(dy_ptr + (o_cout * s_dy_c)[:, None] + p_dy[None, :],
                           mask=m_m[:, None] & m_k[None, :], other=0.)  # [BM, BK]
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
            p_dkd = dkd_ptr + i_part * s_dkd_s + i_m * s_dkd_tile + o_cin * T + t
            tl.store(p_dkd, tl.sum(acc * b_kp, axis=0), mask=m_n)
        else:
            b_kd = tl.load(kd_ptr + o_cout * s_kd_c + p_kd, mask=m_m, other=0.).to(tl.float32)  # [BM]
            acc_kp += acc * b_kd[:, None]
            p_dkd = dkd_ptr + i_part * s_dkd_s + i_n * s_dkd_tile + o_cout * T + t
            tl.store(p_dkd, tl.sum(acc * b_kp, axis=1), mask=m_m)

    tl.store(dkp_ptr + i_part * s_dkp_s + o_cout[:, None] * C_IN_G + o_n[None, :], acc_kp, mask=m_mn)


def adapter_grads_gradw(xs: torch.Tensor, dy: torch.Tensor, kp: torch.Tensor, kd: torch.Tensor,
                        stride: Tuple[int, int, int], padding: Tuple[int, int, int], dilation: Tuple[int, int, int],
                        groups: int, dw_first: bool, segments: Optional[Segments] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (dKp [C_out, C_in/groups], dKd [C_kd, taps]) of one rank-1 term by `_gradw_adapter_kernel`.

    xs: [N, C_in, D, H, W], dy: [N, C_out, OD, OH, OW] (channels innermost), kp: [C_out, C_in/groups],
    kd: [C_kd, KD, KH, KW]; stride, padding, dilation over (D, H, W). With `segments` (a mixed batch), kp and kd
    are every set's, stacked along a leading set dim, and so are the results.
    """
    device = xs.device
    n, _, d, h, w = xs.shape
    od, oh, ow = dy.shape[2:]
    red = reduction_over(kp, kd, n, od * oh * ow, segments)
    c_out, c_in_g = red.kp.shape
    c_out_g = c_out // groups
    k3 = tuple(red.kd.shape[1:])
    # Two fp32 [BM, BN] accumulators live across the loop: 128×64 at most keeps them in registers.
    bm = channel_block(c_out_g, rows=True, device=device)
    bn = channel_block(c_in_g, min(128, 128 * 64 // bm))
    gemm_tiles = triton.cdiv(c_out_g, bm) * triton.cdiv(c_in_g, bn)
    split = position_split(gemm_tiles * groups * red.sets, red.positions, device)
    dkd_tiles = triton.cdiv(c_out_g, bm) if dw_first else triton.cdiv(c_in_g, bn)
    dkp = new_tensor((red.sets * split, c_out, c_in_g), torch.float32, device)
    dkd = new_tensor((red.sets * split, dkd_tiles, red.kd.shape[0], math.prod(k3)), torch.float32, device)
    launch(
        _gradw_adapter_kernel, (gemm_tiles, groups, red.sets * split),
        xs, dy, kp, kd, dkp, dkd, *red.tables,
        n, d, h, w, od, oh, ow, c_in_g, c_out_g, red.p, split,
        split_stride(dkp, 0), split_stride(dkd, 0), split_stride(dkd, 1), *red.set_strides,
        *stride, *padding, *dilation, *strides(xs), *strides(dy), *strides(red.kp), *strides(red.kd),
        KD=k3[0], KH=k3[1], KW=k3[2], DEPTHWISE_FIRST=dw_first, BLOCK_M=bm, BLOCK_N=bn, **red.flags)
    return red.sum_splits(dkp), red.sum_splits(dkd.sum(1))
