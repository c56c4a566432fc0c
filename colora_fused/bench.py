"""colora-bench: how much faster and leaner CoLoRA trains than the alternatives, measured on this machine.

    colora-bench                      # ResNet-50 and VGG-16, every method this machine can run
    colora-bench --model resnet18 --methods full,colora-torch --batch 16 --image-size 128
    colora-bench --layers             # each distinct conv shape: forward and training step, TFLOP/s
    python -m colora_fused.bench ...  # the same

Every method trains the same model on the same synthetic batch with the same AdamW loop, in rounds that
interleave the methods after a warm-up, so that clock and thermal drift hit them all alike. Peak memory is
measured separately, one method at a time, from a fresh copy of the model. Writes results.csv, results.md,
results.png and env.json under --out (default bench-results/<device>/, or bench-results/<device>/layers/).
"""
import argparse
import copy
import csv
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .functional import timed_ms, triton_available
from .model import apply_colora
from .modules import CONV_TO_COLORA

DEFAULT_MODELS = ("resnet50", "vgg16")
MODEL_METHODS = ("full", "head", "colora-eager", "colora-torch", "colora-triton", "peft-lora",
                 "colora-eager-kxk", "colora-torch-kxk", "colora-triton-kxk")
LAYER_METHODS = ("conv", "full", "colora-eager", "colora-torch", "colora-triton", "peft-lora")
COLORA_BACKENDS = {"colora-eager": "reference", "colora-torch": "torch", "colora-triton": "triton"}
COMPILE_SUFFIX = "+compile"
KXK_SUFFIX = "-kxk"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
MEMORY_STEPS = 2  # the first step allocates AdamW's state; the second runs with it resident
SAMPLE_MS = {"cuda": 2.0, "cpu": 20.0}  # layer mode's default --sample-ms
MAX_REPS = 100

# Dense bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' data sheets; the first substring found in the
# device name wins (so the PCIe/NVL parts come before the SXM one). fp32 and unknown devices get no peak.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)

# Defaults per device. The CPU ones keep the whole default run (both models, every method) to a few minutes
# on two cores; the CUDA ones are DESIGN §6's training setting.
DEFAULTS = {
    "cuda": dict(batch=64, image_size=224, dtype="bf16", channels_last=True, warmup=3, rounds=10,
                 steps_per_round=3),
    "cpu": dict(batch=8, image_size=64, dtype="fp32", channels_last=True, warmup=1, rounds=6, steps_per_round=1),
}
LAYER_DEFAULTS = {
    "cuda": dict(warmup=5, rounds=10, steps_per_round=5),
    "cpu": dict(warmup=1, rounds=3, steps_per_round=2),
}


class UsageError(ValueError):
    """Bad command-line input; `main` prints it as one `colora-bench: error: ...` line and exits with status 2."""


@dataclasses.dataclass
class Config:
    """One run's settings; the layer builders (and benchmarks/) need only the first five."""

    device: torch.device
    dtype: str  # a key of AMP_DTYPES
    batch: int
    image_size: int
    channels_last: bool
    mode: str = "model"  # or "layers"
    models: List[str] = dataclasses.field(default_factory=list)
    methods: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)  # method → why it cannot run here
    warmup: int = 1
    rounds: int = 3
    steps_per_round: int = 1
    num_classes: int = 1000
    seed: int = 0
    out: str = "bench-results"
    hide_progress: Optional[bool] = None  # tqdm's `disable`: None shows the bar on a terminal only
    command: str = "colora-bench"
    load_at_start: Optional[float] = None  # the 1-minute load average before the run (Unix)
    sample_ms: float = 20.0  # layer mode: a timed sample repeats the call until it lasts about this long

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.dtype]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def split_method(name: str) -> Tuple[str, bool, bool]:
    """`colora-torch-kxk+compile` → ("colora-torch", kxk=True, compiled=True)."""
    compiled = name.endswith(COMPILE_SUFFIX)
    name = name[:-len(COMPILE_SUFFIX)] if compiled else name
    kxk = name.endswith(KXK_SUFFIX)
    return (name[:-len(KXK_SUFFIX)] if kxk else name), kxk, compiled


def missing_dependency(method: str, device: torch.device) -> Optional[str]:
    """Why `method` cannot run on `device` in this environment, or None when it can."""
    base, _, _ = split_method(method)
    if base == "colora-triton":
        if device.type != "cuda":
            return f"needs a CUDA device (this run is on {device.type})"
        if not triton_available():
            return "needs triton (pip install triton)"
    if base == "peft-lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            return "needs peft (pip install peft, or pip install colora_fused[bench])"
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return slugify(f"cpu {cpu_name()} {torch.get_num_threads()}threads")


def peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def environment(cfg: Config) -> dict:
    def version(module: str) -> Optional[str]:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    import torchvision

    return {
        "device": device_name(cfg.device),
        "device_slug": device_slug(cfg.device),
        "mode": cfg.mode,
        "command": cfg.command,
        "models": cfg.models,
        "methods": cfg.methods,
        "skipped": cfg.skipped,
        "dtype": cfg.dtype,
        "batch": cfg.batch,
        "image_size": cfg.image_size,
        "channels_last": cfg.channels_last,
        "warmup": cfg.warmup,
        "rounds": cfg.rounds,
        "steps_per_round": cfg.steps_per_round,
        "num_classes": cfg.num_classes,
        "seed": cfg.seed,
        "sample_ms": cfg.sample_ms if cfg.mode == "layers" else None,
        "memory_metric": memory_metric(cfg.device),
        "peak_tflops": peak_tflops(cfg.device, cfg.dtype),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "triton": version("triton"),
        "peft": version("peft"),
        "cuda": torch.version.cuda,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": cfg.load_at_start,
        "load_average_at_end": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples: Sequence[float]) -> Tuple[float, float, float]:
    """(p20, median, p80), linearly interpolated."""
    p20, p50, p80 = torch.tensor(samples, dtype=torch.float64).quantile(
        torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)).tolist()
    return p20, p50, p80


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset VmHWM (the kernel's peak-RSS mark) to the current RSS (Linux ≥ 4.0); False where that is refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand glibc's free heap back to the kernel so that the RSS a measurement starts from is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_metric(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA allocator peak (max_memory_allocated above the level before the model was built)"
    return "peak RSS growth (VmHWM reset before the model was built, minus the RSS then)"


class PeakMemory:
    """Peak memory, in bytes, of what runs inside the block, above the level on entry.

    CUDA: the caching allocator's peak of allocated bytes. CPU (Linux): the process's peak resident set, reset
    through /proc/self/clear_refs on entry; elsewhere `peak` stays None. Both cover the model's copy, its
    gradients, the optimizer state and the activations of the steps run inside.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak: Optional[int] = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _malloc_trim()
            self._base = _proc_status_kib("VmRSS") * 1024 if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self._base
        return False


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return "out of memory" in text or "can't allocate memory" in text


def failure_status(err: BaseException) -> str:
    if is_oom(err):
        return "OOM"
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    return f"error: {type(err).__name__}: {first_line}"


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def classification_models() -> List[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_base_model(name: str, cfg: Config) -> nn.Module:
    import torchvision

    torch.manual_seed(cfg.seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=cfg.num_classes)
    model = model.to(cfg.device).train()
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def classifier_name(model: nn.Module) -> str:
    """The layer producing the logits: the model's last nn.Linear (SqueezeNet's is its last conv)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)][-1]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def target_convs(model: nn.Module, head: str, kxk: bool) -> List[str]:
    """The convs an adapter method wraps: every plain conv outside the classifier (with -kxk: prod(k) > 1)."""
    return [n for n, m in model.named_modules()
            if type(m) in CONV_TO_COLORA and not _within(n, head) and not (kxk and math.prod(m.kernel_size) == 1)]


def colora_adapter_count(conv: nn.modules.conv._ConvNd) -> int:
    """Trainable parameters CoLoRA adds to `conv` (DESIGN §1): Kp, Kd and Δb when the conv has a bias."""
    c_out = conv.out_channels
    return c_out * (conv.in_channels // conv.groups) + c_out * math.prod(conv.kernel_size) + (
        c_out if conv.bias is not None else 0)


def lora_adapter_count(conv: nn.modules.conv._ConvNd, rank: int) -> int:
    """Trainable parameters PEFT's conv LoRA adds: A = conv(C_in → r, the base kernel), B = 1×1 conv(r → C_out,
    the base groups)."""
    return rank * conv.in_channels * math.prod(conv.kernel_size) + conv.out_channels * rank // conv.groups


def matched_lora_ranks(convs: Dict[str, nn.modules.conv._ConvNd]) -> Dict[str, int]:
    """Per conv, the LoRA rank that makes PEFT's parameter count closest to CoLoRA's on the same convs.

    One rank r for all, rounded per conv to a multiple of its groups (PEFT refuses other ranks there).
    """
    target = sum(colora_adapter_count(c) for c in convs.values())

    def ranks(r: int) -> Dict[str, int]:
        return {n: max(c.groups, round(r / c.groups) * c.groups) for n, c in convs.items()}

    def error(r: int) -> int:
        return abs(sum(lora_adapter_count(convs[n], rank) for n, rank in ranks(r).items()) - target)

    r = 1
    while sum(lora_adapter_count(convs[n], rank) for n, rank in ranks(r).items()) < target:
        r += 1
    return ranks(min((max(r - 1, 1), r), key=error))


def inject_lora(model: nn.Module, ranks: Dict[str, int]) -> None:
    """PEFT's LoRA on the named convs of `model` with these ranks, in place; only the LoRA factors are
    trainable afterwards. The scale alpha/r is 1 everywhere."""
    from peft import LoraConfig, inject_adapter_in_model

    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(n): r for n, r in ranks.items() if r != rank}
    pattern = "|".join(re.escape(n) for n in ranks)  # a string target is fullmatch-ed against qualified names
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=f"(?:{pattern})",
                        rank_pattern=others, alpha_pattern=others)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer with groups")  # merging
        inject_adapter_in_model(config, model)


def build_method_model(base: nn.Module, head: str, method: str, cfg: Config,
                       share_frozen: bool) -> Tuple[nn.Module, str]:
    """A copy of `base` set up for `method`, and a note for the table.

    `full` trains every parameter; `head` only the classifier; the adapter methods their adapters and the
    classifier, with the rest frozen (BatchNorm statistics still update in train mode). With `share_frozen`
    the frozen parameters are shared with `base` rather than copied: the copies timed side by side then hold
    one backbone between them. Memory is measured on unshared copies.
    """
    base_method, kxk, compiled = split_method(method)
    if base_method == "full":
        model = copy.deepcopy(base).requires_grad_(True)
        note = ""
    else:
        memo = {id(p): p for n, p in base.named_parameters() if not _within(n, head)} if share_frozen else {}
        model = copy.deepcopy(base, memo).requires_grad_(False)
        note = ""
        if base_method != "head":
            names = target_convs(model, head, kxk)
            if not names:
                raise ValueError(f"{method}: the model has no conv to wrap outside its classifier")
            if base_method == "peft-lora":
                ranks = matched_lora_ranks({n: model.get_submodule(n) for n in names})
                inject_lora(model, ranks)
                rank = Counter(ranks.values()).most_common(1)[0][0]
                grouped = sum(r != rank for r in ranks.values())
                note = f"r={rank}, {len(names)} convs"
                if grouped:
                    note += f"; {grouped} grouped convs need r a multiple of their groups in PEFT"
            else:
                apply_colora(model, include=names, backend=COLORA_BACKENDS[base_method])
                note = f"{len(names)} convs"
        model.get_submodule(head).requires_grad_(True)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compiled:
        model = torch.compile(model)
    return model, note


def logits_of(output) -> torch.Tensor:
    """The main logits of a torchvision model's training output (Inception and GoogLeNet add auxiliary ones)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config) -> Callable[[], None]:
    """One AdamW training step on (x, y): zero grads, forward under autocast, loss, backward, update."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(cfg.device.type) if cfg.dtype == "fp16" else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with cfg.autocast():
            loss = F.cross_entropy(logits_of(model(x)), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def parameter_counts(model: nn.Module) -> Tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def interleaved_times(runners: Dict[str, Callable[[], None]], cfg: Config, status: Dict[str, str],
                      progress: tqdm, label: Callable[[str], str]) -> Dict[str, List[float]]:
    """Warm every runner up, then time `rounds` × `steps_per_round` calls of each, rotating the order per round.

    A runner that fails is dropped with its status set (OOM or the error); the others go on.
    """
    times: Dict[str, List[float]] = {name: [] for name in runners}
    alive = list(runners)

    def attempt(name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except Exception as err:  # one method failing (OOM, a compile error) must not stop the others
            status[name] = failure_status(err)
            print(f"colora-bench: {label(name)}: {status[name]}", file=sys.stderr)
            alive.remove(name)
            release_memory(cfg.device)
            return False

    for name in list(alive):
        progress.set_description(f"{label(name)} warm-up")
        for _ in range(cfg.warmup):
            if not attempt(name, runners[name]):
                break
            progress.update()
        synchronize(cfg.device)
    for r in range(cfg.rounds):
        order = alive[r % len(alive):] + alive[:r % len(alive)] if alive else []
        for name in order:
            if name not in alive:
                continue
            progress.set_description(f"{label(name)} round {r + 1}/{cfg.rounds}")
            for _ in range(cfg.steps_per_round):
                if not attempt(name, lambda: times[name].append(timed_ms(runners[name], cfg.device))):
                    break
                progress.update()
    return {name: samples for name, samples in times.items() if name in alive}


def bench_model(model_name: str, cfg: Config, progress: tqdm) -> List[dict]:
    """Rows of results.csv for one model: every method's step time, throughput, peak memory, parameters."""
    base = build_base_model(model_name, cfg)
    head = classifier_name(base)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=generator).to(cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=generator).to(cfg.device)

    status = {m: "ok" for m in cfg.methods}
    info: Dict[str, dict] = {m: {} for m in cfg.methods}
    label = lambda m: f"{model_name} {m}"  # noqa: E731

    # Peak memory, one method at a time, each on its own unshared copy of the model.
    for method in cfg.methods:
        progress.set_description(f"{label(method)} memory")
        try:
            with PeakMemory(cfg.device) as memory:
                model, note = build_method_model(base, head, method, cfg, share_frozen=False)
                step = make_train_step(model, x, y, cfg)
                for _ in range(MEMORY_STEPS):
                    step()
                    progress.update()
            trainable, total = parameter_counts(model)
            info[method] = dict(peak_mem=memory.peak, note=note, trainable=trainable, total=total)
        except Exception as err:  # reported in the table; the other methods go on
            status[method] = failure_status(err)
            print(f"colora-bench: {label(method)}: {status[method]}", file=sys.stderr)
        model = step = None
        release_memory(cfg.device)

    # Step times, all methods resident, interleaved.
    runners = {}
    for method in [m for m in cfg.methods if status[m] == "ok"]:
        try:
            model, _ = build_method_model(base, head, method, cfg, share_frozen=True)
            runners[method] = make_train_step(model, x, y, cfg)
        except Exception as err:
            status[method] = failure_status(err)
            print(f"colora-bench: {label(method)}: {status[method]}", file=sys.stderr)
    model = None
    times = interleaved_times(runners, cfg, status, progress, label)
    runners.clear()
    release_memory(cfg.device)
    for method in cfg.methods:
        if status[method] == "OOM" and info[method]:
            status[method] = "OOM with the other methods resident (fits alone: see its peak memory)"

    stats = {m: quantiles(t) for m, t in times.items() if t}
    full = stats.get("full")
    full_mem = info.get("full", {}).get("peak_mem")
    rows = []
    for method in cfg.methods:
        row = dict(model=model_name, method=method, status=status[method], note=info[method].get("note", ""),
                   trainable_params=info[method].get("trainable"), total_params=info[method].get("total"))
        if method in stats:
            p20, median, p80 = stats[method]
            row.update(step_ms=median, step_ms_p20=p20, step_ms_p80=p80, steps=len(times[method]),
                       images_per_s=cfg.batch / (median / 1e3),
                       speedup_vs_full=full[1] / median if full else None)
        mem = info[method].get("peak_mem")
        if mem is not None:
            row.update(peak_mem_mib=mem / 2**20, mem_vs_full=mem / full_mem if full_mem else None)
        rows.append(row)
    for method, reason in cfg.skipped.items():
        rows.append(dict(model=model_name, method=method, status=f"skipped: {reason}"))
    return rows


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
        """F = 2·N·prod(out)·C_out·(C_in/groups)·prod(k) (DESIGN §5)."""
        return 2.0 * batch * math.prod(self.output_size) * self.out_channels * (
            self.in_channels // self.groups) * self.taps

    def ideal_flops(self, batch: int, method: str, mode: str) -> float:
        """The work the task needs, the same for every method doing it (DESIGN §5's cost model).

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
        return 2 * f + min(f, 2 * f / self.taps)

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
        layer = CONV_TO_COLORA[type(conv)].from_conv(conv, backend=COLORA_BACKENDS[base])
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


def repeated(fn: Callable[[], None], cfg: Config) -> Tuple[Callable[[], None], int]:
    """`fn` called back to back often enough that one timed sample lasts about cfg.sample_ms, and that count."""
    fn()
    once = timed_ms(fn, cfg.device)
    reps = max(1, min(MAX_REPS, math.ceil(cfg.sample_ms / max(once, 1e-3))))

    def run() -> None:
        for _ in range(reps):
            fn()

    return run, reps


def bench_layers(model_name: str, cfg: Config, progress: tqdm) -> List[dict]:
    """Rows of results.csv in layer mode: per distinct conv shape, method and mode (forward / step)."""
    shapes = model_conv_shapes(build_base_model(model_name, cfg), cfg.image_size)
    release_memory(cfg.device)
    progress.total += len(shapes) * len(cfg.methods) * 2 * (cfg.warmup + cfg.rounds * cfg.steps_per_round)
    progress.refresh()
    peak = peak_tflops(cfg.device, cfg.dtype)
    rows = []
    totals: Dict[Tuple[str, str], List[float]] = {}  # (method, mode) → [Σ count·ms, Σ count·flops]
    failed_totals = set()
    for shape, count in shapes:
        status = {m: "ok" for m in cfg.methods}
        runners: Dict[str, Dict[str, Callable[[], None]]] = {}
        for method in cfg.methods:
            try:
                runners[method] = layer_runners(build_layer(shape, method, cfg), shape, cfg)
            except Exception as err:
                status[method] = failure_status(err)
                print(f"colora-bench: {shape.label} {method}: {status[method]}", file=sys.stderr)
        for mode in ("forward", "step"):
            mode_status = dict(status)
            label = lambda m: f"{model_name} {shape.label} {m} {mode}"  # noqa: E731
            calls, reps = {}, {}
            for method, fns in runners.items():
                try:
                    calls[method], reps[method] = repeated(fns[mode], cfg)
                except Exception as err:
                    mode_status[method] = failure_status(err)
                    print(f"colora-bench: {label(method)}: {mode_status[method]}", file=sys.stderr)
            times = interleaved_times(calls, cfg, mode_status, progress, label)
            medians = {m: tuple(v / reps[m] for v in quantiles(t)) for m, t in times.items()}
            for method in cfg.methods:
                row = dict(model=model_name, layer=shape.label, count=count, method=method, mode=mode,
                           status=mode_status[method], batch=cfg.batch, in_channels=shape.in_channels,
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
                           tflops=flops / (median / 1e3) / 1e12)
                row["peak_fraction"] = row["tflops"] / peak if peak else None
                row["ratio_vs_conv"] = median / medians["conv"][1] if "conv" in medians else None
                row["speedup_vs_full"] = medians["full"][1] / median if "full" in medians else None
                total = totals.setdefault((method, mode), [0.0, 0.0])
                total[0] += count * median
                total[1] += count * flops
                rows.append(row)
        runners.clear()
        release_memory(cfg.device)
    for mode in ("forward", "step"):
        sums = {m: totals[(m, mode)] for m in cfg.methods if (m, mode) in totals and (m, mode) not in failed_totals}
        for method, (ms, flops) in sums.items():
            tflops = flops / (ms / 1e3) / 1e12
            rows.append(dict(model=model_name, layer="all convs", count=sum(c for _, c in shapes), method=method,
                             mode=mode, status="ok", batch=cfg.batch, ms=ms, gflop=flops / 1e9, tflops=tflops,
                             peak_fraction=tflops / peak if peak else None,
                             ratio_vs_conv=ms / sums["conv"][0] if "conv" in sums else None,
                             speedup_vs_full=sums["full"][0] / ms if "full" in sums else None))
    for method, reason in cfg.skipped.items():
        rows.append(dict(model=model_name, layer="", method=method, status=f"skipped: {reason}"))
    return rows


MODEL_COLUMNS = ("model", "method", "status", "step_ms", "step_ms_p20", "step_ms_p80", "steps", "images_per_s",
                 "speedup_vs_full", "peak_mem_mib", "mem_vs_full", "trainable_params", "total_params", "note")
LAYER_COLUMNS = ("model", "layer", "count", "method", "mode", "status", "ms", "ms_p20", "ms_p80", "gflop", "tflops",
                 "peak_fraction", "ratio_vs_conv", "speedup_vs_full", "batch", "in_channels", "out_channels",
                 "kernel", "stride", "groups", "input_size")


def write_csv(path: str, rows: List[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _table(header: Sequence[str], body: List[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _heading(cfg: Config) -> List[str]:
    layout = "channels_last" if cfg.channels_last else "contiguous"
    if cfg.mode == "model":
        timing = (f"AdamW; per method {cfg.warmup} warm-up steps, then {cfg.rounds} interleaved rounds of "
                  f"{cfg.steps_per_round} timed step(s)")
    else:
        timing = (f"per method and mode {cfg.warmup} warm-up samples, then {cfg.rounds} interleaved rounds of "
                  f"{cfg.steps_per_round} timed sample(s), a sample repeating the call for ≥ "
                  f"{cfg.sample_ms:g} ms")
    lines = [f"# colora-bench ({cfg.mode} mode) on {device_name(cfg.device)}", "",
             f"batch {cfg.batch}, {cfg.image_size}×{cfg.image_size}, {cfg.dtype}"
             f"{' autocast' if cfg.amp_dtype else ''}, {layout}; {timing}. torch {torch.__version__}. "
             f"Command: `{cfg.command}`", ""]
    cores = os.cpu_count() or 1
    # The load average counts this process too (one runnable thread while it starts up).
    if cfg.load_at_start is not None and cfg.load_at_start - 1 >= 0.5 * cores:
        lines += [f"**Busy machine:** the 1-minute load average was {cfg.load_at_start:.1f} on {cores} cores when "
                  "the run started; other processes competed for the CPU, so the timings are noisy.", ""]
    return lines


def model_markdown(rows: List[dict], cfg: Config) -> str:
    mem_header = "peak mem MiB (CUDA alloc)" if cfg.device.type == "cuda" else "peak RSS growth MiB"
    lines = _heading(cfg) + [
        f"Step time: median and p20–p80 over the timed steps. Memory: {memory_metric(cfg.device)}, one method "
        "at a time on its own copy of the model. Adapter methods train their adapters and the classifier.", ""]
    header = ("method", "trainable params", "step ms", "p20–p80 ms", "images/s", "speedup vs full", mem_header,
              "mem vs full", "notes")
    for model_name in dict.fromkeys(r["model"] for r in rows):
        body = []
        for r in (r for r in rows if r["model"] == model_name):
            if "step_ms" not in r:
                body.append((r["method"], _fmt(r.get("trainable_params"), ","), "", "", "", "",
                             _fmt(r.get("peak_mem_mib"), ",.0f"), _fmt(r.get("mem_vs_full"), ".2f", "×"),
                             r["status"]))
                continue
            body.append((r["method"], _fmt(r["trainable_params"], ","), f"{r['step_ms']:.1f}",
                         f"{r['step_ms_p20']:.1f}–{r['step_ms_p80']:.1f}", f"{r['images_per_s']:.1f}",
                         _fmt(r["speedup_vs_full"], ".2f", "×"), _fmt(r["peak_mem_mib"], ",.0f"),
                         _fmt(r["mem_vs_full"], ".2f", "×"), r["note"]))
        lines += [f"## {model_name}", ""] + _table(header, body) + [""]
    return "\n".join(lines)


def layer_markdown(rows: List[dict], cfg: Config) -> str:
    peak = peak_tflops(cfg.device, cfg.dtype)
    unit, scale = ("TFLOP/s", 1.0) if cfg.device.type == "cuda" else ("GFLOP/s", 1e3)
    lines = _heading(cfg) + [
        f"Each cell: median ms · achieved {unit}"
        + (f" (fraction of the {peak:g} TFLOP/s peak)" if peak else "")
        + " · ratio. forward: no autograd, ratio = time / the plain conv's (the floor). step: forward + backward "
        "with the input gradient, ratio = speedup vs full (full's time / this time). FLOP/s count the work the "
        "task needs (DESIGN §5): F forward; per step 2F frozen conv, 3F full, 2F + min(F, 2F/prod(k)) adapters. "
        "`all convs` sums each shape's time × its count.", ""]
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("mode")))
    for model_name in dict.fromkeys(r["model"] for r in rows):
        for mode, ratio_key in (("forward", "ratio_vs_conv"), ("step", "speedup_vs_full")):
            cells: Dict[Tuple[str, str], str] = {}
            layers: Dict[str, object] = {}
            for r in rows:
                if r["model"] != model_name or r.get("mode") != mode:
                    continue
                layers.setdefault(r["layer"], r.get("count"))
                if "ms" not in r:
                    cells[(r["layer"], r["method"])] = r["status"]
                    continue
                text = f"{r['ms']:.3g} · {r['tflops'] * scale:.3g}"
                if r.get("peak_fraction") is not None:
                    text += f" ({r['peak_fraction']:.0%})"
                if r.get(ratio_key) is not None:
                    text += f" · {r[ratio_key]:.2f}×"
                cells[(r["layer"], r["method"])] = text
            body = [(layer, _fmt(count, "d")) + tuple(cells.get((layer, m), "") for m in methods)
                    for layer, count in layers.items()]
            lines += [f"## {model_name}: {mode}", ""] + _table(("layer", "count") + tuple(methods), body) + [""]
    skipped = {r["method"]: r["status"] for r in rows if not r.get("mode")}
    lines += [f"- {method}: {status}" for method, status in skipped.items()]
    return "\n".join(lines)


def model_plot(path: str, rows: List[dict], cfg: Config) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 0.5 + 0.45 * len(cfg.methods) * len(models) + 0.6),
                             squeeze=False)
    for ax, model_name in zip(axes[:, 0], models):
        done = [r for r in rows if r["model"] == model_name and "step_ms" in r]
        names = [r["method"] for r in done]
        speeds = [r["images_per_s"] for r in done]
        bars = ax.barh(names, speeds, color=["#888888" if n in ("full", "head") else "#2a7ab0" for n in names])
        for bar, r in zip(bars, done):
            text = _fmt(r["speedup_vs_full"], ".2f", "×")
            if r.get("peak_mem_mib") is not None:
                text += f"  {r['peak_mem_mib']:,.0f} MiB"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + text, va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(speeds, default=1) * 1.35)
        ax.set_xlabel("training throughput (images/s)")
        ax.set_title(f"{model_name}: batch {cfg.batch}, {cfg.image_size}², {cfg.dtype} — {device_name(cfg.device)}",
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_plot(path: str, rows: List[dict], cfg: Config) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    panels = (("forward", "ratio_vs_conv", "plain conv time / time", "conv"),
              ("step", "speedup_vs_full", "speedup vs full (full / time)", "full"))
    fig, axes = plt.subplots(len(models) * 2, 1, figsize=(12, 4.2 * len(models) * 2), squeeze=False)
    for i, model_name in enumerate(models):
        for j, (mode, key, ylabel, reference) in enumerate(panels):
            ax = axes[2 * i + j, 0]
            data = [r for r in rows if r["model"] == model_name and r.get("mode") == mode and "ms" in r]
            layers = list(dict.fromkeys(r["layer"] for r in data))
            methods = [m for m in dict.fromkeys(r["method"] for r in data) if m != reference]
            width = 0.8 / max(len(methods), 1)
            for k, method in enumerate(methods):
                by_layer = {r["layer"]: r for r in data if r["method"] == method}
                values = []
                for layer in layers:
                    value = by_layer.get(layer, {}).get(key)
                    values.append(float("nan") if value is None else (1 / value if key == "ratio_vs_conv" else value))
                ax.bar([x + (k - (len(methods) - 1) / 2) * width for x in range(len(layers))], values, width,
                       label=method)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{model_name} {mode}: batch {cfg.batch}, {cfg.dtype} — {device_name(cfg.device)}",
                         fontsize=9)
            ax.legend(fontsize=7, ncol=min(len(methods), 5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: List[dict], cfg: Config) -> str:
    """Write results.csv, results.md, results.png and env.json under cfg.out; return the Markdown."""
    os.makedirs(cfg.out, exist_ok=True)
    layers = cfg.mode == "layers"
    write_csv(os.path.join(cfg.out, "results.csv"), rows, LAYER_COLUMNS if layers else MODEL_COLUMNS)
    markdown = (layer_markdown if layers else model_markdown)(rows, cfg)
    with open(os.path.join(cfg.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    with open(os.path.join(cfg.out, "env.json"), "w", encoding="utf-8") as f:
        json.dump(environment(cfg), f, indent=2)
        f.write("\n")
    try:
        import matplotlib
    except ImportError:
        print("colora-bench: matplotlib is not installed, so no results.png (pip install colora_fused[bench])",
              file=sys.stderr)
    else:
        matplotlib.use("Agg")
        (layer_plot if layers else model_plot)(os.path.join(cfg.out, "results.png"), rows, cfg)
    return markdown


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="colora-bench",
        description="Training throughput and peak memory of CoLoRA against full fine-tuning, head-only training, "
                    "eager CoLoRA and PEFT LoRA on this machine (or, with --layers, per conv shape).",
        epilog="Defaults on CUDA: resnet50 and vgg16, batch 64, 224², bf16 autocast, channels_last. On CPU: batch "
               f"{DEFAULTS['cpu']['batch']}, {DEFAULTS['cpu']['image_size']}², fp32, channels_last.")
    parser.add_argument("--model", "--models", dest="models", action="append", metavar="NAME",
                        help="resnet50, vgg16 or any torchvision classification model; repeat or comma-separate "
                             f"(default: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--methods", action="append", metavar="M",
                        help=f"comma-separated; model mode: {', '.join(MODEL_METHODS)}; layer mode: "
                             f"{', '.join(LAYER_METHODS)}; a name ending in {COMPILE_SUFFIX} runs it under "
                             "torch.compile (default: every method that can run here)")
    parser.add_argument("--layers", action="store_true",
                        help="layer mode: each distinct conv shape of the model, forward and training step")
    parser.add_argument("--compile", action="store_true", help=f"add a {COMPILE_SUFFIX} variant of every method")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=_positive_int, help="images per step (default 64 on CUDA, "
                        f"{DEFAULTS['cpu']['batch']} on CPU)")
    parser.add_argument("--image-size", type=_positive_int, help="square input size (default 224 on CUDA, "
                        f"{DEFAULTS['cpu']['image_size']} on CPU); layer mode takes the convs' shapes at this size")
    parser.add_argument("--dtype", choices=tuple(AMP_DTYPES), help="autocast dtype; fp32 runs without autocast")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="model, inputs and layers in channels_last (default: on)")
    parser.add_argument("--warmup", type=_non_negative_int, help="warm-up steps per method before timing")
    parser.add_argument("--rounds", type=_positive_int, help="interleaved timing rounds")
    parser.add_argument("--steps-per-round", type=_positive_int, help="timed steps per method per round")
    parser.add_argument("--sample-ms", type=float,
                        help="layer mode: repeat each call so that one timed sample lasts at least this long "
                             f"(default {SAMPLE_MS['cuda']:g} on CUDA, {SAMPLE_MS['cpu']:g} on CPU)")
    parser.add_argument("--num-classes", type=_positive_int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic batch")
    parser.add_argument("--out", help="output folder (default: bench-results/<device>/, + layers/ in layer mode)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _split(values: Optional[List[str]]) -> Optional[List[str]]:
    if values is None:
        return None
    return list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))


def resolve_device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {text!r}; choose from: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA device is available here (torch {torch.__version__}); "
                             "choose from: auto, cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_methods(requested: Optional[List[str]], mode: str, device: torch.device,
                    compiled: bool) -> Tuple[List[str], Dict[str, str]]:
    """The methods to run and, when none were named, those skipped here with the reason."""
    valid = LAYER_METHODS if mode == "layers" else MODEL_METHODS
    skipped: Dict[str, str] = {}
    if requested is None:
        methods = []
        for method in valid:
            reason = missing_dependency(method, device)
            if reason is None:
                methods.append(method)
            else:
                skipped[method] = reason
                print(f"colora-bench: skipping {method}: {reason}", file=sys.stderr)
    else:
        for method in requested:
            base, kxk, _ = split_method(method)
            if (base + KXK_SUFFIX if kxk else base) not in valid:
                raise UsageError(f"unknown method {method!r} in {'layer' if mode == 'layers' else 'model'} mode; "
                                 f"choose from: {', '.join(valid)} (append {COMPILE_SUFFIX} for torch.compile)")
            reason = missing_dependency(method, device)
            if reason is not None:
                runnable = [m for m in valid if missing_dependency(m, device) is None]
                raise UsageError(f"method {method} cannot run here: it {reason}; methods that can: "
                                 f"{', '.join(runnable)}")
        methods = list(requested)
    if compiled:
        methods += [m + COMPILE_SUFFIX for m in methods if not m.endswith(COMPILE_SUFFIX)]
    return list(dict.fromkeys(methods)), skipped


def parse_config(argv: Optional[Sequence[str]]) -> Config:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    mode = "layers" if args.layers else "model"

    models = _split(args.models) or list(DEFAULT_MODELS)
    known = classification_models()
    for name in models:
        if name not in known:
            raise UsageError(f"unknown model {name!r}; choose from: {', '.join(known)}")

    methods, skipped = resolve_methods(_split(args.methods), mode, device, args.compile)
    defaults = dict(DEFAULTS[device.type])
    if mode == "layers":
        defaults.update(LAYER_DEFAULTS[device.type])
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    out = args.out or os.path.join("bench-results", device_slug(device), *(["layers"] if mode == "layers" else []))
    return Config(mode=mode, models=models, methods=methods, skipped=skipped, device=device, dtype=pick("dtype"),
                  batch=pick("batch"), image_size=pick("image_size"), channels_last=pick("channels_last"),
                  warmup=pick("warmup"), rounds=pick("rounds"), steps_per_round=pick("steps_per_round"),
                  num_classes=args.num_classes, seed=args.seed, out=out,
                  hide_progress=True if args.no_progress else None, command=shlex.join(["colora-bench", *argv]),
                  load_at_start=load_average(),
                  sample_ms=SAMPLE_MS[device.type] if args.sample_ms is None else args.sample_ms)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The `colora-bench` command; see `colora-bench --help`."""
    try:
        cfg = parse_config(argv)
    except UsageError as err:
        print(f"colora-bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    # In layer mode the bar's total grows as each model's conv shapes become known.
    total = 0 if cfg.mode == "layers" else (
        len(cfg.models) * len(cfg.methods) * (MEMORY_STEPS + cfg.warmup + cfg.rounds * cfg.steps_per_round))
    rows: List[dict] = []
    with tqdm(total=total, disable=cfg.hide_progress, unit="step", file=sys.stderr, dynamic_ncols=True) as progress:
        for model_name in cfg.models:
            rows += (bench_layers if cfg.mode == "layers" else bench_model)(model_name, cfg, progress)
    markdown = write_outputs(rows, cfg)
    print(markdown)
    print(f"colora-bench: wrote results.csv, results.md, results.png, env.json to {cfg.out}")


if __name__ == "__main__":
    main()
