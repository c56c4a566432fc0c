"""What every kernel family shares: checks of dtypes, devices and adapter shapes, layout helpers, the device
limits that prune autotune configs, and `launch`, the one place a kernel is started.

`recording(limits)` makes `launch` record each launch (kernel, grid, arguments) instead of running it and lets
the launchers take `meta` tensors; the static audit (`colora_fused.audit`) drives the real launchers that way,
so it compiles exactly the specialisations a real launch would, for a GPU this machine does not have.
"""
import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl  # noqa: F401 (Triton requires it in the globals of a @triton.jit helper)

from .. import settings
from .._conv import ORDERS, TRITON_DTYPES, adapter_rank, adapter_shapes

INTERPRET = triton.knobs.runtime.interpret
# One fixed config instead of autotuning: always under the interpreter, and on a GPU when COLORA_TRITON_AUTOTUNE=0
# (the CUDA tests set it: autotuning every tiny test shape would cost more than the tests).
FIXED_CONFIG = INTERPRET or not settings.triton_autotune()
DTYPES = TRITON_DTYPES
_WAY_OUT = 'use backend="torch" for this case'
# Hopper's wgmma multiplies 64-row tiles per warpgroup: a tl.dot whose M tile is narrower (or that runs on fewer
# than 4 warps) falls back to mma.sync on sm_90. Channel tiles on a dot's M side are therefore kept at 64 or more
# on a GPU once a group has 16 channels.
WGMMA_ROWS = 64


class TritonBackendError(ValueError):
    """A case the triton backend does not run; the message says why and how to run it anyway."""


class TritonBackendTypeError(TypeError):
    """A dtype the triton backend does not run; the message says why and how to run it anyway."""


def backend_error(reason: str, kind: type = TritonBackendError) -> Exception:
    return kind(f"colora_fused triton backend: {reason}; {_WAY_OUT}")


@dataclass(frozen=True)
class DeviceLimits:
    """What a launch may use: streaming multiprocessors, shared memory per block (opt-in maximum, bytes), and the
    compute capability (major·10 + minor) that the tile choices are made for (90 under the interpreter)."""
    sm_count: int
    smem_per_block: int
    capability: int = 90


# Under the interpreter nothing limits shared memory; two "SMs" keep the reduction splits CI-sized.
_INTERPRETER_LIMITS = DeviceLimits(sm_count=2, smem_per_block=2 ** 31)


@dataclass
class Launch:
    """One recorded kernel launch: a JITFunction or Autotuner, its grid (a tuple or a callable of the
    meta-parameters) and the arguments it was given."""
    kernel: object
    grid: object
    args: tuple
    kwargs: dict


@dataclass
class _Recorder:
    limits: DeviceLimits
    launches: List[Launch] = field(default_factory=list)


_STATE = threading.local()


def _recorder() -> Optional[_Recorder]:
    return getattr(_STATE, "recorder", None)


@contextlib.contextmanager
def recording(limits: DeviceLimits) -> Iterator[List[Launch]]:
    """Within the block, launchers record their launches into the yielded list instead of running them,
    accept `meta` tensors, and see a device with these `limits` (for the static audit)."""
    previous = _recorder()
    _STATE.recorder = _Recorder(limits)
    try:
        yield _STATE.recorder.launches
    finally:
        _STATE.recorder = previous


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or a recorded Launch inside `recording`."""
    recorder = _recorder()
    if recorder is not None:
        recorder.launches.append(Launch(kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def device_limits(device: torch.device) -> DeviceLimits:
    recorder = _recorder()
    if recorder is not None:
        return recorder.limits
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceLimits(props.multi_processor_count, props.shared_memory_per_block_optin,
                            props.major * 10 + props.minor)
    return _INTERPRETER_LIMITS


def auto_tunes(device: torch.device) -> bool:
    """Whether launch-shape heuristics (split-K, ...) apply: on a GPU, or for the audit's target (recording); the
    interpreter runs the plain shapes unless a test asks for others."""
    return device.type == "cuda" or _recorder() is not None


# Split-K: the most K shares a sub-wave grid is cut into, and the fewest K-loop iterations a share keeps.
MAX_SPLIT_K = 4
MIN_SPLIT_ITERS = 8


def k_split(tiles: int, iters: int, device: torch.device) -> int:
    """K shares for an implicit-GEMM conv kernel of `tiles` 128×128 output tiles and `iters` K-loop iterations
    (64-channel blocks × taps): 1, unless the grid is under one wave of the device (a late, small layer), then
    enough shares to fill it, at most MAX_SPLIT_K, each of ≥ MIN_SPLIT_ITERS iterations. Only where the device
    is a GPU (or the audit's target). The kernels read channels-innermost operands (`channels_innermost`)."""
    if not auto_tunes(device):
        return 1
    sms = device_limits(device).sm_count
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), iters // MIN_SPLIT_ITERS, MAX_SPLIT_K))


def split_partials(split: int, channels: int, positions: int, out: torch.Tensor) -> torch.Tensor:
    """Where a kernel cut into `split` K shares stores its fp32 partial tiles: [split, channels, positions]
    (contiguous), or `out` itself without a split."""
    return torch.empty((split, channels, positions), dtype=torch.float32, device=out.device) if split > 1 else out


def sum_partials_(out: torch.Tensor, part: torch.Tensor, split: int) -> torch.Tensor:
    """out [N, C, *spatial] (any layout and dtype) ← the sum of `split_partials`' shares, in a fixed order; no-op
    without a split (the kernel wrote `out` itself)."""
    if split > 1:
        out.copy_(part.sum(0).view(out.shape[1], out.shape[0], *out.shape[2:]).transpose(0, 1))
    return out


def fit_configs(configs, fit: Callable[[dict], dict]):
    """`configs` with their meta-parameters passed through `fit` (e.g. tiles shrunk to a small conv), duplicates
    dropped, order kept."""
    fitted = {}
    for cfg in configs:
        kw = fit(dict(cfg.kwargs))
        key = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        fitted.setdefault(key, triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return list(fitted.values())


def prune_by_registers(configs, tile_elements: Callable[[triton.Config], int], per_thread: int):
    """The configs whose tiles, `tile_elements(config)` elements spread over the CTA's threads, stay within
    `per_thread` elements a thread; the smallest when none does. The budgets are the largest the static audit
    (`colora_fused.audit`) finds spill-free for sm_90."""
    load = {id(c): tile_elements(c) / (32 * c.num_warps) for c in configs}
    kept = [c for c in configs if load[id(c)] <= per_thread]
    return kept or [min(configs, key=lambda c: load[id(c)])]


def prune_by_shared_memory(configs, stage_bytes: Callable[[triton.Config], int], device: torch.device):
    """The configs whose software pipeline fits the device's shared memory per block.

    `stage_bytes(config)` bounds the bytes one pipeline stage stages (every tile the loop loads, in its load
    dtype); a config needs num_stages of them. When none fits, the smallest is kept (the kernel then fails
    with Triton's out-of-resources error, which `auto` turns into the torch path).
    """
    limit = device_limits(device).smem_per_block
    need = {id(c): c.num_stages * stage_bytes(c) for c in configs}
    kept = [c for c in configs if need[id(c)] <= limit]
    return kept or [min(configs, key=lambda c: need[id(c)])]


def _version(text: str) -> Tuple[int, int]:
    major, minor = (text.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run the kernels in this environment, or None: before triton 3.7 it converts
    one-element arrays to loop bounds with int(), which numpy 2.4 refuses (every kernel with a runtime loop bound
    fails with "only 0-dimensional arrays can be converted to Python scalars")."""
    import numpy
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter needs numpy < 2.4 (numpy {numpy.__version__} is "
                "installed): pip install 'numpy<2.4', or triton >= 3.7")
    return None


def device_problem(tensors: Sequence[Optional[torch.Tensor]]) -> Optional[str]:
    """Why these tensors cannot go to a Triton kernel together, or None."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        return f"tensors on different devices {sorted(str(d) for d in devices)}"
    device = devices.pop()
    if device.type == "cpu" and INTERPRET:
        return interpreter_problem()
    if device.type == "cuda" or (device.type == "meta" and _recorder()):
        return None
    if device.type == "cpu":
        return ("CPU tensors need a CUDA device, or the Triton interpreter (TRITON_INTERPRET=1 set before triton is "
                "imported)")
    return f"device type {device.type!r} is not supported"


def dtype_problem(tensors: Sequence[Optional[torch.Tensor]], names: Sequence[str]) -> Optional[str]:
    for t, name in zip(tensors, names):
        if t is not None and t.dtype not in DTYPES:
            return f"{name} has dtype {t.dtype}; supported are float32, float16 and bfloat16"
    return None


def _rank_of(pointwise: Optional[torch.Tensor]) -> int:
    return 1 if pointwise is None else adapter_rank(pointwise)


def check_conv_tensors(tensors: dict, weight: torch.Tensor, groups: int, order: str) -> None:
    """Checks shared by the launchers: dtypes, one device, the order, and the shapes of bias, pointwise,
    depthwise and bias_delta (those present in `tensors`, None allowed) against `weight`."""
    names, values = list(tensors), list(tensors.values())
    problem = dtype_problem(values, names)
    if problem:
        raise backend_error(problem, TritonBackendTypeError)
    problem = device_problem(values)
    if problem:
        raise backend_error(problem)
    if order not in ORDERS:
        raise backend_error(f"unknown order {order!r}; choose one of {ORDERS}")
    kp_shape, kd_shape = adapter_shapes(weight.shape, groups, order, _rank_of(tensors.get("pointwise")))
    expected = {"pointwise": kp_shape, "depthwise": kd_shape, "bias": (weight.shape[0],),
                "bias_delta": (weight.shape[0],)}
    for name, shape in expected.items():
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != shape:
            raise backend_error(f"{name} has shape {tuple(t.shape)}, expected {shape} for {order}")


def pad3(values: Sequence[int], fill: int) -> Tuple[int, ...]:
    """Per-dim values for (D, H, W): a 1d/2d conv's missing leading dims get `fill`."""
    return (fill,) * (3 - len(values)) + tuple(values)


def strides5(t: torch.Tensor) -> Tuple[int, ...]:
    """Strides of an [A, B, *spatial] tensor as [A, B, D, H, W]; missing spatial dims get stride 0."""
    return tuple(t.stride()[:2]) + pad3(t.stride()[2:], 0)


def extent(t: torch.Tensor) -> int:
    """One past the largest element offset the tensor addresses."""
    return 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))


def empty_like_layout(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised tensor of `shape` in x's memory format (channels last when x is channels last)."""
    channels_last = x.stride(1) == 1 and x.shape[1] > 1 and not x.is_contiguous()
    if not channels_last:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    perm = (0, *range(2, len(shape)), 1)
    return torch.empty([shape[p] for p in perm], dtype=x.dtype, device=x.device).permute(
        0, len(shape) - 1, *range(1, len(shape) - 1))


def channels_innermost(t: torch.Tensor) -> torch.Tensor:
    """`t` with its channels (dim 1) innermost in memory, the layout the kernels' pipelined main loops read
    (cp.async moves 16-byte runs of channels): `t` itself where they already are or there is one channel, else a
    channels-innermost copy. NCHW activations and weights are staged this way, as cuDNN stages NCHW for its
    tensor-core convolutions: one extra read and write of the tensor, against a main loop that gathers channels
    two bytes at a time (about twice the instructions per MMA; see the audit)."""
    if t.dim() < 3 or t.shape[1] == 1 or t.stride(1) == 1:
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def channels_innermost_output(out: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes `out`: `out` itself where its channels are innermost (or it has one channel), else a
    new channels-innermost tensor of its shape (NaN-filled under COLORA_NAN_FILL=1) that the launcher copies into
    `out` afterwards (`finish_output_`). An NCHW tile's positions are contiguous only within a row, so its stores
    go element by element with an address each; triton 3.6 spills 0.3-5 KB a thread on them in the forward and
    input-gradient kernels (the audit under triton 3.6), where a channels-innermost store is vectorised."""
    if out.dim() < 3 or out.shape[1] == 1 or out.stride(1) == 1:
        return out
    return new_tensor(out.shape, out.dtype, out.device, channels_last=True)


def finish_output_(out: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
    """out ← what the kernel wrote into `channels_innermost_output(out)` (no-op where that was `out`)."""
    if written is not out:
        out.copy_(written)
    return out


def position_stride(t: torch.Tensor) -> int:
    """For a 5-d [N, C, D, H, W] tensor: the stride s such that position (n, d, h, w) starts at element
    (((n·D + d)·H + h)·W + w)·s, i.e. its positions are evenly spaced (dense NDHWC, or dense NCDHW with one
    channel); 0 where they are not."""
    dims = [(size, st) for size, st in zip((t.shape[0], *t.shape[2:]), (t.stride(0), *t.stride()[2:])) if size != 1]
    if not dims:
        return 1
    base = expect = dims[-1][1]
    for size, st in reversed(dims):
        if st != expect:
            return 0
        expect *= size
    return base


def fail(exc: type, message: str):
    raise backend_error(message, TritonBackendTypeError if exc is TypeError else TritonBackendError)


def check_backward_tensors(**tensors: torch.Tensor) -> torch.device:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in DTYPES:
            fail(TypeError, f"{name} has dtype {t.dtype}; the kernels take float32, float16 or bfloat16")
        if t.dim() > 1 and sum((n - 1) * st for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31:
            fail(ValueError, f"one sample of {name} {tuple(t.shape)} spans 2³¹ elements or more, past the "
                  "kernels' int32 per-sample offsets")
    problem = device_problem(list(tensors.values()))
    if problem:
        fail(ValueError, problem)
    return next(iter(tensors.values())).device


def check_backward_conv(weight, pointwise, depthwise, stride, padding, dilation, groups, order):
    """Validate hyper-parameters and adapter shapes; return them as 3-tuples over (D, H, W) and the kernel size."""
    if order not in ORDERS:
        fail(ValueError, f"unknown order {order!r}; choose one of {ORDERS}")
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        fail(ValueError, f"weight must be [C_out, C_in/groups, *k] with 1-3 spatial dims, got {tuple(weight.shape)}")
    params = {}
    for name, given, least in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        value = tuple(given) if isinstance(given, (tuple, list, torch.Size)) else ()
        if len(value) != nd or not all(isinstance(v, int) and v >= least for v in value):
            fail(ValueError, f"{name} must be a tuple of {nd} ints >= {least} (symmetric zero padding only), "
                              f"got {given!r}")
        params[name] = value
    if not isinstance(groups, int) or groups < 1 or weight.shape[0] % groups:
        fail(ValueError, f"groups={groups!r} must be a positive int dividing C_out={weight.shape[0]}")
    kernel = tuple(weight.shape[2:])
    kp_shape, kd_shape = adapter_shapes(weight.shape, groups, order, _rank_of(pointwise))
    if tuple(pointwise.shape) != kp_shape:
        fail(ValueError, f"pointwise has shape {tuple(pointwise.shape)}, expected {kp_shape}")
    if tuple(depthwise.shape) != kd_shape:
        fail(ValueError, f"depthwise has shape {tuple(depthwise.shape)}, expected {kd_shape} ({order})")
    unit = 3 - nd
    return ((1,) * unit + params["stride"], (0,) * unit + params["padding"], (1,) * unit + params["dilation"],
            (1,) * unit + kernel)


def lift(t: torch.Tensor, lead: int) -> torch.Tensor:
    """View `t` with unit dims inserted after its `lead` leading dims until it has lead + 3 dims (no copy)."""
    while t.dim() < lead + 3:
        t = t.unsqueeze(lead)
    return t


def new_tensor(shape, dtype, device, channels_last: bool = False) -> torch.Tensor:
    """A new tensor (NaN-filled under COLORA_NAN_FILL=1); channels_last puts dim 1 innermost."""
    if channels_last:
        t = torch.empty((shape[0], *shape[2:], shape[1]), dtype=dtype, device=device).movedim(-1, 1)
    else:
        t = torch.empty(shape, dtype=dtype, device=device)
    if settings.nan_fill():
        t.fill_(float("nan"))
    return t


def strides(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(t.stride())


_INTERPRETED = tl.constexpr(bool(INTERPRET))


@triton.jit
def widen(x):
    """x as fp32. bf16 pairs widen in two instructions (a shift and a mask of the packed pair) where the compiler
    emits three (it moves the high half down, then shifts it back up); the interpreter, and other dtypes, take
    the plain conversion (the bits are the same: bf16 → fp32 is exact)."""
    if _INTERPRETED or x.dtype != tl.bfloat16:
        return x.to(tl.float32)
    return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=2)


class Segments(NamedTuple):
    """A mixed batch for the segmented launches (design §10): `sample`, the batch's samples sorted by adapter set
    (int32), `seg`, the int32 offsets [sets + 1] of each set's run in it (`kernels.segmented.segments_of`), and
    `largest`, the most samples a set has (it sizes the grid; an upper bound is fine)."""
    sample: torch.Tensor
    seg: torch.Tensor
    largest: int

    @property
    def sets(self) -> int:
        return self.seg.shape[0] - 1


class Reduction(NamedTuple):
    """How an adapter-gradient launch reduces over positions (`reduction_over`): `kp` and `kd`, one set's (their
    shapes and strides are what the kernel reads), `set_strides` (of the set dim; (0, 0) unsegmented), `positions`
    (what `position_split` sizes the split on: the largest set's), `p` (the kernel's P: every position, or one
    sample's when segmented), `sets` (1 unsegmented), `tables` (Segments' sample and seg; never read
    unsegmented) and `segmented`."""
    kp: torch.Tensor
    kd: torch.Tensor
    set_strides: Tuple[int, int]
    positions: int
    p: int
    sets: int
    tables: Tuple[torch.Tensor, torch.Tensor]
    segmented: bool

    @property
    def flags(self) -> dict:
        """The launch's SEGMENTED flag, only where set (unsegmented launches stay as they were)."""
        return {"SEGMENTED": True} if self.segmented else {}

    def sum_splits(self, partials: torch.Tensor) -> torch.Tensor:
        """fp32 partials [sets·SPLIT, ...] summed over the splits in a fixed order: [...] unsegmented, [sets, ...]
        segmented."""
        if not self.segmented:
            return partials.sum(0)
        return partials.view(self.sets, -1, *partials.shape[1:]).sum(1)


def reduction_over(kp: torch.Tensor, kd: torch.Tensor, samples: int, per_sample: int,
                   segments: Optional[Segments]) -> Reduction:
    """The `Reduction` of an adapter-gradient launch over `samples` samples of `per_sample` positions each; with
    `segments`, kp and kd are stacks [sets, ...] and each set reduces its own samples (design §10)."""
    if segments is None:
        return Reduction(kp, kd, (0, 0), samples * per_sample, samples * per_sample, 1, (kp, kp), False)
    return Reduction(kp[0], kd[0], (kp.stride(0), kd.stride(0)), segments.largest * per_sample, per_sample,
                     segments.sets, (segments.sample, segments.seg), True)


def one_set(pointwise: torch.Tensor, depthwise: torch.Tensor):
    """One set's factors of a per-set stack ([S, R, ...]), shaped as the unsegmented launchers take them (no
    leading R at rank 1): what their checks see."""
    index = (0,) if pointwise.shape[1] > 1 else (0, 0)
    return pointwise[index], depthwise[index]


def checked_sets(pointwise: torch.Tensor, depthwise: torch.Tensor, segments: Segments, batch: int,
                 bias_delta: Optional[torch.Tensor] = None, out_channels: int = 0):
    """`one_set` of the factors a segmented launch over `batch` samples takes, after checking that they are
    stacked per set (pointwise [S, R, C_out, C_in/groups], depthwise [S, R, C_kd, *k], bias_delta, where given,
    [S, out_channels], S = segments.sets) and that the sample table has one entry per sample."""
    sets = segments.sets
    if (pointwise.dim() != 4 or pointwise.shape[0] != sets or depthwise.shape[:2] != pointwise.shape[:2]
            or (bias_delta is not None and tuple(bias_delta.shape) != (sets, out_channels))
            or tuple(segments.sample.shape) != (batch,)):
        fail(ValueError, f"segmented factors must be stacked per set ({sets} sets, a batch of {batch}): "
                         f"pointwise {tuple(pointwise.shape)}, depthwise {tuple(depthwise.shape)}"
                         + ("" if bias_delta is None else f", bias_delta {tuple(bias_delta.shape)}"))
    return one_set(pointwise, depthwise)


@triton.jit
def decode_position(p, S1, S2, S3):
    """Flat index p over [N, S1, S2, S3] → (n, i1, i2, i3)."""
    i3 = p % S3
    t = p // S3
    i2 = t % S2
    t = t // S2
    return t // S1, t % S1, i2, i3


@triton.jit
def flat_offset(p, mask, stride, I64: tl.constexpr):
    """Flat indices p of evenly spaced positions (`position_stride`; masked-off ones read as 0) → element offsets,
    int64 where the tensor spans 2³¹ elements or more."""
    p = tl.where(mask, p, 0)
    return (p.to(tl.int64) if I64 else p) * stride


@triton.jit
def locate_position(p, mask, S1, S2, S3, s_n, s_1, s_2, s_3):
    """Flat indices p over [N, S1, S2, S3] (masked-off ones read as 0) → (n, i1, i2, i3, element offset by the
    strides s_n, s_1, s_2, s_3, in int64)."""
    return locate_in_set(p, mask, S1, S2, S3, s_n, s_1, s_2, s_3, p, 0, False)


@triton.jit
def sample_in_set(p, mask, S1, S2, S3, sample_ptr, seg_first, SEGMENTED: tl.constexpr):
    """Flat indices p over one adapter set's samples in a segmented launch (`Segments`) → (batch sample n, i1,
    i2, i3, flat index over the whole batch [N, S1, S2, S3]): p's sample is the set's (p // (S1·S2·S3))-th, batch
    sample sample_ptr[seg_first + that]. Without SEGMENTED, p decoded over [N, S1, S2, S3], and p. Masked-off
    indices decode as 0 and keep p."""
    n, i1, i2, i3 = decode_position(tl.where(mask, p, 0), S1, S2, S3)
    if SEGMENTED:
        k = n
        n = tl.load(sample_ptr + seg_first + k, mask=mask, other=0)
        p += (n - k) * (S1 * S2 * S3)
    return n, i1, i2, i3, p


@triton.jit
def samples_of_block(p, first, last, PER: tl.constexpr, sample_ptr, seg_first):
    """`sample_in_set`'s batch sample and flat index over the batch, for a block of flat indices p over one
    adapter set's samples of PER positions each whose valid ones lie in [first, last] and number at most PER, so
    lie in at most two samples: their batch indices are read once each, as scalars, instead of once a position.
    Masked-off indices get one of the two samples and a meaningless flat index."""
    k = first // PER
    n_a = tl.load(sample_ptr + seg_first + k)
    n_b = tl.load(sample_ptr + seg_first + tl.minimum(k + 1, last // PER))
    second = p >= (k + 1) * PER
    return tl.where(second, n_b, n_a), p + tl.where(second, n_b - k - 1, n_a - k) * PER


@triton.jit
def locate_in_set(p, mask, S1, S2, S3, s_n, s_1, s_2, s_3, sample_ptr, seg_first, SEGMENTED: tl.constexpr):
    """`locate_position` over one adapter set's samples in a segmented launch (`sample_in_set`). Without
    SEGMENTED, `locate_position` itself."""
    n, i1, i2, i3, _ = sample_in_set(p, mask, S1, S2, S3, sample_ptr, seg_first, SEGMENTED)
    return n, i1, i2, i3, position_offset(n, i1, i2, i3, s_n, s_1, s_2, s_3)


@triton.jit
def position_offset(n, i1, i2, i3, s_n, s_1, s_2, s_3):
    """The element offset of position (n, i1, i2, i3) by the strides s_n, s_1, s_2, s_3, in int64."""
    return n.to(tl.int64) * s_n + i1.to(tl.int64) * s_1 + i2.to(tl.int64) * s_2 + i3 * s_3


@triton.jit
def set_of_split(SPLIT, seg_ptr, kp_ptr, kd_ptr, s_kp_set, s_kd_set, P, SEGMENTED: tl.constexpr):
    """An adapter-gradient program's share of a reduction over positions (grid axis 2): (split index, first
    sample of its set in the sorted order, positions to reduce, Kp and Kd pointers). Segmented (a mixed batch,
    design §10), axis 2 runs over sets × SPLIT, P is the positions of one sample, and Kp and Kd are the set's
    (the set's slice of a [sets, ...] stack); otherwise axis 2 is the split and P every position."""
    i_split = tl.program_id(2)
    seg_first = 0
    if SEGMENTED:
        i_set = i_split // SPLIT
        i_split = i_split % SPLIT
        seg_first = tl.load(seg_ptr + i_set)
        P = (tl.load(seg_ptr + i_set + 1) - seg_first) * P
        kp_ptr += i_set.to(tl.int64) * s_kp_set
        kd_ptr += i_set.to(tl.int64) * s_kd_set
    return i_split, seg_first, P, kp_ptr, kd_ptr


def channel_gemm_configs():
    """BLOCK_K (positions per step), warps and stages of the adapter-gradient GEMMs that reduce over positions
    (the two-pass dKp GEMM, the gradW route's kernel); their launchers set the channel tiles (BLOCK_M, BLOCK_N)."""
    if FIXED_CONFIG:
        return [triton.Config({"BLOCK_K": 64})]
    return [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bk, w, s in [(64, 8, 3), (32, 8, 4), (64, 4, 3), (32, 4, 4), (16, 4, 4), (16, 8, 3), (16, 4, 2)]]


def channel_block(channels: int, cap: int = 128, rows: bool = False, device: Optional[torch.device] = None) -> int:
    """A power-of-two channel tile of at least 16 (tl.dot's minimum), at most `cap`. `rows`: the tile is a dot's
    M side, kept at WGMMA_ROWS or more on a GPU for groups of 16 channels or more (wgmma instead of mma.sync)."""
    floor = WGMMA_ROWS if rows and channels >= 16 and device is not None and device.type != "cpu" else 16
    return min(cap, max(floor, triton.next_power_of_2(channels)))


def position_split(tiles: int, positions: int, device: torch.device, min_rows: int = 512) -> int:
    """Programs per tile along an adapter gradient's reduction over positions: about two waves of the device, each
    program reducing at least `min_rows` positions (32 on CPU). Each writes fp32 partials that the launcher sums in
    a fixed order (bit-reproducible)."""
    min_rows = 32 if device.type == "cpu" else min_rows
    return max(1, min(triton.cdiv(2 * device_limits(device).sm_count, tiles), positions // min_rows))


def split_stride(partials: torch.Tensor, dim: int) -> int:
    """A kernel's stride along a split dim of its partials: 0 where the dim has one entry (its index is then 0),
    so that a launch without a split is specialised on a zero stride."""
    return 0 if partials.shape[dim] == 1 else partials.stride(dim)
