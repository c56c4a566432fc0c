"""The staged GPU check: what the first minutes on a GPU must tell, phase by phase, each writing as it goes.

    bash benchmarks/gpu_check.sh OUT              # every phase under its own timeout: about 8 minutes on an H100
    bash benchmarks/gpu_check.sh --dry-run OUT    # the same phases on CPU, torch backends, tiny shapes (CI runs it)

The shell script runs the phases one after another, each in its own process and under its own timeout, and adds
a row per phase to OUT/timeline.csv, so that an overrun costs one phase only. The phases of this file:

    env      the GPU (name, capability, SMs, shared memory), the versions → env.json
    warmup   compiles, in parallel processes, every kernel specialisation the later phases launch, for this GPU
             (the audit's recorder and compiler, `colora_fused.audit.warm_cache`): it fills Triton's cache
    kernels  every kernel family (forward, input gradient, adapter gradients on each route, merge, multi-layer
             merge) against the float64 reference at every config the autotuner may launch for the headline
             shapes, bf16 and fp32, both orders → kernels.csv, a row per launch
    layers   the headline shapes timed side by side: cuDNN's plain conv, a full fine-tuning step, CoLoRA on
             torch / hybrid / triton, forward and step (colora-bench's layer mode) → layers/
    report   summary.md from whatever the phases wrote
(between warmup and kernels the shell script runs the kernel tests, pytest -v streamed to tests.log; after
layers, the model throughput with colora-bench → model/.)
"""
import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from cases import TOLERANCE, TOLERANCE_TF32, assert_close  # noqa: E402  (the tests' tolerances: one table)
from colora_fused._conv import ORDERS, adapter_shapes, conv_output_shape  # noqa: E402
from colora_fused.reference import colora_conv_reference, delta_weight_reference  # noqa: E402

# The headline shapes (batch 64): ResNet-50's 3×3 convs at 14², 7² and its strided 128-channel one, VGG-16's 3×3 at
# 28², plus a 1×1 and the 7×7 stem (49 taps: the two-kernel adapter route) for the kernel check.
TIMED_SHAPES = ("r50-3x3-256@14", "r50-3x3-512@7", "r50-3x3-128-s2@56", "vgg16-3x3-512@28")
EXTRA_KERNEL_SHAPES = ("r50-1x1-1024>256@14", "r50-7x7-stem@224")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FAMILIES = ("forward", "input_grad", "adapters", "adapters_cheap", "adapters_gradw", "adapters_two_pass", "merge",
            "merge_many")
KERNEL_FIELDS = ("family", "shape", "dtype", "order", "config_index", "configs", "ok", "max_rel_err", "atol",
                 "rtol", "ms", "error")


@dataclasses.dataclass(frozen=True)
class CheckShape:
    """A conv of the check: input [N, C_in, *spatial], weight [C_out, C_in/groups, *k], square stride/padding."""
    name: str
    x: tuple
    weight: tuple
    stride: int = 1
    padding: int = 1
    groups: int = 1
    bias: bool = False


def shapes(dry_run: bool) -> Dict[str, CheckShape]:
    if dry_run:  # CPU, torch backends: a conv and a strided one of a few channels
        return {s.name: s for s in (CheckShape("tiny-3x3-16@8", (2, 16, 8, 8), (16, 16, 3, 3), bias=True),
                                    CheckShape("tiny-3x3-8-s2@8", (2, 8, 8, 8), (8, 8, 3, 3), stride=2))}
    from colora_fused.audit.core import SHAPES
    table = {s.name: CheckShape(s.name, s.x, s.weight, s.stride, s.padding, s.groups, s.bias) for s in SHAPES}
    table["r50-7x7-stem@224"] = CheckShape("r50-7x7-stem@224", (64, 3, 224, 224), (64, 3, 7, 7), 2, 3)
    return {name: table[name] for name in TIMED_SHAPES + EXTRA_KERNEL_SHAPES}


def append_row(path: str, row: dict, fields: Sequence[str]) -> None:
    """One CSV row, flushed at once (a header first in a new file): what a phase measured survives its timeout."""
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def say(text: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- env --------------------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """What every tool records (`colora_fused.toolbox.environment`: versions, CPU, the GPU's properties), the
    device and the host's name."""
    from colora_fused.toolbox import environment as tool_environment
    return dict(tool_environment(device), device=str(device), host=platform.node())


def phase_env(out: str, device: torch.device) -> None:
    env = environment(device)
    with open(os.path.join(out, "env.json"), "w", encoding="utf-8") as f:
        json.dump(env, f, indent=2)
        f.write("\n")
    say("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))


# --- warmup -----------------------------------------------------------------------------------------------------

def model_shapes(image_size: int, batch: int) -> List[CheckShape]:
    """ResNet-50's and VGG-16's convs at this size, as the model phase runs them (torchvision, meta device)."""
    import torchvision
    found = {}
    for name in ("resnet50", "vgg16"):
        model = getattr(torchvision.models, name)(weights=None).to("meta")
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        sizes = {}

        def hook(mod, args, _):
            sizes[mod] = tuple(args[0].shape[2:])

        hooks = [m.register_forward_hook(hook) for m in convs]
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
        for hook in hooks:
            hook.remove()
        for m in convs:
            key = (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.groups, m.bias is not None,
                   sizes[m])
            found.setdefault(key, CheckShape(
                f"{name}-{m.kernel_size[0]}x{m.kernel_size[1]}-{m.in_channels}>{m.out_channels}-s{m.stride[0]}"
                f"@{sizes[m][0]}", (batch, m.in_channels, *sizes[m]), (m.out_channels, m.in_channels // m.groups,
                                                                       *m.kernel_size),
                m.stride[0], m.padding[0], m.groups, m.bias is not None))
    return list(found.values())


def warm_units(device: torch.device, dry_run: bool):
    """What the later phases launch, as audit units for this GPU (sm_90 in a dry run): the headline shapes in
    every family, dtype and order; the models' shapes as the model phase runs them (bf16, channels_last, the
    launcher's route)."""
    from colora_fused.audit import core as audit
    arch = "sm90" if dry_run else audit.live_arch(device)

    def unit(family, s, dtype, order):
        shape = audit.Shape(s.name, s.x, s.weight, s.stride, s.padding, s.groups, s.bias)
        return audit.Unit(family, shape, "-" if family == "merge" else "channels_last", dtype, arch, order)

    units = [unit(f, s, d, o) for s in shapes(dry_run).values() for d in DTYPES for o in ORDERS
             for f in FAMILIES if f != "merge_many"]
    units += [unit(f, s, "bf16", "pointwise_first") for s in model_shapes(224, 64)
              for f in ("forward", "input_grad", "adapters", "merge")]
    return list(dict.fromkeys(units))


def phase_warmup(out: str, device: torch.device, dry_run: bool) -> None:
    from colora_fused.audit import core as audit
    units = warm_units(device, dry_run)
    if dry_run:  # no GPU to compile for: record every unit's launches (what the compile would start from)
        launches = sum(len(configs) for unit in units for _, configs in audit.record(unit))
        say(f"warmup (dry run): {len(units)} launch sets recorded for sm_90, {launches} (launch, config) pairs; "
            "nothing compiled")
        return
    start = time.monotonic()
    compiled, errors = audit.warm_cache(units, workers=os.cpu_count() or 1, stream=sys.stdout)
    say(f"warmup: {len(units)} launch sets, {compiled} distinct compilations in {time.monotonic() - start:.0f} s, "
        f"{len(errors)} compile error(s)")
    with open(os.path.join(out, "warmup-errors.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(errors) + ("\n" if errors else ""))
    for line in errors[:20]:
        say("  " + line)


# --- kernels ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    """One conv's inputs (the check's dtype, channels_last) and its float64 reference: output and gradients."""
    shape: CheckShape
    order: str
    dtype: torch.dtype
    t: dict
    grad_out: torch.Tensor
    ref: dict

    @property
    def conv(self):
        nd = len(self.shape.weight) - 2
        return ([self.shape.stride] * nd, [self.shape.padding] * nd, [1] * nd, self.shape.groups, self.order)


def make_problem(s: CheckShape, order: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    c_in_g = s.weight[1]
    fan_in = c_in_g * s.weight[2] * s.weight[3]
    kp_shape, kd_shape = adapter_shapes(s.weight, s.groups, order)
    cl = torch.channels_last
    t = dict(x=rnd(*s.x).contiguous(memory_format=cl), weight=rnd(*s.weight, scale=fan_in ** -0.5).contiguous(
        memory_format=cl), pointwise=rnd(*kp_shape, scale=c_in_g ** -0.5), depthwise=rnd(*kd_shape, scale=0.5),
             bias=rnd(s.weight[0]) if s.bias else None, bias_delta=rnd(s.weight[0], scale=0.1) if s.bias else None)
    out_shape = conv_output_shape(s.x, s.weight, [s.stride] * 2, [s.padding] * 2, [1, 1])
    grad_out = rnd(*out_shape).contiguous(memory_format=cl)
    t64 = {k: None if v is None else v.detach().double().requires_grad_(k != "weight" and k != "bias")
           for k, v in t.items()}
    out = colora_conv_reference(t64["x"], t64["weight"], t64["bias"], t64["pointwise"], t64["depthwise"],
                                t64["bias_delta"], s.stride, s.padding, 1, s.groups, order=order)
    out.backward(grad_out.double())
    ref = dict(out=out.detach(), x=t64["x"].grad, pointwise=t64["pointwise"].grad, depthwise=t64["depthwise"].grad,
               bias_delta=None if t64["bias_delta"] is None else t64["bias_delta"].grad,
               merged=t64["weight"].detach() + delta_weight_reference(t64["pointwise"].detach(),
                                                                      t64["depthwise"].detach(), s.groups, order))
    return Problem(s, order, dtype, t, grad_out, ref)


def run_family(family: str, p: Problem):
    """The family's launcher on the problem: [(what, result, reference)]."""
    from colora_fused._conv import MergeSpec
    from colora_fused.kernels import merge
    from colora_fused.kernels.conv_bwd_adapters import colora_conv_backward_adapters
    from colora_fused.kernels.conv_bwd_input import colora_conv_backward_input
    from colora_fused.kernels.conv_fwd import colora_conv_forward
    t, r = p.t, p.ref
    if family == "forward":
        out = colora_conv_forward(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                                  *p.conv)
        return [("out", out, r["out"])]
    if family == "input_grad":
        dx = colora_conv_backward_input(p.grad_out, t["weight"], t["pointwise"], t["depthwise"], t["x"].shape,
                                        True, *p.conv)
        return [("x", dx, r["x"])]
    if family.startswith("adapters"):
        from colora_fused.audit.core import adapter_route
        dkp, dkd = colora_conv_backward_adapters(
            t["x"], p.grad_out, t["weight"], t["pointwise"], t["depthwise"], *p.conv,
            route=adapter_route(family, t["x"].shape, t["weight"].shape, p.grad_out.shape, p.order))
        return [("pointwise", dkp, r["pointwise"]), ("depthwise", dkd, r["depthwise"])]
    groups, order = p.shape.groups, p.order
    if family == "merge":
        in_place = t["weight"].clone()
        merge.merge_(in_place, None, t["pointwise"], t["depthwise"], None, groups, order)
        return [("merged in place", in_place, r["merged"])]
    # merge_many: this layer and a second one (another shape, the same dtype) in one launch
    other = torch.randn(8, p.shape.weight[1], 3, 3, device=t["weight"].device).to(t["weight"].dtype)
    kp2, kd2 = adapter_shapes(other.shape, 1, order)
    kp2 = torch.randn(kp2, device=other.device).to(other.dtype)
    kd2 = torch.randn(kd2, device=other.device).to(other.dtype)
    ref2 = other.double() + delta_weight_reference(kp2.double(), kd2.double(), 1, order)
    first = t["weight"].clone()
    merge.merge_many_([MergeSpec(first, None, t["pointwise"], t["depthwise"], None, groups, order),
                       MergeSpec(other, None, kp2, kd2, None, 1, order)])
    return [("layer 1", first, r["merged"]), ("layer 2", other, ref2)]


def family_tuners(family: str, p: Problem, arch: str) -> list:
    """The autotuned kernels the family's launcher launches for this problem (recorded on meta tensors for this
    GPU), each with the number of configs its prune keeps."""
    from colora_fused.audit import core as audit
    from triton.runtime.autotuner import Autotuner
    if family in ("merge", "merge_many"):
        return []
    shape = audit.Shape(p.shape.name, p.shape.x, p.shape.weight, p.shape.stride, p.shape.padding, p.shape.groups,
                        p.shape.bias)
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[p.dtype]
    launches = audit.record(audit.Unit(family, shape, "channels_last", dtype, arch, p.order))
    return [(launch.kernel, len(configs)) for launch, configs in launches if isinstance(launch.kernel, Autotuner)]


def config_text(config) -> str:
    """A triton.Config as `BLOCK_M=128 BLOCK_N=64 w4 s3`."""
    return " ".join([f"{k}={v}" for k, v in config.kwargs.items()] + [f"w{config.num_warps}", f"s{config.num_stages}"])


def tolerance(dtype: torch.dtype, device: torch.device):
    return TOLERANCE_TF32 if dtype == torch.float32 and device.type == "cuda" else TOLERANCE[dtype]


def check_launch(family: str, p: Problem, index: int, tuners: list, device: torch.device, out_csv: str) -> bool:
    from colora_fused.kernels._autotune import pinned_config
    atol, rtol = tolerance(p.dtype, device)
    row = dict(family=family, shape=p.shape.name, dtype=str(p.dtype).replace("torch.", ""), order=p.order,
               config_index=index, atol=atol, rtol=rtol)
    ok, worst, error = True, 0.0, ""
    start = time.perf_counter()
    try:
        with pinned_config(index):
            results = run_family(family, p)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row["ms"] = round((time.perf_counter() - start) * 1e3, 2)
        for what, got, expected in results:
            scale = max(expected.abs().max().item(), 1e-12)
            worst = max(worst, (got.double() - expected).abs().max().item() / scale)
            try:
                assert_close(got, expected, p.dtype, f"{family} {what}", (atol, rtol))
            except AssertionError as exc:
                ok, error = False, str(exc).splitlines()[0][:300]
    except Exception as exc:  # a launch that fails is a finding of the check, not its end
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        ok, error = False, f"{type(exc).__name__}: {last}"[:300]
    row.update(ok=ok, max_rel_err=f"{worst:.3g}", error=error,
               configs=" + ".join(f"{k.base_fn.__name__.strip('_')} {config_text(k.best_config)}" for k, _ in tuners
                                  if getattr(k, "best_config", None) is not None))
    append_row(out_csv, row, KERNEL_FIELDS)
    return ok


def phase_kernels(out: str, device: torch.device, dry_run: bool) -> None:
    """Every family at every config the autotuner may launch (pinned one by one) against float64. A dry run
    takes the tiny shapes in fp32 through Triton's interpreter (the shell script sets TRITON_INTERPRET=1),
    which runs one fixed config."""
    from colora_fused.audit import core as audit
    from colora_fused.kernels import _common
    if _common.FIXED_CONFIG and not dry_run:
        raise SystemExit("the kernels phase checks the autotuner's configs: unset COLORA_TRITON_AUTOTUNE=0")
    out_csv = os.path.join(out, "kernels.csv")
    arch = "sm90" if dry_run else audit.live_arch(device)
    dtypes = [torch.float32] if dry_run else list(DTYPES.values())
    passed = failed = 0
    for s in shapes(dry_run).values():
        for dtype in dtypes:
            for order in ORDERS:
                p = make_problem(s, order, dtype, device)
                for family in FAMILIES:
                    tuners = family_tuners(family, p, arch)
                    for index in range(max([n for _, n in tuners], default=1)):
                        if check_launch(family, p, index, tuners, device, out_csv):
                            passed += 1
                        else:
                            failed += 1
                say(f"kernels: {s.name} {dtype} {order}: {passed} launches agree with the reference, {failed} do "
                    "not, so far")
                del p
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# --- layers -----------------------------------------------------------------------------------------------------

def phase_layers(out: str, device: torch.device, dry_run: bool) -> None:
    from colora_fused.bench.common import Config, Progress, load_average
    from colora_fused.bench.layer_mode import ConvShape, bench_shapes
    from colora_fused.bench.report import write_outputs
    methods = ["conv", "full", "colora-torch"] + ([] if dry_run else ["colora-hybrid", "colora-triton"])
    cfg = Config(device=device, dtype="fp32" if dry_run else "bf16", batch=2 if dry_run else 64, image_size=0,
                 channels_last=True, mode="layers", models=["headline"], methods=methods, warmup=1 if dry_run else 5,
                 rounds=2 if dry_run else 6, steps_per_round=1, out=os.path.join(out, "layers"),
                 show_progress=True, command="benchmarks/gpu_check.py layers", load_at_start=load_average(),
                 sample_ms=2.0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(cfg.out, exist_ok=True)
    pairs = []
    for s in shapes(dry_run).values():
        if s.name in TIMED_SHAPES or dry_run:
            conv = torch.nn.Conv2d(s.x[1], s.weight[0], s.weight[2:], s.stride, s.padding, groups=s.groups,
                                   bias=s.bias)
            pairs.append((ConvShape.from_conv(conv, s.x[2:]), 1))
    with Progress(0, log_path=os.path.join(cfg.out, "progress.log"), show=True) as progress:
        rows = bench_shapes("headline", pairs, cfg, progress)
        write_outputs(rows, cfg)
    say(f"layers: wrote {cfg.out}/results.md")


# --- report -----------------------------------------------------------------------------------------------------

def _read_csv(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _tests_summary(out: str) -> str:
    path = os.path.join(out, "tests.log")
    if not os.path.exists(path):
        return "not run"
    lines = [line.strip() for line in open(path, encoding="utf-8", errors="replace") if line.strip()]
    finals = [line for line in lines if line.startswith("=") and (" passed" in line or " failed" in line)]
    if finals:
        return finals[-1].strip("= ")
    counts = {k: sum(1 for line in lines if f" {k.upper()}" in line) for k in ("passed", "failed", "skipped")}
    return (f"cut short (no final line): {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped so far")


def phase_report(out: str) -> str:
    env = json.load(open(os.path.join(out, "env.json"), encoding="utf-8")) if os.path.exists(
        os.path.join(out, "env.json")) else {}
    text = ["# GPU check", "",
            f"Device: {env.get('gpu') or env.get('device', '?')} (capability {env.get('capability', '-')}, "
            f"{env.get('sms', '-')} SMs); torch {env.get('torch')}, triton {env.get('triton')}, CUDA "
            f"{env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}.", "",
            "## Timeline", "", "| phase | seconds | status | Triton cache entries after |", "|---|---|---|---|"]
    for r in _read_csv(os.path.join(out, "timeline.csv")):
        text.append(f"| {r['phase']} | {r['seconds']} | {r['status']} | {r.get('triton_cache', '')} |")
    text += ["", "Status: ok, failed (exit code), or timeout (the phase ran past its limit; what it wrote is kept).",
             "", f"## Kernel tests (pytest, the tests' fixed configs): {_tests_summary(out)}", ""]
    kernels = _read_csv(os.path.join(out, "kernels.csv"))
    bad = [r for r in kernels if r["ok"] != "True"]
    text += [f"## Kernels at the autotuner's configs against float64: {len(kernels) - len(bad)} of {len(kernels)} "
             "launches agree", ""]
    if bad:
        text += ["| family | shape | dtype | order | config | max rel. err | error |", "|---|---|---|---|---|---|---|"]
        text += [f"| {r['family']} | {r['shape']} | {r['dtype']} | {r['order']} | {r['configs'] or r['config_index']}"
                 f" | {r['max_rel_err']} | {r['error']} |" for r in bad[:40]]
        text += [f"({len(bad) - 40} more in kernels.csv)" if len(bad) > 40 else "", ""]
    for name, title in (("layers", "Layer timings (colora-bench layer mode)"), ("model", "Model throughput")):
        path = os.path.join(out, name, "results.md")
        text += [f"## {title}", "", f"See [{name}/results.md]({name}/results.md)." if os.path.exists(path)
                 else "Not written (see the timeline).", ""]
    summary = "\n".join(text)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(summary)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("env", "warmup", "kernels", "layers", "report"))
    parser.add_argument("out", help="output folder")
    parser.add_argument("--dry-run", action="store_true", help="on CPU, torch backends, tiny shapes (CI)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.phase == "report":
        print(phase_report(args.out))
        return
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; --dry-run runs the phases on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    {"env": phase_env, "warmup": phase_warmup, "kernels": phase_kernels, "layers": phase_layers}[args.phase](
        *((args.out, device) if args.phase == "env" else (args.out, device, args.dry_run)))


if __name__ == "__main__":
    main()
