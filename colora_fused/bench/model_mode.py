"""colora-bench's model mode: whole torchvision models trained by each method — full fine-tuning, the head
alone, CoLoRA on each backend, PEFT LoRA at CoLoRA's parameter count — timed side by side, with peak memory and
a verdict on each method's speed-up over full fine-tuning (bench_stats)."""
import copy
import math
import os
import re
import warnings
from collections import Counter
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import (COLORA_BACKENDS, MEMORY_STEPS, Config, PeakMemory, Progress, failure_status,
                     interleaved_times, load_average, method_rank, quantiles, release_memory, split_method)
from .stats import REFERENCE, Verdict, compare, extra_rounds, round_means
from ..model import apply_colora
from ..layers import CONV_TO_COLORA

# A busy machine's extra rounds stop at this many times the planned rounds, however much time is left.
MAX_ROUNDS_FACTOR = 4


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
    """Trainable parameters CoLoRA adds to `conv` (design §1): Kp, Kd and Δb when the conv has a bias."""
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


def lora_config(ranks: Dict[str, int]):
    """PEFT's LoraConfig for LoRA on the named convs with these ranks (a rank per conv), the scale alpha/r 1
    everywhere."""
    from peft import LoraConfig

    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(n): r for n, r in ranks.items() if r != rank}
    pattern = "|".join(re.escape(n) for n in ranks)  # a string target is fullmatch-ed against qualified names
    return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=f"(?:{pattern})",
                      rank_pattern=others, alpha_pattern=others)


def inject_lora(model: nn.Module, ranks: Dict[str, int]) -> None:
    """PEFT's LoRA on the named convs of `model` with these ranks, in place; only the LoRA factors are
    trainable afterwards. The scale alpha/r is 1 everywhere."""
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer with groups")  # merging
        inject_adapter_in_model(lora_config(ranks), model)


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
                apply_colora(model, include=names, backend=COLORA_BACKENDS[base_method], rank=method_rank(method))
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


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: Config,
                    forward: Optional[Callable[[], object]] = None) -> Callable[[], None]:
    """One AdamW training step on (x, y): zero grads, forward under autocast, loss, backward, update.
    `forward()`, when given, computes the output in place of `model(x)` (mixed mode's adapter assignments)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler(cfg.device.type) if cfg.dtype == "fp16" else None
    forward = forward or (lambda: model(x))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with cfg.autocast():
            loss = F.cross_entropy(logits_of(forward()), y)
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


def bench_model(model_name: str, cfg: Config, progress: Progress) -> List[dict]:
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
        progress.phase(f"{label(method)}: peak memory")
        try:
            with PeakMemory(cfg.device) as memory:
                model, note = build_method_model(base, head, method, cfg, share_frozen=False)
                step = make_train_step(model, x, y, cfg)
                for _ in range(MEMORY_STEPS):
                    step()
                    progress.advance()
            trainable, total = parameter_counts(model)
            info[method] = dict(peak_mem=memory.peak, note=note, trainable=trainable, total=total)
        except Exception as err:  # reported in the table; the other methods go on
            status[method] = failure_status(err)
            progress.message(f"colora-bench: {label(method)}: {status[method]}")
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
            progress.message(f"colora-bench: {label(method)}: {status[method]}")
    model = None
    plan = dict(load=None, note="")

    def verdicts(times: Dict[str, List[List[float]]]) -> Dict[str, Verdict]:
        if "full" not in times:
            return {}
        full = round_means(times["full"])
        return {m: compare(full, round_means(t)) for m, t in times.items() if m != "full"}

    def more_rounds(times: Dict[str, List[List[float]]], round_s: float) -> int:
        # The run's time is shared out evenly: model i of n ends by i/n of --max-seconds, or as soon as it can.
        share = (cfg.models.index(model_name) + 1) / len(cfg.models) if model_name in cfg.models else 1.0
        plan["load"] = load_average()
        seconds_left = cfg.max_seconds * share - progress.elapsed() if cfg.max_seconds > 0 else None
        extra, plan["note"] = extra_rounds(list(verdicts(times).values()), plan["load"], os.cpu_count() or 1,
                                           cfg.rounds, round_s, seconds_left, MAX_ROUNDS_FACTOR * cfg.rounds)
        if plan["note"]:
            progress.message(f"colora-bench: {model_name}: {plan['note']}")
        return extra

    times = interleaved_times(runners, cfg, status, progress, f"{model_name}: step times of {len(runners)} methods",
                              label, more_rounds)
    runners.clear()
    release_memory(cfg.device)
    for method in cfg.methods:
        if status[method] == "OOM" and info[method]:
            status[method] = "OOM with the other methods resident (fits alone: see its peak memory)"

    stats = {m: quantiles([ms for steps in t for ms in steps]) for m, t in times.items() if t}
    judged = verdicts(times)
    full_mem = info.get("full", {}).get("peak_mem")
    rows = []
    for method in cfg.methods:
        row = dict(model=model_name, method=method, status=status[method], note=info[method].get("note", ""),
                   trainable_params=info[method].get("trainable"), total_params=info[method].get("total"))
        if method in stats:
            p20, median, p80 = stats[method]
            row.update(step_ms=median, step_ms_p20=p20, step_ms_p80=p80, rounds=len(times[method]),
                       steps=sum(map(len, times[method])), images_per_s=cfg.batch / (median / 1e3),
                       load_average=plan["load"], rounds_note=plan["note"])
            if method == "full":
                row.update(speedup_vs_full=1.0, speedup_vs_full_low=1.0, speedup_vs_full_high=1.0, verdict=REFERENCE)
            elif method in judged:
                v = judged[method]
                row.update(speedup_vs_full=v.speedup, speedup_vs_full_low=v.low, speedup_vs_full_high=v.high,
                           verdict=v.verdict, rounds_to_settle=v.rounds_to_settle,
                           verdict_words=v.words("full fine-tuning"))
        mem = info[method].get("peak_mem")
        if mem is not None:
            row.update(peak_mem_mib=mem / 2**20, mem_vs_full=mem / full_mem if full_mem else None)
        rows.append(row)
    for method, reason in cfg.skipped.items():
        rows.append(dict(model=model_name, method=method, status=f"skipped: {reason}"))
    return rows

