"""colora-bench: how much faster and leaner CoLoRA trains than the alternatives, measured on this machine.

    colora-bench                      # ResNet-50 and VGG-16, every method this machine can run
    colora-bench --model resnet18 --methods full,colora-torch --batch 16 --image-size 128
    colora-bench --layers             # each distinct conv shape: forward and training step, TFLOP/s
    colora-bench --mixed 8            # one batch, 8 adapter sets: adapters_per_sample against the alternatives
    colora-bench --audit -- ARGS      # the static kernel audit instead (colora-audit ARGS)
    python -m colora_fused.bench ...  # the same

Every method trains the same model on the same synthetic batch with the same AdamW loop, in rounds that
interleave the methods after a warm-up, so that clock and thermal drift hit them all alike. Each method's
speed-up over full fine-tuning comes with a 95% interval from those paired rounds and a verdict: faster,
slower or within the noise (stats.py); a busy machine gets extra rounds, up to --max-seconds. Peak memory is
measured separately, one method at a time, from a fresh copy of the model. Writes results.csv, results.md,
results.png, env.json and progress.log under --out (default bench-results/<device>/, or
bench-results/<device>/layers/ or .../mixed/).

This module is the command line; the modes live in model_mode.py, layer_mode.py and mixed_mode.py, what they share in
common.py (with the progress report, colora_fused.toolbox's), the verdicts in stats.py, the outputs in report.py.
"""
import argparse
import os
import shlex
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .common import (AMP_DTYPES, COMPILE_SUFFIX, DEFAULT_MODELS, KXK_SUFFIX, LAYER_METHODS, MEMORY_STEPS,
                     MIXED_METHODS, MIXED_MODELS, MODEL_METHODS, RANK_SUFFIX, SAMPLE_MS, Config, Progress, device_slug,
                     load_average, missing_dependency, split_method)
from .layer_mode import bench_layers
from .mixed_mode import bench_mixed, planned_steps
from .model_mode import bench_model, classification_models
from .report import write_outputs
from .stats import MIN_ROUNDS
from ..toolbox import HEARTBEAT_S

# Defaults per device. The CPU ones keep the whole default run (both models, every method) to about a minute
# on two quiet cores, and to about 5 minutes (max_seconds) on a busy machine unless its planned rounds alone take
# longer; the CUDA ones are design §6's training setting. Both give each comparison the rounds a verdict needs
# (bench_stats.MIN_ROUNDS); a round is the unit the verdicts resample, so on CPU a round is one step. On CUDA no
# extra rounds by default: the CPU's load average says little about a GPU's timings, and GPU windows are short.
DEFAULTS = {
    "cuda": dict(batch=64, image_size=224, dtype="bf16", channels_last=True, warmup=3, rounds=10,
                 steps_per_round=3, max_seconds=0),
    "cpu": dict(batch=8, image_size=64, dtype="fp32", channels_last=True, warmup=1, rounds=6, steps_per_round=1,
                max_seconds=300),
}
LAYER_DEFAULTS = {
    "cuda": dict(warmup=5, rounds=10, steps_per_round=5),
    "cpu": dict(warmup=1, rounds=6, steps_per_round=1),
}
# --mixed: issue #26's settings, batch 32 on CPU (64² keeps the default run to a few minutes on two cores) and 64
# at 224² bf16 on CUDA; more rounds on CPU, where the ratios to single are close to 1.
MIXED_DEFAULTS = {
    "cuda": dict(batch=64, image_size=224),
    "cpu": dict(batch=32, image_size=64, rounds=8),
}
MODE_WORDS = {"model": "model", "layers": "layer", "mixed": "mixed"}


class UsageError(ValueError):
    """Bad command-line input; `main` prints it as one `colora-bench: error: ...` line and exits with status 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 adapter sets, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _default(name: str) -> str:
    """The default of a per-device setting, as help text: "(default: 64 on CUDA, 8 on CPU)", plus layer mode's
    values where they differ."""
    text = f"(default: {DEFAULTS['cuda'][name]} on CUDA, {DEFAULTS['cpu'][name]} on CPU"
    if name in LAYER_DEFAULTS["cuda"]:
        text += f"; with --layers {LAYER_DEFAULTS['cuda'][name]} and {LAYER_DEFAULTS['cpu'][name]}"
    mixed = {device: {**DEFAULTS[device], **MIXED_DEFAULTS[device]}[name] for device in ("cuda", "cpu")}
    if any(mixed[device] != DEFAULTS[device][name] for device in mixed):
        text += f"; with --mixed {mixed['cuda']} and {mixed['cpu']}"
    return text + ")"


def build_parser() -> argparse.ArgumentParser:
    """The options; each help text gives its default once."""
    parser = argparse.ArgumentParser(
        prog="colora-bench",
        usage="colora-bench [options] | colora-bench --audit [-- AUDIT_ARGS]",
        description="Training throughput and peak memory of CoLoRA against full fine-tuning, head-only training, "
                    "eager CoLoRA and PEFT LoRA on this machine (or, with --layers, per conv shape; with --mixed, "
                    "batches mixing adapter sets).",
        epilog=f"Progress: a bar on a terminal; elsewhere (a log, CI) a line per phase and at least one every "
               f"{HEARTBEAT_S:g} s, with the elapsed time and what remains. Every line also goes to progress.log "
               "in --out.")
    parser.add_argument("--model", "--models", dest="models", action="append", metavar="NAME",
                        help="resnet50, vgg16 or any torchvision classification model; repeat or comma-separate "
                             f"(default: {','.join(DEFAULT_MODELS)}; with --mixed {','.join(MIXED_MODELS)})")
    parser.add_argument("--methods", action="append", metavar="M",
                        help=f"comma-separated; model mode: {', '.join(MODEL_METHODS)}; layer mode: "
                             f"{', '.join(LAYER_METHODS)}; a name ending in {COMPILE_SUFFIX} runs it under "
                             "torch.compile, and @rN after a colora method (colora-torch@r4) gives its layers rank N "
                             "(default: every method that can run here)")
    parser.add_argument("--layers", action="store_true",
                        help="layer mode: each distinct conv shape of the model, forward and training step")
    parser.add_argument("--mixed", type=_at_least_two, metavar="A",
                        help="mixed mode: one batch whose samples use A >= 2 adapter sets (round-robin), "
                             f"adapters_per_sample against one adapter for the batch, a loop over the sets and PEFT's "
                             f"adapter_names; forward and training step; methods {', '.join(MIXED_METHODS)}; "
                             f"models: {','.join(MIXED_MODELS)} unless --model is given")
    parser.add_argument("--compile", action="store_true", help=f"add a {COMPILE_SUFFIX} variant of every method")
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--batch", type=_positive_int, metavar="N", help=f"images per step {_default('batch')}")
    parser.add_argument("--image-size", type=_positive_int, metavar="PIXELS",
                        help="square input size; layer mode takes the convs' shapes at this size "
                             + _default("image_size"))
    parser.add_argument("--dtype", choices=tuple(AMP_DTYPES),
                        help=f"autocast dtype; fp32 runs without autocast {_default('dtype')}")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="model, inputs and layers in channels_last, or contiguous (default: channels_last)")
    parser.add_argument("--warmup", type=_non_negative_int, metavar="N",
                        help=f"untimed steps per method before timing {_default('warmup')}")
    parser.add_argument("--rounds", type=_positive_int, metavar="N",
                        help=f"interleaved timing rounds; a verdict needs at least {MIN_ROUNDS} {_default('rounds')}")
    parser.add_argument("--steps-per-round", type=_positive_int, metavar="N",
                        help=f"timed steps per method per round {_default('steps_per_round')}")
    parser.add_argument("--max-seconds", type=float, metavar="S",
                        help="model and mixed mode: on a busy machine (load average above the core count) add "
                             "timing rounds for the verdicts still within the noise, as many as fit before the run "
                             "has taken about S seconds; the planned rounds always run; 0: never add rounds "
                             + _default("max_seconds"))
    parser.add_argument("--sample-ms", type=float, metavar="MS",
                        help="layer mode: repeat each call so that one timed sample lasts at least this long "
                             f"(default: {SAMPLE_MS['cuda']:g} on CUDA, {SAMPLE_MS['cpu']:g} on CPU)")
    parser.add_argument("--num-classes", type=_positive_int, default=1000, metavar="N",
                        help="classifier outputs (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic batch (default: 0)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default: bench-results/<device>/, + layers/ or mixed/ in those modes)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar or progress lines on stderr; progress.log is still written")
    parser.add_argument("--audit", action="store_true",
                        help="run the static kernel audit (colora-audit) instead of timing; arguments after -- "
                             "go to it")
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
    valid = {"layers": LAYER_METHODS, "mixed": MIXED_METHODS}.get(mode, MODEL_METHODS)
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
            if mode == "mixed":
                if method not in valid:
                    raise UsageError(f"unknown method {method!r} in mixed mode; choose from: {', '.join(valid)}")
            elif (base + KXK_SUFFIX if kxk else base) not in valid or (RANK_SUFFIX.search(method.replace(
                    COMPILE_SUFFIX, "")) and not base.startswith("colora-")):
                raise UsageError(f"unknown method {method!r} in {MODE_WORDS[mode]} mode; "
                                 f"choose from: {', '.join(valid)} (append {COMPILE_SUFFIX} for torch.compile; "
                                 f"@rN after a colora method for rank N)")
            reason = missing_dependency(method, device)
            if reason is not None:
                runnable = [m for m in valid if missing_dependency(m, device) is None]
                raise UsageError(f"method {method} cannot run here: it {reason}; methods that can: "
                                 f"{', '.join(runnable)}")
        methods = list(requested)
    if mode == "mixed" and "single" not in methods:
        methods.insert(0, "single")  # the reference of every ratio
    if compiled:
        methods += [m + COMPILE_SUFFIX for m in methods if not m.endswith(COMPILE_SUFFIX)]
    return list(dict.fromkeys(methods)), skipped


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> Config:
    """The run's Config from parsed options: device, models and methods checked, defaults filled in."""
    device = resolve_device(args.device)
    mode = "mixed" if args.mixed else "layers" if args.layers else "model"
    if args.mixed and args.layers:
        raise UsageError("--mixed and --layers are separate modes; give one")
    if args.mixed and args.compile:
        raise UsageError("--compile is not available with --mixed")

    models = _split(args.models) or list(MIXED_MODELS if mode == "mixed" else DEFAULT_MODELS)
    known = classification_models()
    for name in models:
        if name not in known:
            raise UsageError(f"unknown model {name!r}; choose from: {', '.join(known)}")

    methods, skipped = resolve_methods(_split(args.methods), mode, device, args.compile)
    defaults = dict(DEFAULTS[device.type])
    defaults.update({"layers": LAYER_DEFAULTS, "mixed": MIXED_DEFAULTS}.get(mode, {}).get(device.type, {}))
    pick = lambda name: defaults[name] if getattr(args, name) is None else getattr(args, name)  # noqa: E731
    if args.mixed and args.mixed > pick("batch"):
        raise UsageError(f"--mixed {args.mixed} needs a batch of at least {args.mixed} images (--batch "
                         f"{pick('batch')}): every adapter set gets a sample")
    out = args.out or os.path.join("bench-results", device_slug(device), *([mode] if mode != "model" else []))
    return Config(mode=mode, models=models, methods=methods, skipped=skipped, device=device, dtype=pick("dtype"),
                  batch=pick("batch"), image_size=pick("image_size"), channels_last=pick("channels_last"),
                  warmup=pick("warmup"), rounds=pick("rounds"), steps_per_round=pick("steps_per_round"),
                  num_classes=args.num_classes, seed=args.seed, out=out, show_progress=not args.no_progress,
                  command=shlex.join(["colora-bench", *argv]), load_at_start=load_average(),
                  sample_ms=SAMPLE_MS[device.type] if args.sample_ms is None else args.sample_ms,
                  max_seconds=pick("max_seconds"), sets=args.mixed or 0)


def parse_config(argv: Optional[Sequence[str]]) -> Config:
    argv = list(sys.argv[1:] if argv is None else argv)
    return config_from_args(build_parser().parse_args(argv), argv)


def run_audit(audit_argv: List[str]) -> None:
    """`colora_fused.audit.main(audit_argv)`, imported only here: the benchmark runs without it. An int it
    returns is the exit status; anything else (its results) means success."""
    try:
        from .. import audit
    except ModuleNotFoundError as err:
        if err.name != "colora_fused.audit":
            raise
        raise UsageError("--audit needs colora_fused.audit, which this installation does not have") from None
    status = audit.main(audit_argv)
    if isinstance(status, int) and status:
        raise SystemExit(status)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The `colora-bench` command; see `colora-bench --help`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, audit_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(argv)
    try:
        if args.audit:
            return run_audit(audit_argv)
        if audit_argv:
            raise UsageError(f"arguments after -- ({shlex.join(audit_argv)}) are for --audit, which was not given")
        cfg = config_from_args(args, argv)
    except UsageError as err:
        print(f"colora-bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if cfg.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    os.makedirs(cfg.out, exist_ok=True)
    # In layer mode the total grows as each model's conv shapes become known.
    total = 0 if cfg.mode == "layers" else planned_steps(cfg) if cfg.mode == "mixed" else (
        len(cfg.models) * len(cfg.methods) * (MEMORY_STEPS + cfg.warmup + cfg.rounds * cfg.steps_per_round))
    rows: List[dict] = []
    with Progress(total, log_path=os.path.join(cfg.out, "progress.log"), show=cfg.show_progress) as progress:
        progress.phase(f"{cfg.mode} mode on {cfg.device}: {', '.join(cfg.models)}; {', '.join(cfg.methods)}")
        for model_name in cfg.models:
            bench = {"layers": bench_layers, "mixed": bench_mixed}.get(cfg.mode, bench_model)
            rows += bench(model_name, cfg, progress)
        progress.phase("writing results")
        markdown = write_outputs(rows, cfg)
    print(markdown)
    print(f"colora-bench: wrote results.csv, results.md, results.png, env.json, progress.log to {cfg.out}")
