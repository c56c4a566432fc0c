"""The fused CoLoRA forward: one implicit-GEMM convolution with the merged kernel `K0 + ΔK` built in registers.

    O[n, o, p] = Σ_{c, t} I[n, g(o)·C_in/groups + c, p·stride - padding + t·dilation] · (K0 + ΔK)[o, c, t]
                 + b0[o] + Δb[o]

ΔK[o, c, t] = Kp[o, c] · Kd[o, t] (pointwise_first) or Kp[o, c] · Kd[g(o)·C_in/groups + c, t] (depthwise_first).
Conv1d/2d/3d share one kernel over (D, H, W): missing leading spatial dims get size 1 and stride 0, so no
tensor is reshaped. Every tensor is addressed through its strides; x and K0 are read and the output is written
channels-innermost, so NCHW ones are staged by one copy each (`channels_innermost`, `channels_innermost_output`);
the output takes x's layout.
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._conv import adapter_terms, conv_output_shape
from ._autotune import autotune
from ._common import (FIXED_CONFIG, TritonBackendError, TritonBackendTypeError, backend_error, channels_innermost,
                      channels_innermost_output, check_conv_tensors, device_problem, dtype_problem, empty_like_layout,
                      extent, finish_output_, fit_configs, k_split, launch, pad3, prune_by_registers,
                      prune_by_shared_memory, checked_sets, split_partials, strides5, sum_partials_, Segments,
                      WGMMA_ROWS)


def _forward_problem(x: torch.Tensor, weight: torch.Tensor, groups: int) -> Optional[Tuple[type, str]]:
    problem = dtype_problem((x, weight), ("x", "weight"))
    if problem:
        return TritonBackendTypeError, problem
    if x.dtype != weight.dtype:
        return TritonBackendTypeError, f"x ({x.dtype}) and weight ({weight.dtype}) have different dtypes"
    problem = device_problem((x, weight))
    if problem:
        return TritonBackendError, problem
    if x.dim() not in (3, 4, 5) or weight.dim() != x.dim():
        return TritonBackendError, (f"expected a 1d/2d/3d conv: x of 3-5 dims and a weight of as many, got x "
                                    f"{tuple(x.shape)} and weight {tuple(weight.shape)}")
    if groups < 1 or weight.shape[0] % groups or x.shape[1] != weight.shape[1] * groups:
        return TritonBackendError, (f"channel counts do not fit: x has {x.shape[1]} channels, weight "
                                    f"{tuple(weight.shape)}, groups={groups}")
    return None


def supports_forward(x: torch.Tensor, weight: torch.Tensor, groups: int) -> Optional[str]:
    """None if the fused forward runs this conv, otherwise the reason it does not."""
    problem = _forward_problem(x, weight, groups)
    return problem and problem[1]


def forward_configs():
    """Autotuning space on CUDA: Hopper-sized tiles over (output pixels, output channels, input channels)."""
    tiles = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 32, 4, 4), (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 4), (128, 64, 32, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in tiles]


def interpreter_config():
    """The one config used when autotuning is bypassed (FIXED_CONFIG): small tiles keep the interpreter fast."""
    return triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)


def thin_groups(c_out_g: int, c_in_g: int) -> bool:
    """Whether padding both channel tiles of a group to tl.dot's 16 would waste 16× or more (depthwise and other
    thin groups): about what tensor cores gain over FMAs, so the fused kernels multiply with FMAs there."""
    n2, k2 = triton.next_power_of_2(c_out_g), triton.next_power_of_2(c_in_g)
    return max(1, 16 // n2) * max(1, 16 // k2) >= 16


def fit_channel_tiles(block_n: int, block_k: int, c_out_g: int, c_in_g: int) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_K) shrunk to the per-group channel counts.

    tl.dot needs tiles of at least 16 (and 64 rows for wgmma, see WGMMA_ROWS). For `thin_groups` the tiles take
    the exact power-of-two sizes instead and the kernel takes its broadcast-FMA path, with BLOCK_N·BLOCK_K ≤ 64
    so that its [BN, BK, BM] product stays in registers.
    """
    n2, k2 = triton.next_power_of_2(c_out_g), triton.next_power_of_2(c_in_g)
    if not thin_groups(c_out_g, c_in_g):
        # BLOCK_N is the M side of the transposed dot: not below WGMMA_ROWS for groups of 16 channels or more.
        return min(block_n, max(16, n2) if n2 < 16 else max(WGMMA_ROWS, n2)), min(block_k, max(16, k2))
    block_n = min(block_n, n2)
    return block_n, min(block_k, k2, max(1, 64 // block_n))


def _fit_configs(configs, named_args, **kwargs):
    """The autotuner's early prune: every config with its channel tiles fitted to this conv, duplicates dropped,
    then those whose pipeline overflows the device's shared memory (x, K0 and Kp tiles staged per stage), then
    (NCHW x) those past a register budget."""
    named_args = {**named_args, **kwargs}  # the channel counts arrive as constexpr keyword arguments

    def fit(kw):
        kw["BLOCK_N"], kw["BLOCK_K"] = fit_channel_tiles(kw["BLOCK_N"], kw["BLOCK_K"], named_args["C_OUT_G"],
                                                         named_args["C_IN_G"])
        return kw

    x = named_args["x_ptr"]

    def stage_bytes(cfg):
        kw = cfg.kwargs
        tiles = kw["BLOCK_K"] * kw["BLOCK_M"] + (1 + named_args.get("RANK", 1)) * kw["BLOCK_N"] * kw["BLOCK_K"]
        return tiles * x.element_size()

    configs = prune_by_shared_memory(fit_configs(configs, fit), stage_bytes, x.device)
    if named_args["sx_c"] != 1:
        # NCHW x and K0 are gathered across channels: a merged [BN, BK] tile beyond 32 elements a thread spills.
        configs = prune_by_registers(configs, lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"], 32)
    return configs


@triton.jit
def _colora_conv_fwd_kernel(
    x_ptr, w_ptr, kp_ptr, kd_ptr, b_ptr, db_ptr, out_ptr, part_ptr, sample_ptr, seg_ptr,
    M, S_PART, D_IN, H_IN, W_IN, D_OUT, H_OUT, W_OUT,
    sx_n, sx_c, sx_d, sx_h, sx_w,
    sw_o, sw_c, sw_d, sw_h, sw_w,
    sp_r, sp_o, sp_c,
    sk_r, sk_c, sk_d, sk_h, sk_w,
    s_b, s_db, sp_s, sk_s, s_dbs,
    so_n, so_c, so_d, so_h, so_w,
    C_IN_G: tl.constexpr, C_OUT_G: tl.constexpr, RANK: tl.constexpr,
    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_D: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_D: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_D: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    PW_FIRST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_DELTA: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1, MERGE: tl.constexpr = True, SEGMENTED: tl.constexpr = False,
):
    """out[n, o, od, oh, ow] = Σ_{c,tap} x[n, g·C_IN_G + c, od·s-p+td·d, ...] · (K0 + ΔK)[o, c, tap] + b0 + Δb
    with g = o // C_OUT_G.

    Implicit GEMM per group g: M = N·D_OUT·H_OUT·W_OUT output pixels × C_OUT_G output channels, reduced over
    K = C_IN_G input channels × KD·KH·KW taps, taps innermost. x: [N, C_in, D_IN, H_IN, W_IN]; w (K0):
    [C_out, C_IN_G, KD, KH, KW]; kp: [RANK, C_out, C_IN_G]; kd: [RANK, C_out, KD, KH, KW] (PW_FIRST) or
    [RANK, C_in, KD, KH, KW] (ΔK sums RANK terms); b, db: [C_out]; out: [N, C_out, D_OUT, H_OUT, W_OUT]; all
    addressed by strides. The geometry and the channel
    counts are compile-time constants, so the tap decomposition, the bounds and (when BLOCK_K divides C_IN_G,
    BLOCK_N divides C_OUT_G) the channel masks leave the loop. The merged tile is one fused multiply-add in x's
    dtype per term (K0 + Kp·Kd rounded once at rank 1: packed bf16x2/f16x2 on the GPU), the dot accumulates in
    fp32. MERGE=False
    convolves with K0 alone: the audit's baseline for what the merge costs.

    SPLIT_K > 1 (grids under one wave): program (tile, s) reduces the s-th of SPLIT_K contiguous shares of the
    K loop and stores its fp32 partial tile to part [SPLIT_K, C_out, M] (contiguous; split 0 adds the biases);
    the launcher sums the partials in a fixed order.

    SEGMENTED (a mixed batch, `kernels.segmented`): program axis 1 is an adapter set s, whose samples are
    sample[seg[s]:seg[s + 1]] (the batch's samples sorted by set). The set's rows, M = its samples × output
    pixels, are tiled on their own, so no tile straddles two sets; each set's tile of K0 + ΔK_s is built from its
    own factors (kp, kd, db at set strides sp_s, sk_s, s_dbs), and each row reads and writes its own sample.
    Programs past the set's tiles exit at once. No split-K: S_PART carries the number of groups instead.
    """
    NT: tl.constexpr = KD * KH * KW
    N_CB: tl.constexpr = (C_IN_G + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = C_IN_G % BLOCK_K == 0
    EVEN_N: tl.constexpr = C_OUT_G % BLOCK_N == 0
    pid = tl.program_id(0)
    if SEGMENTED:
        tl.static_assert(SPLIT_K == 1)
        i_s = tl.program_id(1)
        seg_first = tl.load(seg_ptr + i_s)
        M = (tl.load(seg_ptr + i_s + 1) - seg_first) * (D_OUT * H_OUT * W_OUT)  # this set's rows
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n: tl.constexpr = (C_OUT_G + BLOCK_N - 1) // BLOCK_N
    if SEGMENTED:
        if pid >= S_PART * n_pid_m * n_pid_n:  # S_PART is the number of groups here (no partials)
            return
        kp_ptr += i_s * sp_s
        kd_ptr += i_s * sk_s
        db_ptr += i_s * s_dbs
    i_g = pid // (n_pid_m * n_pid_n)
    pid = pid % (n_pid_m * n_pid_n)
    # GROUP_M swizzle: consecutive programs share weight tiles and neighbouring pixel rows in L2.
    width = GROUP_M * n_pid_n
    first_m = (pid // width) * GROUP_M
    group_m = min(n_pid_m - first_m, GROUP_M)
    i_m = first_m + (pid % width) % group_m
    i_n = (pid % width) // group_m

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] output pixels
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channels within the group
    o_k = tl.arange(0, BLOCK_K)  # [BK] input channels within a channel block
    if INT64:
        i_g = i_g.to(tl.int64)
        o_m = o_m.to(tl.int64)
        o_n = o_n.to(tl.int64)
        o_k = o_k.to(tl.int64)
    m_m = o_m < M
    m_n = (o_n < C_OUT_G) | EVEN_N
    o_w = o_m % W_OUT
    o_h = (o_m // W_OUT) % H_OUT
    o_d = (o_m // (W_OUT * H_OUT)) % D_OUT
    o_b = o_m // (W_OUT * H_OUT * D_OUT)
    if SEGMENTED:  # the set's n-th sample is sample[seg_first + n]
        o_b = tl.load(sample_ptr + seg_first + o_b, mask=m_m, other=0)
        if INT64:
            o_b = o_b.to(tl.int64)
    i_d0 = o_d * STRIDE_D - PAD_D  # [BM]
    i_h0 = o_h * STRIDE_H - PAD_H
    i_w0 = o_w * STRIDE_W - PAD_W
    c_first = i_g * C_IN_G
    i_o = i_g * C_OUT_G + o_n  # [BN] output channels

    p_x = x_ptr + o_b * sx_n + c_first * sx_c + i_d0 * sx_d + i_h0 * sx_h + i_w0 * sx_w  # [BM] tap (0, 0, 0)
    p_w = w_ptr + i_o * sw_o  # [BN]
    p_p = kp_ptr + i_o * sp_o  # [BN]
    p_d = kd_ptr + (c_first + o_k) * sk_c  # [BK] Kd rows of the first channel block (depthwise_first)
    p_d_o = kd_ptr + i_o * sk_c  # [BN] Kd rows of the output channels (pointwise_first)

    # The output tile is computed transposed, out^T = (K0 + ΔK) · x^T, so that the merged tile built in registers
    # is tl.dot's A operand (Hopper's wgmma reads A from registers; B must go through shared memory).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # Each share runs a fixed trip count (the pipeliner needs one to keep wgmma asynchronous); iterations past
    # the K loop's end, in the last share when SPLIT_K does not divide it, load nothing.
    CHUNK: tl.constexpr = (N_CB * NT + SPLIT_K - 1) // SPLIT_K
    TAIL: tl.constexpr = CHUNK * SPLIT_K != N_CB * NT
    if SPLIT_K == 1:
        k_lo = 0
    else:
        k_lo = tl.program_id(1) * CHUNK
    for kk in range(0, CHUNK):
        k = k_lo + kk
        tap = k % NT
        t_d = tap // (KH * KW)
        t_h = (tap // KW) % KH
        t_w = tap % KW
        c = (k // NT) * BLOCK_K + o_k  # [BK]
        m_c = (c < C_IN_G) | EVEN_K
        if TAIL:
            m_c = m_c & (k < N_CB * NT)
        i_d = i_d0 + t_d * DIL_D
        i_h = i_h0 + t_h * DIL_H
        i_w = i_w0 + t_w * DIL_W
        m_x = m_m
        if KD > 1 or PAD_D > 0:
            m_x = m_x & (i_d >= 0) & (i_d < D_IN)
        if KH > 1 or PAD_H > 0:
            m_x = m_x & (i_h >= 0) & (i_h < H_IN)
        if KW > 1 or PAD_W > 0:
            m_x = m_x & (i_w >= 0) & (i_w < W_IN)
        tap_x = t_d * DIL_D * sx_d + t_h * DIL_H * sx_h + t_w * DIL_W * sx_w
        b_x = tl.load(p_x[None, :] + (c[:, None] * sx_c + tap_x), mask=m_c[:, None] & m_x[None, :],
                      other=0.0)  # [BK, BM]

        m_nk = m_n[:, None] & m_c[None, :]
        b_w = tl.load(p_w[:, None] + c[None, :] * sw_c + (t_d * sw_d + t_h * sw_h + t_w * sw_w),
                      mask=m_nk, other=0.0)  # [BN, BK]
        if MERGE:
            tap_kd = t_d * sk_d + t_h * sk_h + t_w * sk_w
            for i in tl.static_range(RANK):
                b_p = tl.load(p_p[:, None] + (i * sp_r + c[None, :] * sp_c), mask=m_nk, other=0.0)  # [BN, BK]
                if PW_FIRST:
                    b_d = tl.load(p_d_o + (i * sk_r + tap_kd), mask=m_n, other=0.0)  # [BN]
                    b_w = tl.fma(b_p, b_d[:, None], b_w)
                else:
                    b_d = tl.load(p_d + (i * sk_r + (k // NT) * BLOCK_K * sk_c + tap_kd), mask=m_c,
                                  other=0.0)  # [BK]
                    b_w = tl.fma(b_p, b_d[None, :], b_w)
        b_w = b_w.to(x_ptr.dtype.element_ty)  # [BN, BK] merged tile, in the dtype a merged conv would use
        if BLOCK_K >= 16 and BLOCK_N >= 16:
            acc = tl.dot(b_w, b_x, acc)
        else:
            acc += tl.sum(b_w.to(tl.float32)[:, :, None] * b_x.to(tl.float32)[None, :, :], axis=1)

    first = (tl.program_id(1) == 0) | SEGMENTED  # the split that adds the biases (every set has its own rows)
    if HAS_BIAS:
        acc += tl.load(b_ptr + i_o * s_b, mask=m_n & first, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS_DELTA:
        acc += tl.load(db_ptr + i_o * s_db, mask=m_n & first, other=0.0).to(tl.float32)[:, None]
    if SPLIT_K == 1:
        p_o = out_ptr + (i_o * so_c)[:, None] + (o_b * so_n + o_d * so_d + o_h * so_h + o_w * so_w)[None, :]
        tl.store(p_o, acc.to(out_ptr.dtype.element_ty), mask=m_n[:, None] & m_m[None, :])  # [BN, BM]
    else:
        p_part = part_ptr + tl.program_id(1).to(tl.int64) * S_PART + (i_o.to(tl.int64) * M)[:, None]
        tl.store(p_part + o_m[None, :], acc, mask=m_n[:, None] & m_m[None, :])  # [BN, BM] fp32


_colora_conv_fwd_autotuned = autotune(
    configs=forward_configs(),
    key=["M", "D_OUT", "H_OUT", "W_OUT", "sx_c", "sw_c", "C_IN_G", "C_OUT_G", "RANK", "SPLIT_K", "KD", "KH",
         "KW", "STRIDE_D", "STRIDE_H", "STRIDE_W", "DIL_D", "DIL_H", "DIL_W", "SEGMENTED"],
    prune_configs_by={"early_config_prune": _fit_configs},
)(_colora_conv_fwd_kernel)


def _check_forward(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order):
    problem = _forward_problem(x, weight, groups)
    if problem:
        raise backend_error(problem[1], problem[0])
    check_conv_tensors(dict(x=x, weight=weight, bias=bias, pointwise=pointwise, depthwise=depthwise,
                            bias_delta=bias_delta), weight, groups, order)
    nd = x.dim() - 2
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(values) != nd or any(int(v) < low for v in values):
            raise backend_error(f"{name}={tuple(values)} must be {nd} ints >= {low} (symmetric zero padding only)")


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> Tuple[int, ...]:
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    if any(s < 1 for s in shape[2:]):
        raise backend_error(f"input {tuple(x.shape)} is smaller than the dilated kernel {tuple(weight.shape[2:])} "
                            f"with padding {tuple(padding)}")
    return shape


def forward_split(m: int, c_out_g: int, groups: int, c_in_g: int, taps: int, device: torch.device) -> int:
    """K shares for the fused forward (`k_split`): its grid at 128×128 tiles, its K loop of 64-channel blocks
    × taps."""
    tiles = groups * triton.cdiv(m, 128) * triton.cdiv(c_out_g, 128)
    return k_split(tiles, triton.cdiv(c_in_g, 64) * taps, device)


def colora_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        pointwise: torch.Tensor, depthwise: torch.Tensor, bias_delta: Optional[torch.Tensor],
                        stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                        order: str, out: Optional[torch.Tensor] = None, split_k: Optional[int] = None,
                        segments: Optional[Segments] = None) -> torch.Tensor:
    """conv(x, weight + ΔK, stride, padding, dilation, groups) + bias + bias_delta in one fused kernel.

    `padding` is symmetric zero padding, one int per spatial dim. The output takes x's memory format, or is
    written into `out` (any strides, x's dtype and the output's shape), which is returned. `split_k`: K shares
    (None: `forward_split`), whose fp32 partials are summed in a fixed order (deterministic).

    `segments` (a mixed batch, `kernels.segmented`): sample n uses its adapter set's factors; pointwise
    [S, R, C_out, C_in/groups], depthwise [S, R, C_kd, *k] and bias_delta [S, C_out] hold every set's (no split).
    """
    if segments is not None:
        _check_forward(x, weight, bias, *checked_sets(pointwise, depthwise, segments, x.shape[0], bias_delta,
                                                      weight.shape[0]),
                       None if bias_delta is None else bias_delta[0], stride, padding, dilation, groups, order)
    else:
        _check_forward(x, weight, bias, pointwise, depthwise, bias_delta, stride, padding, dilation, groups, order)
    shape = output_shape(x, weight, stride, padding, dilation)
    if out is None:
        out = empty_like_layout(x, shape)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or out.device != x.device:
        raise backend_error(f"out is {tuple(out.shape)} {out.dtype} on {out.device}, expected {shape} {x.dtype} "
                            f"on {x.device}")
    if out.numel() == 0:
        return out
    x, weight = channels_innermost(x), channels_innermost(weight)  # out keeps the caller's layout
    c_out = weight.shape[0]
    c_in_g, c_out_g = weight.shape[1], c_out // groups
    m = out.numel() // c_out  # output pixels N·D_OUT·H_OUT·W_OUT
    d_in, h_in, w_in = pad3(x.shape[2:], 1)
    d_out, h_out, w_out = pad3(shape[2:], 1)
    kd, kh, kw = pad3(weight.shape[2:], 1)
    if segments is None:
        split = split_k or forward_split(m, c_out_g, groups, c_in_g, kd * kh * kw, x.device)
        kps, kds = adapter_terms(pointwise, depthwise)
        kp_strides, kd_strides, db_stride = kps.stride(), kds.stride(), (0,) if bias_delta is None else (
            bias_delta.stride(0),)
        set_strides, rows, axis1 = (0, 0, 0), m, split
    else:
        # The largest set's rows size the grid's axis 0; axis 1 is the set (design §10).
        split, kps, kds = 1, pointwise[0], depthwise[0]
        kp_strides, kd_strides = pointwise.stride()[1:], depthwise.stride()[1:]
        db_stride = (0,) if bias_delta is None else (bias_delta.stride(1),)
        set_strides = (pointwise.stride(0), depthwise.stride(0), 0 if bias_delta is None else bias_delta.stride(0))
        rows, axis1 = max(1, segments.largest) * d_out * h_out * w_out, segments.sets
    # The kernel writes channels-innermost (a split writes fp32 partials that sum_partials_ lays out itself).
    kernel_out = channels_innermost_output(out) if split == 1 else out
    int64 = max(extent(x), extent(kernel_out), extent(weight)) >= 2 ** 31
    part = split_partials(split, c_out, m, kernel_out)
    sample, seg = (part, part) if segments is None else (segments.sample, segments.seg)
    args = (
        x, weight, pointwise, depthwise, weight if bias is None else bias,
        weight if bias_delta is None else bias_delta, kernel_out, part, sample, seg,
        rows, c_out * m if segments is None else groups, d_in, h_in, w_in, d_out, h_out, w_out,
        *strides5(x), *strides5(weight), *kp_strides,
        *kd_strides[:2], *pad3(kd_strides[2:], 0),
        0 if bias is None else bias.stride(0), *db_stride, *set_strides,
        *strides5(kernel_out),
    )
    # Compile-time constants: one specialisation per layer geometry and channel count, as autotuning keys anyway.
    flags = dict(C_IN_G=c_in_g, C_OUT_G=c_out_g, RANK=kps.shape[0], KD=kd, KH=kh, KW=kw,
                 **dict(zip(("STRIDE_D", "STRIDE_H", "STRIDE_W"), pad3(stride, 1))),
                 **dict(zip(("PAD_D", "PAD_H", "PAD_W"), pad3(padding, 0))),
                 **dict(zip(("DIL_D", "DIL_H", "DIL_W"), pad3(dilation, 1))),
                 PW_FIRST=order == "pointwise_first", HAS_BIAS=bias is not None,
                 HAS_BIAS_DELTA=bias_delta is not None, INT64=int64, SPLIT_K=split)
    if segments is not None:
        flags["SEGMENTED"] = True

    def grid(meta):
        return groups * triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(c_out_g, meta["BLOCK_N"]), axis1

    with torch.cuda.device_of(x):
        if FIXED_CONFIG:
            cfg = _fit_configs([interpreter_config()], {"C_OUT_G": c_out_g, "C_IN_G": c_in_g, "x_ptr": x,
                                                         "sx_c": x.stride(1), "RANK": kps.shape[0]})[0]
            launch(_colora_conv_fwd_kernel, grid, *args, **flags, **cfg.kwargs, num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages)
        else:
            launch(_colora_conv_fwd_autotuned, grid, *args, **flags)
    return finish_output_(sum_partials_(out, part, split), kernel_out)
