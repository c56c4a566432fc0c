"""colora-bench's layer mode: each distinct conv shape of a model, as a plain conv, a trainable conv, a CoLoRA
layer on each backend and a PEFT LoRA layer, timed side by side for a forward pass and a training step, with the
same intervals and verdicts as model mode (bench_stats) per shape and for the sum over the model's convs."""
import copy
import dataclasses
import math
from collections import Counter
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .common import (COLORA_BACKENDS, MAX_REPS, Config, Progress, failure_status, interleaved_times,
                     peak_tflops, method_rank, quantiles, release_memory, split_method)
from .model_mode import build_base_model, inject_lora, matched_lora_ranks
from .stats import REFERENCE, compare, round_means
from ..functional import timed_ms
from ..layers import CONV_TO_COLORA

@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One conv of a model, with the spatial size of its input, as the layer benchmark builds it."""

    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: object  # a tuple of ints, or "same" / "valid"
    dilation: Tuple[int, ...]
    groups: int
    bias: bool
    padding_mode: str
    input_size: Tuple[int, ...]
    output_size: Tuple[int, ...]

    @classmethod
    def of(cls, conv: nn.modules.conv._ConvNd, x: torch.Tensor, out: torch.Tensor) -> "ConvShape":
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), conv.padding,
                   tuple(conv.dilation), conv.groups, conv.bias is not None, conv.padding_mode,
                   tuple(x.shape[2:]), tuple(out.shape[2:]))

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, input_size: Sequence[int]) -> "ConvShape":
        """The shape of `conv` applied to an input of this spatial size (worked out on the meta device)."""
        meta = copy.deepcopy(conv).to("meta")
        x = torch.empty(1, conv.in_channels, *input_size, device="meta")
        return cls.of(meta, x, meta(x))

    @property
    def label(self) -> str:
        times = "×".join
        text = (f"{self.in_channels}→{self.out_channels} {times(map(str, self.kernel_size))}"
                f" s{self.stride[0]} @{times(map(str, self.input_size))}")
        if self.groups > 1:
            text += f" g{self.groups}"
        if any(d > 1 for d in self.dilation):
            text += f" d{self.dilation[0]}"
        return text

    @property
    def taps(self) -> int:
        return math.prod(self.kernel_size)

    def forward_flops(self, batch: int) -> float:
        """F = 2·N·prod(out)·C_out·(C_in/groups)·prod(k) (design §5)."""
        return 2.0 * batch * math.prod(self.output_size) * self.out_channels * (
            self.in_channels // self.groups) * self.taps

    def ideal_flops(self, batch: int, method: str, mode: str) -> float:
        """The work the task needs, the same for every method doing it (design §5's cost model).

        forward: F. A training step with the input gradient: 2F for the frozen conv (forward, grad input); 3F for
        full fine-tuning (plus gradW); 2F + min(F, 2F/prod(k)) for an adapter (CoLoRA's cheap route, or gradW).
        """
        f = self.forward_flops(batch)
        if mode == "forward":
            return f
        base, _, _ = split_method(method)
        if base == "conv":
            return 2 * f
        if base == "full":
            return 3 * f
        return 2 * f + min(f, method_rank(method) * 2 * f / self.taps)

    def make_conv(self, device: torch.device) -> nn.modules.conv._ConvNd:
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(self.kernel_size)]
        return conv_cls(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                        self.dilation, self.groups, self.bias, self.padding_mode, device=device)


def model_conv_shapes(model: nn.Module, image_size: int) -> List[Tuple[ConvShape, int]]:
    """Each distinct conv shape of `model` at this image size, with how many of its convs have it, in order."""
    seen: Counter = Counter()
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.update([ConvShape.of(mod, args[0], out)]))
             for m in model.modules() if type(m) in CONV_TO_COLORA]
    was_training = model.training
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return list(seen.items())


def build_layer(shape: ConvShape, method: str, cfg: Config) -> nn.Module:
    """The module `method` trains for one conv: the frozen conv (`conv`, the floor), the trainable conv
    (`full`), a CoLoRA layer or a PEFT LoRA layer with CoLoRA's parameter count. Adapters get small random
    values so that no backend meets an all-zero ΔK."""
    base, _, compiled = split_method(method)
    torch.manual_seed(cfg.seed)
    conv = shape.make_conv(cfg.device)
    if base == "conv":
        layer = conv.requires_grad_(False)
    elif base == "full":
        layer = conv
    elif base == "peft-lora":
        holder = nn.ModuleDict({"conv": conv})
        inject_lora(holder, matched_lora_ranks({"conv": conv}))
        layer = holder["conv"]
        with torch.no_grad():
            for name, p in layer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 1e-2)
    else:
        layer = CONV_TO_COLORA[type(conv)].from_conv(conv, backend=COLORA_BACKENDS[base], rank=method_rank(method))
        with torch.no_grad():
            layer.depthwise.normal_(0.0, 1e-2)
    if cfg.channels_last and len(shape.kernel_size) == 2:
        layer = layer.to(memory_format=torch.channels_last)
    return torch.compile(layer) if compiled else layer


def layer_runners(layer: nn.Module, shape: ConvShape, cfg: Config) -> Dict[str, Callable[[], None]]:
    """{"forward": forward without autograd, "step": forward + backward with the input gradient required}."""
    x = torch.randn(cfg.batch, shape.in_channels, *shape.input_size, device=cfg.device)
    if cfg.channels_last and len(shape.kernel_size) == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad(), cfg.autocast():
        grad_out = torch.randn_like(layer(x))

    def forward() -> None:
        with torch.no_grad(), cfg.autocast():
            layer(x)

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        with cfg.autocast():
            out = layer(x)
        out.backward(grad_out)

    return {"forward": forward, "step": step}


def auto_path(shape: ConvShape, mode: str, cfg: Config) -> str:
    """The path a CoLoRA layer with backend="auto" takes for this shape in this mode (`chosen_backend`): on
    CUDA whichever of triton and torch measures faster (measured here if not yet), elsewhere torch; "error: ..."
    when the layer cannot be built or run."""
    try:
        layer = build_layer(shape, "colora-auto", cfg)
        x = torch.randn(cfg.batch, shape.in_channels, *shape.input_size, device=cfg.device)
        if cfg.channels_last and len(shape.kernel_size) == 2:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.set_grad_enabled(mode == "step"), cfg.autocast():
            return layer.chosen_backend(x)
    except Exception as err:  # reported in its cell; the timings go on
        return failure_status(err)


def repeated(fn: Callable[[], None], cfg: Config) -> Tuple[Callable[[], None], int]:
    """`fn` called back to back often enough that one timed sample lasts about cfg.sample_ms, and that count."""
    fn()
    once = timed_ms(fn, cfg.device)
    reps = max(1, min(MAX_REPS, math.ceil(cfg.sample_ms / max(once, 1e-3))))

    def run() -> None:
        for _ in range(reps):
            fn()

    return run, reps


def ratio_fields(per_round: Dict[str, List[float]], method: str) -> dict:
    """A row's ratios from the methods' paired per-round times: time / the plain conv's and the speed-up over
    full, each with its interval (bench_stats.compare), and the verdict on the latter."""
    fields = {}
    if "conv" in per_round:
        v = compare(per_round["conv"], per_round[method])
        fields.update(ratio_vs_conv=1 / v.speedup, ratio_vs_conv_low=1 / v.high, ratio_vs_conv_high=1 / v.low)
    if method == "full":
        fields.update(speedup_vs_full=1.0, speedup_vs_full_low=1.0, speedup_vs_full_high=1.0, verdict=REFERENCE)
    elif "full" in per_round:
        v = compare(per_round["full"], per_round[method])
        fields.update(speedup_vs_full=v.speedup, speedup_vs_full_low=v.low, speedup_vs_full_high=v.high,
                      verdict=v.verdict, rounds_to_settle=v.rounds_to_settle,
                      verdict_words=v.words("full fine-tuning"))
    return fields


def bench_layers(model_name: str, cfg: Config, progress: Progress) -> List[dict]:
    """Rows of results.csv in layer mode: per distinct conv shape, method and mode (forward / step)."""
    shapes = model_conv_shapes(build_base_model(model_name, cfg), cfg.image_size)
    release_memory(cfg.device)
    return bench_shapes(model_name, shapes, cfg, progress)


def bench_shapes(model_name: str, shapes: Sequence[Tuple[ConvShape, int]], cfg: Config,
                 progress: Progress) -> List[dict]:
    """Layer mode's rows for these (shape, count) pairs, reported under `model_name` (the GPU check times its
    headline shapes this way)."""
    progress.add_total(len(shapes) * len(cfg.methods) * 2 * (cfg.warmup + cfg.rounds * cfg.steps_per_round))
    peak = peak_tflops(cfg.device, cfg.dtype)
    rows = []
    totals: Dict[Tuple[str, str], List[float]] = {}  # (method, mode) → [Σ count·ms, Σ count·flops]
    round_totals: Dict[Tuple[str, str], List[float]] = {}  # (method, mode) → per round, Σ count·ms
    failed_totals = set()
    for i, (shape, count) in enumerate(shapes, 1):
        what = f"{model_name} shape {i}/{len(shapes)} {shape.label}"
        progress.phase(f"{what}: building {len(cfg.methods)} layers")
        status = {m: "ok" for m in cfg.methods}
        runners: Dict[str, Dict[str, Callable[[], None]]] = {}
        for method in cfg.methods:
            try:
                runners[method] = layer_runners(build_layer(shape, method, cfg), shape, cfg)
            except Exception as err:
                status[method] = failure_status(err)
                progress.message(f"colora-bench: {shape.label} {method}: {status[method]}")
        for mode in ("forward", "step"):
            auto = auto_path(shape, mode, cfg)
            mode_status = dict(status)
            label = lambda m: f"{model_name} {shape.label} {m} {mode}"  # noqa: E731
            calls, reps = {}, {}
            for method, fns in runners.items():
                try:
                    calls[method], reps[method] = repeated(fns[mode], cfg)
                except Exception as err:
                    mode_status[method] = failure_status(err)
                    progress.message(f"colora-bench: {label(method)}: {mode_status[method]}")
            times = interleaved_times(calls, cfg, mode_status, progress, f"{what} {mode}", label)
            medians = {m: tuple(v / reps[m] for v in quantiles([ms for steps in t for ms in steps]))
                       for m, t in times.items()}
            per_round = {m: [ms / reps[m] for ms in round_means(t)] for m, t in times.items()}
            for method in cfg.methods:
                row = dict(model=model_name, layer=shape.label, count=count, method=method, mode=mode,
                           auto_path=auto, status=mode_status[method], batch=cfg.batch, in_channels=shape.in_channels,
                           out_channels=shape.out_channels, kernel="×".join(map(str, shape.kernel_size)),
                           stride=shape.stride[0], groups=shape.groups,
                           input_size="×".join(map(str, shape.input_size)))
                if method not in medians:
                    failed_totals.add((method, mode))
                    rows.append(row)
                    continue
                p20, median, p80 = medians[method]
                flops = shape.ideal_flops(cfg.batch, method, mode)
                row.update(ms=median, ms_p20=p20, ms_p80=p80, gflop=flops / 1e9,
                           tflops=flops / (median / 1e3) / 1e12, rounds=len(per_round[method]))
                row["peak_fraction"] = row["tflops"] / peak if peak else None
                row.update(ratio_fields(per_round, method))
                total = totals.setdefault((method, mode), [0.0, 0.0])
                total[0] += count * median
                total[1] += count * flops
                by_round = round_totals.setdefault((method, mode), [0.0] * len(per_round[method]))
                for r, ms in enumerate(per_round[method]):
                    by_round[r] += count * ms
                rows.append(row)
        runners.clear()
        release_memory(cfg.device)
    for mode in ("forward", "step"):
        # Round r of every shape pairs the methods as each shape's round r does: the per-round sums pair too.
        sums = {m: totals[(m, mode)] for m in cfg.methods if (m, mode) in totals and (m, mode) not in failed_totals}
        by_round = {m: round_totals[(m, mode)] for m in sums}
        for method, (ms, flops) in sums.items():
            tflops = flops / (ms / 1e3) / 1e12
            rows.append(dict(model=model_name, layer="all convs", count=sum(c for _, c in shapes), method=method,
                             mode=mode, status="ok", batch=cfg.batch, ms=ms, gflop=flops / 1e9, tflops=tflops,
                             peak_fraction=tflops / peak if peak else None, rounds=len(by_round[method]),
                             **ratio_fields(by_round, method)))
    for method, reason in cfg.skipped.items():
        rows.append(dict(model=model_name, layer="", method=method, status=f"skipped: {reason}"))
    return rows

