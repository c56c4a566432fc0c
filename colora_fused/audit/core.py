"""Static audit of every Triton kernel for a GPU this machine need not have (sm_90 H100, sm_80 A100).

Each kernel family's real launcher is driven with `meta` tensors of representative conv shapes inside
`kernels._common.recording`, so the launches it records carry exactly the arguments, grids and autotune configs
(after pruning, for the target's SM count and shared memory) of a real launch. Every recorded launch is compiled
by Triton for the target, and the audit reads what the compiler made: registers, spills and wgmma serialisation
from ptxas, shared memory from Triton, and the main loop from the SASS (cuobjdump). NCHW units record what an NCHW
input runs: the launchers stage it channels-innermost with one copy (not counted) before the channels-last kernel.

The estimate (an issue-slot model, not a timing). The main loop is the innermost loop of the SASS that holds a
tensor-core instruction. Per loop iteration a CTA of W warps issues I·W instructions (I: the loop's SASS
instructions, NOPs left out) on the SM's 4 schedulers, one per cycle each: `issue = I·W/4` cycles. Its MMAs
do `mma_flops` floating-point operations (HGMMA m×n×k per warpgroup, HMMA per warp), which the SM's tensor cores
retire at a peak rate per cycle (dense: sm_90 4096 bf16/fp16 and 2048 tf32 FLOP/cycle; sm_80 half that):
`tensor = mma_flops / rate` cycles. The estimated tensor-core share of the loop is `tensor / max(tensor, issue)`:
an upper bound (memory stalls and latency are not modelled; loops nested around the main loop are not counted).
mma.sync (HMMA) on sm_90 is rated at the wgmma peak, which it does not reach: for a loop that uses it (`mma`
says so) the share holds, but the tensor cycles, hence the loop's time, are underestimated.

Run `python -m colora_fused.audit` (or `colora-audit`, `colora-bench --audit`); `--help` lists the options.
Writes results.md, results.csv and env.json to `--out` (default audit-results/; the committed audit is
benchmarks/results/audit-sm90, rewritten only when named).
"""
import argparse
import concurrent.futures as futures
import contextlib
import csv
import io
import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as triton_compile, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

from .._conv import ORDERS, adapter_grad_route, adapter_shapes, conv_output_shape
from ..kernels import _common
from ..kernels.conv_bwd_adapters import colora_conv_backward_adapters
from ..kernels.conv_bwd_input import colora_conv_backward_input
from ..kernels.conv_fwd import colora_conv_forward
from ..kernels.merge import merge_
from ..toolbox import Progress, environment as toolbox_environment


@dataclass(frozen=True)
class Arch:
    """A target GPU: compute capability, SMs, shared memory per block (opt-in) and per SM, and the dense tensor
    FLOP/cycle/SM by operand type."""
    name: str
    capability: int
    sm_count: int
    smem_per_block: int
    smem_per_sm: int
    mma_rate: Dict[str, int]


ARCHS = {
    "sm90": Arch("H100 SXM (sm_90)", 90, 132, 232448, 233472, {"BF16": 4096, "F16": 4096, "TF32": 2048}),
    "sm80": Arch("A100 (sm_80)", 80, 108, 166912, 167936, {"BF16": 2048, "F16": 2048, "TF32": 1024}),
}
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
ISSUE_PER_CYCLE = 4  # warp schedulers per SM, one instruction each per cycle


@dataclass(frozen=True)
class Shape:
    """A conv to audit: input [N, C_in, *spatial], weight [C_out, C_in/groups, *k], hyper-parameters."""
    name: str
    x: Tuple[int, ...]
    weight: Tuple[int, ...]
    stride: int = 1
    padding: int = 1
    groups: int = 1
    bias: bool = False


SHAPES = (
    Shape("r50-3x3-256@14", (64, 256, 14, 14), (256, 256, 3, 3)),
    Shape("vgg16-3x3-512@28", (64, 512, 28, 28), (512, 512, 3, 3), bias=True),
    Shape("r50-1x1-1024>256@14", (64, 1024, 14, 14), (256, 1024, 1, 1), padding=0),
    Shape("r50-3x3-128-s2@56", (64, 128, 56, 56), (128, 128, 3, 3), stride=2),
    Shape("r50-3x3-512@7", (64, 512, 7, 7), (512, 512, 3, 3)),
    Shape("dw-3x3-256@14", (64, 256, 14, 14), (256, 1, 3, 3), groups=256),
)
QUICK_SHAPES = (
    Shape("q-3x3-64@8", (8, 64, 8, 8), (64, 64, 3, 3), bias=True),
    Shape("q-1x1-64>32@8", (8, 64, 8, 8), (32, 64, 1, 1), padding=0),
    Shape("q-dw-3x3-32@8", (8, 32, 8, 8), (32, 1, 3, 3), groups=32),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYOUTS = ("channels_last", "nchw")
FAMILIES = ("forward", "forward_plain", "forward_segmented", "input_grad", "input_grad_segmented",
            "adapters_cheap", "adapters_gradw", "adapters_segmented", "merge")
# forward_segmented, input_grad_segmented, adapters_segmented: the fused forward, input gradient and adapter
# gradients (on the route production's policy picks) of a mixed batch (design §10), the batch split evenly over
# this many adapter sets of rank 1 (the forward's each with a Δb).
MIXED_SETS = 8
# Besides FAMILIES, `record` takes the adapter gradients on the route production's policy picks ("adapters", None
# here: `_conv.adapter_grad_route`) and on the cheap route's two-pass form (TWO_PASS), which the GPU check's warm-up
# compiles. "merge" is the in-place merge of one layer (what `merge_many_` launches for one).
TWO_PASS = "adapters_two_pass"
ADAPTER_ROUTES = {"adapters": None, "adapters_cheap": "cheap", "adapters_gradw": "gradw", TWO_PASS: "two_pass",
                  "adapters_segmented": None}
# forward_plain: the fused forward compiled with MERGE=False (a convolution by K0 alone), the yardstick for what
# building K0 + ΔK in registers costs; bf16 on sm_90 only.
BASELINE = "forward_plain"


@dataclass(frozen=True)
class Unit:
    """One thing to record: a kernel family's launcher on one shape, layout, dtype, target and adapter order (the
    audit's tables audit pointwise_first; the GPU check's warm-up records both)."""
    family: str
    shape: Shape
    layout: str
    dtype: str
    arch: str
    order: str = "pointwise_first"


def live_arch(device: torch.device) -> str:
    """Register the CUDA device `device` as a target named "live" (its SMs, shared memory and capability; the
    tensor-core rates of its generation) and return that name: what the GPU check's warm-up compiles for."""
    props = torch.cuda.get_device_properties(device)
    capability = props.major * 10 + props.minor
    rates = ARCHS["sm90" if capability >= 90 else "sm80"].mma_rate
    ARCHS["live"] = Arch(f"{props.name} (sm_{capability})", capability, props.multi_processor_count,
                         props.shared_memory_per_block_optin, props.shared_memory_per_multiprocessor, rates)
    return "live"


def _tensor(shape: Sequence[int], dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    if channels_last and t.dim() in (4, 5):
        t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def record(unit: Unit) -> List[Tuple[_common.Launch, List[Optional[triton.Config]]]]:
    """The launches the family's launcher makes for this unit (nothing runs), each with the configs it may run."""
    s, arch = unit.shape, ARCHS[unit.arch]
    dtype, cl = DTYPES[unit.dtype], unit.layout == "channels_last"
    nd = len(s.weight) - 2
    stride, padding, dilation = [s.stride] * nd, [s.padding] * nd, [1] * nd
    out_shape = conv_output_shape(s.x, s.weight, stride, padding, dilation)
    # The weight takes the activations' layout, as `model.to(memory_format=torch.channels_last)` (the benchmarks'
    # setting) gives it.
    x, w = _tensor(s.x, dtype, cl), _tensor(s.weight, dtype, cl)
    kp_shape, kd_shape = adapter_shapes(s.weight, s.groups, unit.order)
    kp, kd = _tensor(kp_shape, dtype), _tensor(kd_shape, dtype)
    bias = _tensor(s.weight[:1], dtype) if s.bias else None
    conv = (stride, padding, dilation, s.groups, unit.order)
    with _common.recording(_common.DeviceLimits(arch.sm_count, arch.smem_per_block, arch.capability)) as launches:
        if unit.family in ("forward", BASELINE):
            colora_conv_forward(x, w, bias, kp, kd, bias, *conv)
            if unit.family == BASELINE:
                for launch in launches:
                    launch.kwargs["MERGE"] = False
        elif unit.family.endswith("_segmented"):
            stacked = lambda shape: _tensor((MIXED_SETS, 1, *shape), dtype)  # noqa: E731
            segments = _common.Segments(_tensor(s.x[:1], torch.int32), _tensor((MIXED_SETS + 1,), torch.int32),
                                        -(-s.x[0] // MIXED_SETS))
            if unit.family == "forward_segmented":
                colora_conv_forward(x, w, bias, stacked(kp_shape), stacked(kd_shape),
                                    _tensor((MIXED_SETS, s.weight[0]), dtype), *conv, segments=segments)
            elif unit.family == "adapters_segmented":
                colora_conv_backward_adapters(x, _tensor(out_shape, dtype, cl), w, stacked(kp_shape),
                                              stacked(kd_shape), *conv, segments=segments,
                                              route=adapter_route(unit.family, s.x, s.weight, out_shape, unit.order))
            else:
                colora_conv_backward_input(_tensor(out_shape, dtype, cl), w, stacked(kp_shape), stacked(kd_shape),
                                           s.x, cl, *conv, segments=segments)
        elif unit.family == "input_grad":
            colora_conv_backward_input(_tensor(out_shape, dtype, cl), w, kp, kd, s.x, cl, *conv)
        elif unit.family.startswith("adapters"):
            colora_conv_backward_adapters(x, _tensor(out_shape, dtype, cl), w, kp, kd, *conv,
                                          route=adapter_route(unit.family, s.x, s.weight, out_shape, unit.order))
        else:
            merge_(w, None, kp, kd, None, s.groups, unit.order)
        # The autotuners prune for the device they see: the target, inside the recording.
        return [(launch, configs_of(launch)) for launch in launches]


def adapter_route(family: str, x_shape: Sequence[int], weight_shape: Sequence[int], out_shape: Sequence[int],
                  order: str) -> str:
    """The `route` an adapter family's launches take: its own, or for "adapters" production's choice."""
    return ADAPTER_ROUTES[family] or adapter_grad_route(x_shape, weight_shape, out_shape, order)


def _jit_fn(kernel):
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def configs_of(launch: _common.Launch) -> List[Optional[triton.Config]]:
    """The configs this launch may run: the autotuner's after its early prune, or the launch's own (None)."""
    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return [None]
    if kernel.early_config_prune is None:
        return list(kernel.configs)
    nargs = dict(zip(kernel.arg_names, launch.args))
    return list(kernel.early_config_prune(kernel.configs, nargs, **launch.kwargs))


def _launch_kwargs(launch: _common.Launch, config: Optional[triton.Config]) -> dict:
    return {**launch.kwargs, **(config.all_kwargs() if config else {})}


def grid_size(launch: _common.Launch, config: Optional[triton.Config]) -> int:
    grid = launch.grid
    if callable(grid):
        fn = _jit_fn(launch.kernel)
        meta = {**dict(zip(fn.arg_names, launch.args)), **_launch_kwargs(launch, config)}
        grid = grid(meta)
    return math.prod(grid)


@dataclass
class Compiled:
    """What the compiler made of one specialisation."""
    regs: int
    spill_bytes: int  # spill stores + spill loads, per thread (ptxas)
    smem: int
    num_warps: int
    num_stages: int
    serialized: bool  # ptxas: "wgmma.mma_async instructions are serialized"
    mma: str  # wgmma / mma.sync / wgmma+mma.sync (both in the main loop) / none
    loop_instrs: int  # the main loop's SASS instructions (0 without a tensor-core loop)
    loop_mmas: int
    loop_mma_flops: int  # per CTA and iteration
    loop_waits: int  # wgmma waits for zero pending groups inside the loop
    mma_type: str  # BF16 / F16 / TF32 or ""
    outer_instrs: int = 0  # instructions of the enclosing loop outside the main loop (0: not nested)
    error: str = ""


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


def parse_sass(sass: str) -> List[Tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction of the (single) kernel in a cuobjdump listing."""
    return [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]


def _is_mma(opcode: str) -> bool:
    return opcode.startswith(("HGMMA", "HMMA"))


def _mma_flops(opcode: str, num_warps: int) -> Tuple[int, str]:
    """(FLOPs per CTA, operand type) of one instruction as it appears in each warp's stream."""
    # fp16 operands are the default: the opcode names BF16 and TF32 only (HGMMA.64x128x16.F32 is f16 in, f32 out).
    kind = next((t for t in ("BF16", "TF32") if f".{t}" in opcode), "F16")
    if opcode.startswith("HGMMA"):
        m, n, k = map(int, re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode).groups())
        return 2 * m * n * k * max(1, num_warps // 4), kind
    digits = re.match(r"HMMA\.(\d+)", opcode).group(1)
    m, n, k = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}[digits]
    return 2 * m * n * k * num_warps, kind


def main_loop(instrs: List[Tuple[int, str, str]], num_warps: int) -> dict:
    """The innermost backward-branch loop holding a tensor-core instruction, what it issues, and the
    instructions of the loop around it (if any) outside it."""
    loops = []
    for addr, op, operands in instrs:
        if op.startswith("BRA"):
            target = _BRANCH_TARGET.search(operands)
            if target and int(target.group(1), 16) <= addr:
                loops.append((int(target.group(1), 16), addr))

    def body(loop):
        return [(op, operands) for a, op, operands in instrs if loop[0] <= a <= loop[1] and op != "NOP"]

    with_mma = [loop for loop in loops if any(_is_mma(op) for op, _ in body(loop))]
    if not with_mma:
        any_mma = next((op for _, op, _ in instrs if _is_mma(op)), None)
        mma = "none" if any_mma is None else ("wgmma" if any_mma.startswith("HGMMA") else "mma.sync")
        return dict(mma=mma, loop_instrs=0, loop_mmas=0, loop_mma_flops=0, loop_waits=0, mma_type="",
                    outer_instrs=0)
    main = min(with_mma, key=lambda loop: len(body(loop)))
    best = body(main)
    around = [loop for loop in loops if loop != main and loop[0] <= main[0] and main[1] <= loop[1]]
    outer = len(body(min(around, key=lambda loop: len(body(loop))))) - len(best) if around else 0
    mmas = [op for op, _ in best if _is_mma(op)]
    flops = [_mma_flops(op, num_warps) for op in mmas]
    waits = sum(1 for op, operands in best if op.startswith("WARPGROUP.DEPBAR") and operands.strip().endswith("0x0"))
    kinds = {op.startswith("HGMMA") for op in mmas}
    return dict(mma="wgmma" if kinds == {True} else "mma.sync" if kinds == {False} else "wgmma+mma.sync",
                loop_instrs=len(best),
                loop_mmas=len(mmas), loop_mma_flops=sum(f for f, _ in flops), loop_waits=waits,
                mma_type=flops[0][1], outer_instrs=outer)


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _ptxas_figures(log: str) -> Tuple[int, int, bool]:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else -1, int(spills.group(1)) + int(spills.group(2)) if spills else -1,
            "instructions are serialized" in log)


_BINDERS: Dict[tuple, tuple] = {}


def _bind(launch: _common.Launch, config: Optional[triton.Config], arch: str):
    """What the JIT computes before compiling a launch for the target: (target, backend, fn, kwargs, bound
    arguments, specialisation, options). The backend and the argument binder are built once per kernel and
    target."""
    fn = _jit_fn(launch.kernel)
    key = (fn, arch)
    if key not in _BINDERS:
        target = GPUTarget("cuda", ARCHS[arch].capability, 32)
        backend = make_backend(target)
        _BINDERS[key] = target, backend, create_function_from_signature(fn.signature, fn.params, backend)
    target, backend, binder = _BINDERS[key]
    kwargs = _launch_kwargs(launch, config)
    return (target, backend, fn, kwargs, *binder(*launch.args, **kwargs))


def compile_launch(launch: _common.Launch, config: Optional[triton.Config], arch: str) -> Compiled:
    """Compile one launch with one config for the target, as the JIT would for a real launch there."""
    target, backend, fn, kwargs, bound, specialization, options = _bind(launch, config, arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    # Compile even when Triton's cache has the kernel: the figures come from ptxas's log of this compilation.
    knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = True
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as exc:  # a config the compiler rejects is a finding, not a crash of the audit
        first = str(exc).strip().splitlines()
        return Compiled(-1, -1, -1, options.num_warps, options.num_stages, False, "none", 0, 0, 0, 0, "",
                        error=f"{type(exc).__name__}: {first[0] if first else ''}"[:200])
    finally:
        knobs.nvidia.dump_ptxas_log = knobs.compilation.always_compile = False
    regs, spills, serialized = _ptxas_figures(log.getvalue())
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    loop = main_loop(parse_sass(sass), kernel.metadata.num_warps)
    return Compiled(regs, spills, kernel.metadata.shared, kernel.metadata.num_warps, kernel.metadata.num_stages,
                    serialized, **loop)


def compile_key(launch: _common.Launch, config: Optional[triton.Config], arch: str) -> tuple:
    """What decides the compiled code: the kernel, its specialisation (types, divisibility, constexprs), the
    options and the target. Launches with equal keys compile to the same binary."""
    _, backend, fn, kwargs, _, specialization, _ = _bind(launch, config, arch)
    options = sorted(backend.parse_options(kwargs).__dict__.items())
    return fn.fn.__qualname__, repr(specialization), repr(options), arch


def occupancy(c: Compiled, arch: Arch) -> int:
    """CTAs resident per SM, limited by registers (allocated per warp in units of 256), warps, shared memory."""
    if c.regs <= 0:
        return 0
    regs_per_warp = math.ceil(c.regs * 32 / 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * c.num_warps)
    by_smem = arch.smem_per_sm // (c.smem + 1024)
    return max(0, min(MAX_CTAS_PER_SM, MAX_WARPS_PER_SM // c.num_warps, by_regs, by_smem))


def estimate(c: Compiled, arch: Arch) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """(issue cycles, tensor cycles, estimated tensor-core share) of one main-loop iteration, or Nones."""
    if not c.loop_mmas or c.mma_type not in arch.mma_rate:
        return None, None, None
    issue = c.loop_instrs * c.num_warps / ISSUE_PER_CYCLE
    tensor = c.loop_mma_flops / arch.mma_rate[c.mma_type]
    return issue, tensor, tensor / max(tensor, issue)


CSV_FIELDS = ("family", "kernel", "shape", "layout", "dtype", "arch", "order", "config", "grid", "sms", "ctas_per_sm",
              "waves", "regs", "spill_bytes", "smem", "smem_limit", "mma", "loop_instrs", "loop_mmas", "instrs_per_mma",
              "loop_waits", "outer_instrs", "wgmma_serialized", "issue_cycles", "tensor_cycles", "est_tensor_share",
              "error")


def _config_text(launch: _common.Launch, config: Optional[triton.Config], c: Compiled) -> str:
    kw = _launch_kwargs(launch, config)
    blocks = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_O", "BLOCK_R") if k in kw)
    return f"{blocks} w{c.num_warps} s{c.num_stages}"


def row(unit: Unit, launch: _common.Launch, config: Optional[triton.Config], c: Compiled) -> dict:
    arch = ARCHS[unit.arch]
    grid = grid_size(launch, config)
    ctas = occupancy(c, arch)
    issue, tensor, share = estimate(c, arch)
    return dict(
        family=unit.family, kernel=_jit_fn(launch.kernel).fn.__name__.strip("_"), shape=unit.shape.name,
        layout=unit.layout, dtype=unit.dtype, arch=unit.arch, order=unit.order,
        config=_config_text(launch, config, c), grid=grid,
        sms=arch.sm_count, ctas_per_sm=ctas, waves=round(grid / (arch.sm_count * ctas), 2) if ctas else "",
        regs=c.regs, spill_bytes=c.spill_bytes, smem=c.smem, smem_limit=arch.smem_per_block, mma=c.mma,
        loop_instrs=c.loop_instrs or "", loop_mmas=c.loop_mmas or "",
        instrs_per_mma=round(c.loop_instrs / c.loop_mmas, 1) if c.loop_mmas else "", loop_waits=c.loop_waits,
        outer_instrs=c.outer_instrs,
        wgmma_serialized=int(c.serialized), issue_cycles=round(issue) if issue else "",
        tensor_cycles=round(tensor) if tensor else "", est_tensor_share=round(share, 2) if share else "",
        error=c.error)


# --- the parallel driver --------------------------------------------------------------------------------------

_WORKER_CACHE: Dict[Unit, list] = {}


def _recorded(unit: Unit) -> list:
    if unit not in _WORKER_CACHE:
        _WORKER_CACHE[unit] = record(unit)
    return _WORKER_CACHE[unit]


def _worker_compile(job: Tuple[Unit, int, int]) -> Tuple[Tuple[Unit, int, int], Compiled]:
    """Compile launch `li`, config `ci` of `unit` (re-recorded here: launches do not pickle)."""
    unit, li, ci = job
    launch, configs = _recorded(unit)[li]
    return job, compile_launch(launch, configs[ci], unit.arch)


def _worker_warm(job: Tuple[Unit, int, int]) -> Tuple[Tuple[Unit, int, int], str]:
    """Compile launch `li`, config `ci` of `unit` through Triton's cache (a cached kernel is loaded, not compiled
    again); the compiler's error, or ""."""
    unit, li, ci = job
    launch, configs = _recorded(unit)[li]
    target, backend, fn, kwargs, bound, specialization, options = _bind(launch, configs[ci], unit.arch)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    except Exception as exc:  # reported by the caller; the other compilations go on
        lines = str(exc).strip().splitlines()
        return job, f"{type(exc).__name__}: {lines[0] if lines else ''}"[:200]
    return job, ""


def _distinct_jobs(units: Sequence[Unit]):
    """Every (unit, launch, config, compile key) the units record, and one job per distinct compile key."""
    recorded, jobs = [], {}
    for unit in units:
        for li, (launch, configs) in enumerate(record(unit)):
            for ci, config in enumerate(configs):
                key = compile_key(launch, config, unit.arch)
                jobs.setdefault(key, (unit, li, ci))
                recorded.append((unit, launch, config, key))
    return recorded, jobs


def _run_jobs(worker, jobs: Dict[tuple, tuple], workers: int, stream) -> Dict[tuple, object]:
    """worker(job) for every job, in `workers` forked processes (0: one per CPU), with progress lines; the
    results by compile key."""
    by_job = {job: key for key, job in jobs.items()}
    results: Dict[tuple, object] = {}
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        outcomes = map(worker, jobs.values())
    else:
        pool = futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        outcomes = pool.map(worker, jobs.values(), chunksize=1)
    # Made once the pool has forked its workers (all at the first submit): no heartbeat thread at fork time.
    try:
        with Progress(len(jobs), stream, interval_s=10.0, unit="compilation", prefix="[audit] ") as progress:
            progress.phase("compiling")
            for job, result in outcomes:
                results[by_job[job]] = result
                progress.detail(f"compiled {job[0].family}")
                progress.advance()
    finally:
        if workers != 1:
            pool.shutdown()
    return results


def plan_units(shapes: Sequence[Shape], dtypes: Sequence[str], layouts: Sequence[str], archs: Sequence[str],
               families: Sequence[str], orders: Sequence[str] = ("pointwise_first",)) -> List[Unit]:
    units = []
    for arch in archs:
        for shape in shapes:
            for dtype in dtypes:
                for family in families:
                    if family == BASELINE and (dtype, arch) != ("bf16", "sm90"):
                        continue
                    # The merge reads weights only: the activation layout does not reach it.
                    for layout in (layouts[:1] if family == "merge" else layouts):
                        for order in orders:
                            units.append(Unit(family, shape, "-" if family == "merge" else layout, dtype, arch,
                                              order))
    return units


def run_audit(units: Sequence[Unit], workers: int = 0, stream=sys.stderr) -> List[dict]:
    """Record every unit, compile each distinct specialisation once (in `workers` processes), return the rows."""
    _refuse_interpreter()
    recorded, jobs = _distinct_jobs(units)
    print(f"[audit] {len(units)} launch sets, {len(recorded)} (launch, config) pairs, {len(jobs)} distinct "
          f"compilations", file=stream, flush=True)
    results = _run_jobs(_worker_compile, jobs, workers, stream)
    return [row(unit, launch, config, results[key]) for unit, launch, config, key in recorded]


def warm_cache(units: Sequence[Unit], workers: int = 0, stream=sys.stderr) -> Tuple[int, List[str]]:
    """Compile every distinct specialisation the units launch (every config their autotuners may try) into
    Triton's cache, in `workers` processes: a later launch of the same specialisation on that target loads the
    binary instead of compiling it. Returns (distinct compilations, the errors, one line each)."""
    _refuse_interpreter()
    _, jobs = _distinct_jobs(units)
    print(f"[audit] warming Triton's cache: {len(jobs)} distinct compilations", file=stream, flush=True)
    results = _run_jobs(_worker_warm, jobs, workers, stream)
    return len(jobs), [f"{key[0]}: {error}" for key, error in results.items() if error]


def _refuse_interpreter() -> None:
    if _common.INTERPRET:
        raise RuntimeError("colora_fused.audit compiles the kernels for a GPU: run it without TRITON_INTERPRET=1 "
                           "(under the interpreter the kernels are not compiled)")


# --- reports ---------------------------------------------------------------------------------------------------

HEADLINE = dict(layout="channels_last", dtype="bf16", arch="sm90")


def _best_key(r: dict) -> tuple:
    """A config's rank among those of one kernel and shape: the estimated share, then fewer instructions per MMA."""
    return r["est_tensor_share"] or 0, -(r["instrs_per_mma"] or 0)


def _tables_order(rows: Sequence[dict]) -> List[dict]:
    """The rows of the order the report's tables show (pointwise_first; `--order` adds rows to the CSV)."""
    return [r for r in rows if r.get("order", "pointwise_first") == "pointwise_first"]


def summary(rows: Sequence[dict]) -> List[dict]:
    """Per kernel and shape (bf16, channels_last, sm_90): the config with the best estimated share, and the worst
    spills and shared memory over all configs."""
    groups: Dict[tuple, List[dict]] = {}
    for r in _tables_order(rows):
        if r["family"] == "merge" or all(r[k] == v for k, v in HEADLINE.items()):
            if r["dtype"] == "bf16" and r["arch"] == "sm90":
                groups.setdefault((r["family"], r["kernel"], r["shape"]), []).append(r)
    out = []
    for (family, kernel, shape), rs in groups.items():
        best = max(rs, key=_best_key)
        out.append(dict(family=family, kernel=kernel, shape=shape, configs=len(rs), best_config=best["config"],
                        grid=best["grid"], waves=best["waves"], mma=best["mma"],
                        instrs_per_mma=best["instrs_per_mma"], loop_waits=best["loop_waits"],
                        outer_instrs=best["outer_instrs"],
                        est_tensor_share=best["est_tensor_share"], regs=best["regs"],
                        max_spill=max(r["spill_bytes"] for r in rs), max_smem=max(r["smem"] for r in rs)))
    return out


def merge_cost(rows: Sequence[dict]) -> List[dict]:
    """Per shape (bf16, sm_90, both layouts): the fused forward's main loop at its best config beside the same
    loop compiled without the merge (`forward_plain`, same config): what building K0 + ΔK in registers costs."""
    rows = _tables_order(rows)
    plain = {(r["shape"], r["layout"], r["config"]): r for r in rows if r["family"] == BASELINE}
    by_shape: Dict[tuple, List[dict]] = {}
    for r in rows:
        if r["family"] == "forward" and r["dtype"] == "bf16" and r["arch"] == "sm90" and r["loop_instrs"]:
            by_shape.setdefault((r["shape"], r["layout"]), []).append(r)
    out = []
    for (shape, layout), rs in by_shape.items():
        r = max(rs, key=_best_key)
        base = plain.get((shape, layout, r["config"]))
        if base and base["loop_instrs"]:
            out.append(dict(shape=shape, layout=layout, config=r["config"], loop_instrs=r["loop_instrs"],
                            plain_loop_instrs=base["loop_instrs"],
                            ratio=round(r["loop_instrs"] / base["loop_instrs"], 2),
                            est_tensor_share=r["est_tensor_share"], plain_est_tensor_share=base["est_tensor_share"]))
    return out


def _markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def problems(rows: Sequence[dict]) -> List[str]:
    """What breaks the rules the CI tests hold the kernels to (for the report)."""
    found = []
    for r in rows:
        where = f"{r['kernel']} {r['shape']} {r['layout']} {r['dtype']} {r['arch']} {r['config']}"
        if r.get("order", "pointwise_first") != "pointwise_first":
            where += f" {r['order']}"
        if r["error"]:
            found.append(f"{where}: compile error {r['error']}")
        elif r["smem"] > r["smem_limit"]:
            found.append(f"{where}: shared memory {r['smem']} B over the {r['smem_limit']} B per block")
        elif r["spill_bytes"] > 0:
            found.append(f"{where}: {r['spill_bytes']} B of spills")
    return found


def strict_problems(rows: Sequence[dict]) -> List[str]:
    """The findings that fail `--strict`: compile errors and shared-memory overflows in any dtype, spills in
    bf16/fp16."""
    return problems([r for r in rows if r["error"] or r["smem"] > r["smem_limit"] or r["dtype"] != "fp32"])


def write_reports(rows: Sequence[dict], out: str, env: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "env.json"), "w") as f:
        json.dump(env, f, indent=2)
        f.write("\n")
    summary_cols = ("family", "kernel", "shape", "configs", "best_config", "grid", "waves", "mma", "instrs_per_mma",
                    "loop_waits", "outer_instrs", "est_tensor_share", "regs", "max_spill", "max_smem")
    found = problems(rows)
    text = [
        "# Static audit of the Triton kernels (compile-time estimates, not timings)",
        "",
        f"Command: `{env['command']}`. Compiled on {env['host']} for {', '.join(env['targets'])} with Triton "
        f"{env['triton']}; no GPU ran anything. Model: `colora_fused/audit/core.py` (docstring). The estimated "
        "tensor-core share is an upper bound from issue slots: `tensor / max(tensor, issue)` per main-loop "
        "iteration, with `issue = loop SASS instructions × warps / 4` and `tensor = MMA FLOPs / peak FLOP per "
        "cycle per SM`.",
        "",
        "The `nchw` rows audit what an NCHW input runs: the launchers stage NCHW activations and weights "
        "channels-innermost with one copy before the kernel (`kernels._common.channels_innermost`), so their "
        "kernels are the channels-last ones; the copy (one read and one write of the tensor, memory-bound) is not "
        "in the estimate.",
        "",
        "## Summary: bf16, channels_last, sm_90, best config per kernel and shape",
        "",
        _markdown_table(summary(rows), summary_cols),
        "",
        "`loop_waits`: wgmma waits for zero pending groups inside the main loop (each serialises the tensor core "
        "behind the loop's other work). `max_spill` / `max_smem`: the worst over every config the autotuner may "
        "launch for that shape.",
        "",
        "## What the merge costs the fused forward (bf16, sm_90)",
        "",
        "The forward's main loop at its best config beside the same loop compiled with `MERGE=False` (a "
        "convolution by K0 alone, family `forward_plain`): `ratio` is loop instructions with the merge over "
        "without.",
        "",
        _markdown_table(merge_cost(rows), ("shape", "layout", "config", "loop_instrs", "plain_loop_instrs", "ratio",
                                           "est_tensor_share", "plain_est_tensor_share")),
        "",
        "## Findings: spills, shared memory over the per-block limit, compile errors (every row)",
        "",
        "\n".join(f"- {p}" for p in found) if found else "None.",
        "",
        f"All {len(rows)} rows (every kernel, config, shape, layout, dtype and target) are in `results.csv`.",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(text))


def environment(argv: Sequence[str], archs: Sequence[str], seconds: float) -> dict:
    """env.json: the command, what every tool records (`toolbox.environment`), the targets and the time taken."""
    return dict(command="python -m colora_fused.audit " + " ".join(argv),
                host=platform.processor() or platform.machine(), **toolbox_environment(),
                targets=[ARCHS[a].name for a in archs], archs={a: asdict(ARCHS[a]) for a in archs},
                seconds=round(seconds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="colora-audit", description=__doc__.split("\n\n")[0] + " Results are compile-time estimates.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="audit-results",
                   help="folder for results.md, results.csv and env.json (the committed audit is "
                        "benchmarks/results/audit-sm90: pass it to regenerate that one)")
    p.add_argument("--arch", action="append", choices=tuple(ARCHS),
                   help="target(s); default: sm90, and sm80 in bf16 and channels_last")
    p.add_argument("--dtype", action="append", choices=tuple(DTYPES), help="dtype(s); default: all three")
    p.add_argument("--layout", action="append", choices=LAYOUTS, help="activation layout(s); default: both")
    p.add_argument("--family", action="append", choices=FAMILIES, help="kernel families; default: all")
    p.add_argument("--order", action="append", choices=ORDERS,
                   help="adapter order(s); default: pointwise_first (the tables' rows)")
    p.add_argument("--shape", action="append", metavar="NAME",
                   help="shape name(s) from the table: " + ", ".join(s.name for s in SHAPES + QUICK_SHAPES))
    p.add_argument("--quick", action="store_true", help="the small CI shapes instead of the model shapes")
    p.add_argument("--workers", type=int, default=0, help="compile processes (0: one per CPU)")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 on a compile error, a shared-memory overflow or a bf16/fp16 spill (the "
                        "rules CI holds the kernels to); fp32 spills are reported, not fatal")
    return p


def run(argv: Optional[Sequence[str]] = None) -> List[dict]:
    """The audit as the command line asks for it; writes the reports and returns the rows."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    table = QUICK_SHAPES if args.quick else SHAPES
    known = {s.name: s for s in SHAPES + QUICK_SHAPES}
    unknown = [n for n in args.shape or () if n not in known]
    if unknown:
        raise SystemExit(f"colora-audit: unknown shape(s) {unknown}; choose from {sorted(known)}")
    shapes = [known[n] for n in args.shape] if args.shape else table
    dtypes, layouts, families = args.dtype or list(DTYPES), args.layout or list(LAYOUTS), args.family or FAMILIES
    orders = args.order or ["pointwise_first"]
    if args.arch:
        archs, units = args.arch, plan_units(shapes, dtypes, layouts, args.arch, families, orders)
    else:
        # By default sm_80 (no wgmma) is audited in bf16 and channels_last only, which keeps the run within
        # 10 minutes on 2 cores; `--arch sm80` audits it in full.
        archs = list(ARCHS)
        sm80_dtypes = [d for d in dtypes if d == "bf16"]
        sm80_layouts = [lay for lay in layouts if lay == "channels_last"]
        units = (plan_units(shapes, dtypes, layouts, ["sm90"], families, orders)
                 + plan_units(shapes, sm80_dtypes, sm80_layouts, ["sm80"], families, orders))
    start = time.monotonic()
    rows = run_audit(units, args.workers)
    write_reports(rows, args.out, environment(argv, archs, time.monotonic() - start))
    print(_markdown_table(summary(rows), ("kernel", "shape", "best_config", "grid", "mma", "instrs_per_mma",
                                          "est_tensor_share", "max_spill", "max_smem")))
    print(f"\n{len(problems(rows))} finding(s); wrote {args.out}/results.md, results.csv, env.json")
    fatal = strict_problems(rows)
    if args.strict and fatal:
        print("\n".join(["colora-audit --strict: what breaks the rules:"] + fatal), file=sys.stderr)
        raise SystemExit(1)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The `colora-audit` command."""
    run(argv)
