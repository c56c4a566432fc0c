"""What every colora-bench mode shares: the run's settings, the methods, facts about the device, timing in paired
rounds, peak memory and how a failing method is reported."""
import ctypes
import dataclasses
import gc
import re
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import stats as bench_stats
from .. import backends, toolbox
from ..functional import timed_ms, triton_available
from ..toolbox import cpu_name, load_average

DEFAULT_MODELS = ("resnet50", "vgg16")
MODEL_METHODS = ("full", "head", "colora-eager", "colora-torch", "colora-triton", "colora-hybrid", "peft-lora",
                 "colora-eager-kxk", "colora-torch-kxk", "colora-triton-kxk", "colora-hybrid-kxk")
LAYER_METHODS = ("conv", "full", "colora-eager", "colora-torch", "colora-triton", "colora-hybrid", "peft-lora")
# Mixed mode (--mixed A): one batch whose samples use A adapter sets; "single" (one adapter for the whole batch) is
# the reference (mixed_mode.py says what each one runs).
MIXED_METHODS = ("single", "mixed", "mixed-segments", "mixed-gathered", "mixed-per-set", "set-loop", "peft-mixed")
MIXED_MODELS = ("resnet50",)
PEFT_MIXED_VERSION = (0, 10)  # the first peft whose forward takes adapter_names=
# The method of each backend (`backends.NAMES`): colora-<name>, the reference backend as colora-eager (the paper's
# equations run as written). colora-auto is no timed method: layer mode builds it to report the path `auto` takes.
COLORA_BACKENDS = {("colora-eager" if name == "reference" else f"colora-{name}"): name for name in backends.NAMES}
COMPILE_SUFFIX = "+compile"
KXK_SUFFIX = "-kxk"
RANK_SUFFIX = re.compile(r"@r([1-9][0-9]*)$")  # colora-torch@r4: rank-4 CoLoRA layers
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



@dataclasses.dataclass
class Config:
    """One run's settings; the layer builders (and benchmarks/) need only the first five."""

    device: torch.device
    dtype: str  # a key of AMP_DTYPES
    batch: int
    image_size: int
    channels_last: bool
    mode: str = "model"  # or "layers", "mixed"
    models: List[str] = dataclasses.field(default_factory=list)
    methods: List[str] = dataclasses.field(default_factory=list)
    skipped: Dict[str, str] = dataclasses.field(default_factory=dict)  # method → why it cannot run here
    warmup: int = 1
    rounds: int = 3
    steps_per_round: int = 1
    num_classes: int = 1000
    seed: int = 0
    out: str = "bench-results"
    show_progress: bool = True  # the bar (terminal) or progress lines (elsewhere) on stderr; the log is always written
    command: str = "colora-bench"
    load_at_start: Optional[float] = None  # the 1-minute load average before the run (Unix)
    sample_ms: float = 20.0  # layer mode: a timed sample repeats the call until it lasts about this long
    max_seconds: float = 0.0  # model mode: a busy machine's extra rounds end the run by about then (0: none)
    sets: int = 0  # mixed mode: the distinct adapter sets in one batch (--mixed A)

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES[self.dtype]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)


def method_rank(name: str) -> int:
    """The CoLoRA rank a method name asks for: `colora-torch@r4` (also `colora-torch-kxk@r4+compile`) → 4, else 1."""
    found = RANK_SUFFIX.search(name[:-len(COMPILE_SUFFIX)] if name.endswith(COMPILE_SUFFIX) else name)
    return int(found.group(1)) if found else 1


def split_method(name: str) -> Tuple[str, bool, bool]:
    """`colora-torch-kxk@r2+compile` → ("colora-torch", kxk=True, compiled=True); the rank: `method_rank`."""
    compiled = name.endswith(COMPILE_SUFFIX)
    name = name[:-len(COMPILE_SUFFIX)] if compiled else name
    name = RANK_SUFFIX.sub("", name)
    kxk = name.endswith(KXK_SUFFIX)
    return (name[:-len(KXK_SUFFIX)] if kxk else name), kxk, compiled


def missing_dependency(method: str, device: torch.device) -> Optional[str]:
    """Why `method` cannot run on `device` in this environment, or None when it can."""
    base, _, _ = split_method(method)
    backend = backends.TABLE.get(COLORA_BACKENDS.get(base))
    if backend is not None and backend.devices is not None and device.type not in backend.devices:
        return f"needs a {' or '.join(d.upper() for d in backend.devices)} device (this run is on {device.type})"
    if backend is not None and backend.triton and not triton_available():
        return "needs triton (pip install triton)"
    if base in ("peft-lora", "peft-mixed"):
        try:
            import peft
        except ImportError:
            return "needs peft (pip install peft, or pip install colora_fused[bench])"
        if base == "peft-mixed" and _version(peft.__version__) < PEFT_MIXED_VERSION:
            return (f"needs peft >= {'.'.join(map(str, PEFT_MIXED_VERSION))} for adapter_names= (this is "
                    f"{peft.__version__})")
    return None


def _version(text: str) -> Tuple[int, ...]:
    """The leading numbers of a version string: "0.21.2.dev0" → (0, 21, 2)."""
    numbers = []
    for part in text.split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


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
    """env.json: the run's settings, then what every tool records (`toolbox.environment`)."""
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
        "max_seconds": cfg.max_seconds if cfg.mode in ("model", "mixed") else None,
        "sets": cfg.sets if cfg.mode == "mixed" else None,
        "verdicts": dict(confidence=bench_stats.CONFIDENCE, bootstrap_resamples=bench_stats.RESAMPLES,
                         bootstrap_seed=bench_stats.SEED, min_rounds=bench_stats.MIN_ROUNDS),
        "memory_metric": memory_metric(cfg.device),
        "peak_tflops": peak_tflops(cfg.device, cfg.dtype),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "load_average_at_start": cfg.load_at_start,
        "load_average_at_end": load_average(),
        **toolbox.environment(cfg.device),
    }


class Progress(toolbox.Progress):
    """The tools' progress report (`toolbox.Progress`), its lines on stderr after "colora-bench: "."""

    def __init__(self, total: int = 0, **kwargs):
        super().__init__(total, prefix="colora-bench: ", **kwargs)


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


def interleaved_times(runners: Dict[str, Callable[[], None]], cfg: Config, status: Dict[str, str],
                      progress: Progress, what: str, label: Callable[[str], str],
                      more_rounds: Optional[Callable[[Dict[str, List[List[float]]], float], int]] = None
                      ) -> Dict[str, List[List[float]]]:
    """Warm every runner up, then time `rounds` × `steps_per_round` calls of each, rotating the order per round.

    Returns each surviving runner's times in ms, a list of `steps_per_round` per round; round i of one runner
    and round i of another ran back to back, which pairs them. A runner that fails is dropped with its status
    set (OOM or the error); the others go on. `what` names the phase lines (warm-up, each round); `label(name)`
    a runner in details and failures. `more_rounds(times, round_s)`, when given, is asked once after the
    planned rounds, with the times so far and the mean seconds a round took, how many rounds to add.
    """
    times: Dict[str, List[List[float]]] = {name: [] for name in runners}
    alive = list(runners)

    def attempt(name: str, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except Exception as err:  # one method failing (OOM, a compile error) must not stop the others
            status[name] = failure_status(err)
            progress.message(f"colora-bench: {label(name)}: {status[name]}")
            alive.remove(name)
            release_memory(cfg.device)
            return False

    def surviving() -> Dict[str, List[List[float]]]:
        return {name: rounds for name, rounds in times.items() if name in alive}

    if cfg.warmup:
        progress.phase(f"{what}: warm-up")
    for name in list(alive):
        progress.detail(f"{label(name)} warm-up")
        for _ in range(cfg.warmup):
            if not attempt(name, runners[name]):
                break
            progress.advance()
        synchronize(cfg.device)
    rounds, r, started = cfg.rounds, 0, time.perf_counter()
    while r < rounds and alive:
        kind = "round" if r < cfg.rounds else "extra round"
        progress.phase(f"{what}: {kind} {r + 1}/{rounds}")
        order = alive[r % len(alive):] + alive[:r % len(alive)]
        for name in order:
            if name not in alive:
                continue
            progress.detail(f"{label(name)} {kind} {r + 1}/{rounds}")
            times[name].append([])
            for _ in range(cfg.steps_per_round):
                if not attempt(name, lambda: times[name][-1].append(timed_ms(runners[name], cfg.device))):
                    break
                progress.advance()
        r += 1
        if r == cfg.rounds and more_rounds is not None and alive:
            extra = more_rounds(surviving(), (time.perf_counter() - started) / r)
            if extra > 0:
                progress.add_total(extra * len(alive) * cfg.steps_per_round)
                rounds += extra
    return surviving()
