"""The cheap route's adapter gradients in one pass (design §5): `_adapter_grads_one_pass_kernel` reads each tile of
X and dY once, builds the depthwise stencil (G = Kd-transpose of dY, or Z1 = Kd ⊛ X) from per-tap shifted tiles,
and accumulates dKp on tensor cores and dKd against the same taps from the tile's share of the 1×1 product
(Z1 = Kp ⊛ X, or dZ1 = Kpᵀ ⊛ dY). Neither G nor Z1 is ever written to memory. It serves convs whose groups have
more than one channel on each side and kernels of up to ONE_PASS_MAX_TAPS taps (`one_pass_unsupported`); the
two-pass form (`adapters_two_pass`) serves the others.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._common import (FIXED_CONFIG, channel_block, device_limits, extent, flat_offset, launch, new_tensor,
                      position_offset, position_split, position_stride, prune_by_registers, prune_by_shared_memory,
                      reduction_over, sample_in_set, samples_of_block, set_of_split, split_stride, strides, widen,
                      Segments)

# The one-pass kernel unrolls every tap and keeps one register accumulator per tap: beyond this many taps
# (sm_90; before sm_90, where mma.sync layouts need more registers, ONE_PASS_MAX_TAPS_SM80) it spills in the audit.
ONE_PASS_MAX_TAPS = 25
ONE_PASS_MAX_TAPS_SM80 = 9


def one_pass_unsupported(c_in_g: int, c_out_g: int, taps: int, capability: int = 90) -> Optional[str]:
    """Why the one-pass adapter-gradient kernel does not serve a conv of these group widths and taps on a GPU of
    this compute capability, or None.

    Depthwise base convs (one input or output channel per group) leave both of its GEMMs one channel wide, so
    the two-pass form, which does not tile that side, serves them.
    """
    if c_in_g == 1 or c_out_g == 1:
        return "one channel per group on a side (a depthwise base conv)"
    most = ONE_PASS_MAX_TAPS if capability >= 90 else ONE_PASS_MAX_TAPS_SM80
    if taps > most:
        return f"{taps} taps (the one-pass kernel keeps one accumulator per tap, at most {most} here)"
    return None


@triton.jit
def _tuple_add(tup, i: tl.constexpr, value):
    """`tup` with `value` added to item i: one loop-carried accumulator per tap (tuples are immutable)."""
    return tup[:i] + (tup[i] + value,) + tup[i + 1:]


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
               "DEPTHWISE_FIRST", "SEGMENTED"],
          prune_configs_by={"early_config_prune": _prune_one_pass})
@triton.jit
def _adapter_grads_one_pass_kernel(
        x_ptr, dy_ptr, kp_ptr, kd_ptr, dkp_ptr, dkd_ptr, sample_ptr, seg_ptr,
        C_IN_G, C_OUT_G, P, SPLIT, s_dkp_s, s_dkd_s, s_dkd_tile, s_kp_set, s_kd_set,
        s_x_n, s_x_c, s_x_d, s_x_h, s_x_w,
        s_dy_n, s_dy_c, s_dy_d, s_dy_h, s_dy_w,
        s_kp_o, s_kp_c, s_kd_c, s_kd_d, s_kd_h, s_kd_w, s_q_pos, s_s_pos,
        FLAT_Q: tl.constexpr, FLAT_S: tl.constexpr, I64: tl.constexpr,
        D: tl.constexpr, H: tl.constexpr, W: tl.constexpr, OD: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr,
        KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, SD: tl.constexpr, SH: tl.constexpr,
        SW: tl.constexpr, PD: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, DD: tl.constexpr,
        DH: tl.constexpr, DW: tl.constexpr, DEPTHWISE_FIRST: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, SEGMENTED: tl.constexpr = False):
    """dKp and dKd of the cheap route in one pass over X and dY (design §5), per group.

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
    SPLIT). Writes fp32 partials dkp[split, o, c] ([SPLIT, C_out, C_IN_G]) and dkd[split, p tile, s, t].

    SEGMENTED (a mixed batch, design §10): grid axis 2 runs over sets × SPLIT (`set_of_split`), each program
    reducing its set's samples against that set's Kp and Kd; P is one sample's positions and the partials' split
    index is the set's·SPLIT + the split. Each position's batch sample comes from the sorted sample table, read
    twice a block (`samples_of_block`, a block of at most one sample's positions) or else once a position
    (GATHER, `sample_in_set`), and with it its flat index over the batch, which FLAT_Q and FLAT_S take as they
    take the flat index unsegmented.
    """
    i_sp, i_g = tl.program_id(0), tl.program_id(1)
    i_split, seg_first, P, kp_ptr, kd_ptr = set_of_split(SPLIT, seg_ptr, kp_ptr, kd_ptr, s_kp_set, s_kd_set, P,
                                                         SEGMENTED)
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
    if DEPTHWISE_FIRST:
        PER: tl.constexpr = OD * OH * OW
    else:
        PER: tl.constexpr = D * H * W
    # Segmented, a block of at most one sample's positions lies in at most two samples, whose batch indices it
    # reads once (`samples_of_block`); a larger block reads each position's (GATHER).
    GATHER: tl.constexpr = SEGMENTED and BLOCK_K > PER
    for k0 in range(start, end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < end
        # Each position's batch sample, coordinates, and flat index over the batch (o_b; o_k unsegmented).
        if DEPTHWISE_FIRST:
            i_b, i1, i2, i3, o_b = sample_in_set(o_k, m_k, OD, OH, OW, sample_ptr, seg_first, GATHER)
        else:
            i_b, i1, i2, i3, o_b = sample_in_set(o_k, m_k, D, H, W, sample_ptr, seg_first, GATHER)
        if SEGMENTED and not GATHER:
            i_b, o_b = samples_of_block(o_k, k0, end - 1, PER, sample_ptr, seg_first)
        if FLAT_Q:
            # Evenly spaced positions: the offset is the flat index over the batch times one stride (no int64 sum).
            p_q = flat_offset(o_b, m_k, s_q_pos, I64)
        elif DEPTHWISE_FIRST:
            p_q = position_offset(i_b, i1, i2, i3, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
        else:
            p_q = position_offset(i_b, i1, i2, i3, s_x_n, s_x_d, s_x_h, s_x_w)
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
            p_base = position_offset(i_b, i1 * SD, i2 * SH, i3 * SW, s_x_n, s_x_d, s_x_h, s_x_w)
            v1, v2, v3 = i1 * SD, i2 * SH, i3 * SW
        else:
            LD, LH, LW = OD, OH, OW
            s_sd, s_sh, s_sw = s_dy_d, s_dy_h, s_dy_w
            p_base = position_offset(i_b, i1, i2, i3, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
            v1, v2, v3 = i1, i2, i3
        if FLAT_S:
            # Stride 1, equal input and output sizes, evenly spaced positions: a tap's source is the block's own
            # flat position plus a constant.
            p_q_s = flat_offset(o_b, m_k, s_s_pos, I64)
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
                        p_t = position_offset(i_b, d, h, w, s_dy_n, s_dy_d, s_dy_h, s_dy_w)
                    b_src = widen(tl.load(s_ptr + p_t[:, None], mask=m_tap[:, None] & m_s[None, :],
                                          other=0.))  # [BK, BS] fp32
                    b_kd = tl.load(kd_ptr + ch_s * s_kd_c + (td * s_kd_d + th * s_kd_h + tw * s_kd_w), mask=m_s,
                                   other=0.).to(tl.float32)  # [BS]
                    b_a += b_src * b_kd[None, :]
                    acc_kd = _tuple_add(acc_kd, (td * KH + th) * KW + tw, b_y * b_src)
        acc = tl.dot(tl.trans(b_q), b_a.to(b_q.dtype), acc)  # [BP, BS]

    i_part = tl.program_id(2)  # the split, or the set's·SPLIT + the split
    p_dkp = dkp_ptr + i_part * s_dkp_s
    if DEPTHWISE_FIRST:
        p_dkp += ch_p[:, None] * C_IN_G + o_s[None, :]
    else:
        p_dkp += ch_s[None, :] * C_IN_G + o_p[:, None]
    tl.store(p_dkp, acc, mask=m_p[:, None] & m_s[None, :])
    for t in tl.static_range(T):
        tl.store(dkd_ptr + i_part * s_dkd_s + i_p * s_dkd_tile + ch_s * T + t, tl.sum(acc_kd[t], axis=0), mask=m_s)


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
    return channel_block(s_g, bs_cap), channel_block(p_g, 256, rows=True, device=device)


def adapter_grads_one_pass(xs: torch.Tensor, dy: torch.Tensor, kp: torch.Tensor, kd: torch.Tensor,
                           stride: Tuple[int, int, int], padding: Tuple[int, int, int],
                           dilation: Tuple[int, int, int], groups: int, dw_first: bool,
                           segments: Optional[Segments] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 (dKp [C_out, C_in/groups], dKd [C_kd, taps]) of one rank-1 term by `_adapter_grads_one_pass_kernel`.

    xs: [N, C_in, D, H, W], dy: [N, C_out, OD, OH, OW] (channels innermost), kp: [C_out, C_in/groups],
    kd: [C_kd, KD, KH, KW]; stride, padding, dilation over (D, H, W). With `segments` (a mixed batch), kp and kd
    are every set's, stacked along a leading set dim, and so are the results.
    """
    device = xs.device
    n, _, d, h, w = xs.shape
    od, oh, ow = dy.shape[2:]
    red = reduction_over(kp, kd, n, od * oh * ow if dw_first else d * h * w, segments)
    c_out, c_in_g = red.kp.shape
    c_out_g = c_out // groups
    k3 = tuple(red.kd.shape[1:])
    taps = math.prod(k3)
    s_g, p_g = (c_in_g, c_out_g) if dw_first else (c_out_g, c_in_g)
    bs, bp = _one_pass_blocks(s_g, p_g, taps, device)
    q, src = (dy, xs) if dw_first else (xs, dy)
    # Flat offsets where positions are evenly spaced (segmented too: the kernel finds each position's flat index
    # over the batch).
    q_pos = position_stride(q)
    # The taps' sources as flat offsets too: stride 1 and equal input and output sizes.
    same = math.prod(stride) == 1 and (d, h, w) == (od, oh, ow)
    s_pos = position_stride(src) if same and q_pos else 0
    tiles = triton.cdiv(s_g, bs) * triton.cdiv(p_g, bp)
    split = position_split(tiles * groups * red.sets, red.positions, device, min_rows=128)
    dkp = new_tensor((red.sets * split, c_out, c_in_g), torch.float32, device)
    dkd = new_tensor((red.sets * split, triton.cdiv(p_g, bp), red.kd.shape[0], taps), torch.float32, device)
    launch(
        _adapter_grads_one_pass_kernel, (tiles, groups, red.sets * split),
        xs, dy, kp, kd, dkp, dkd, *red.tables,
        c_in_g, c_out_g, red.p, split,
        split_stride(dkp, 0), split_stride(dkd, 0), split_stride(dkd, 1), *red.set_strides,
        *strides(xs), *strides(dy), *strides(red.kp), *strides(red.kd), q_pos, s_pos,
        FLAT_Q=q_pos != 0, FLAT_S=s_pos != 0, I64=max(extent(xs), extent(dy)) >= 2 ** 31,
        D=d, H=h, W=w, OD=od, OH=oh, OW=ow,
        KD=k3[0], KH=k3[1], KW=k3[2], SD=stride[0], SH=stride[1], SW=stride[2], PD=padding[0],
        PH=padding[1], PW=padding[2], DD=dilation[0], DH=dilation[1], DW=dilation[2],
        DEPTHWISE_FIRST=dw_first, BLOCK_S=bs, BLOCK_P=bp, **red.flags)
    return red.sum_splits(dkp), red.sum_splits(dkd.sum(1))
