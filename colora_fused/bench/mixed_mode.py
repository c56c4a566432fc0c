"""colora-bench's mixed mode (`--mixed A`): one batch whose samples use A different adapter sets (issue #26),
against the same batch with one adapter for all, a loop over the sets and PEFT's mixed batches.

The samples are assigned round-robin to A adapters u0 … u{A-1} (sample i uses u{i mod A}). Every method runs the
same model (CoLoRA on its default targets, the k×k convs; PEFT LoRA on the same convs at a matched parameter count
per adapter) on the same synthetic batch, in two phases:

- `forward`: model.eval() under torch.no_grad(), every method;
- `train`: forward, cross-entropy on synthetic labels, backward and an AdamW step on the adapters (model.train()),
  every method but peft-mixed (PEFT refuses adapter_names in training mode).

The methods (`common.MIXED_METHODS`):

- `single`: u0 active for the whole batch (`set_active_adapters`): today's path, with the cached merged weight;
  the reference of every ratio;
- `mixed`: `adapters_per_sample(model, names)`, the route left to the library (COLORA_MIXED_ROUTE unset around
  the call);
- `mixed-segments`, `mixed-gathered`, `mixed-per-set`: the same with COLORA_MIXED_ROUTE set to segments /
  gathered / per_set around the call (`colora_fused.mixed`'s routes);
- `set-loop`: what a user does without mixed batches: per set, `set_active_adapters` and a forward of its
  samples, then the outputs put back in sample order (torch.cat, then an index);
- `peft-mixed`: PEFT's own mixed batches, `peft_model(x, adapter_names=names)` on a `get_peft_model` model
  with A LoRA adapters (forward only).

Per phase: the models are built (frozen weights shared between them), each method is called once untimed (the
routes `auto` takes are recorded then, and in the forward phase every mixed method's output is checked against
set-loop's), then peak memory is measured one method at a time on a fresh unshared copy, then the step times in
interleaved rounds (`common.interleaved_times`). Each method's time against single's comes with a 95% interval and
a verdict (`stats.compare`), as does mixed's speed-up over each method; `targets` says whether issue #26's goals
were met.
"""
import contextlib
import copy
import os
import warnings
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .common import (MEMORY_STEPS, Config, PeakMemory, Progress, failure_status, interleaved_times, load_average,
                     quantiles, release_memory)
from .model_mode import MAX_ROUNDS_FACTOR, build_base_model, logits_of, lora_config, make_train_step, \
    matched_lora_ranks
from .stats import CONFIDENCE, FASTER, MIN_ROUNDS, NOISE, REFERENCE, TOO_FEW, Verdict, compare, extra_rounds, \
    round_means
from .. import mixed as mixed_lib
from ..adapters import add_adapter, set_active_adapters, set_trainable_adapters
from ..config import CoLoRAConfig
from ..model import colora_layers, get_colora_model
from ..per_sample import adapters_per_sample

PHASES = ("forward", "train")
PHASE_TITLES = {"forward": "forward (model.eval(), torch.no_grad())",
                "train": "training step (forward, cross-entropy, backward, AdamW on the adapters)"}
SINGLE, MIXED, SET_LOOP, PEFT_MIXED = "single", "mixed", "set-loop", "peft-mixed"
ROUTE_ENV = "COLORA_MIXED_ROUTE"
ROUTES = {MIXED: None, "mixed-segments": "segments", "mixed-gathered": "gathered",
          "mixed-per-set": "per_set"}  # None: the library's choice
INFERENCE_ONLY = {PEFT_MIXED: "n/a: PEFT's adapter_names is inference-only"}
PROBE_STEPS = 1  # the untimed call per method and phase before memory and timing
ADAPTER_SCALE = 0.02  # the adapters' random values: every set computes something different


def adapter_names(sets: int) -> List[str]:
    return [f"u{i}" for i in range(sets)]


def assignment(batch: int, sets: int) -> List[str]:
    """The adapter of each sample: round-robin, sample i → u{i mod sets}."""
    return [f"u{i % sets}" for i in range(batch)]


def phase_methods(cfg: Config, phase: str) -> List[str]:
    return [m for m in cfg.methods if phase == "forward" or m not in INFERENCE_ONLY]


def planned_steps(cfg: Config) -> int:
    """The progress report's total: per model, phase and method, the probe, the memory steps, warm-up and rounds."""
    per_method = PROBE_STEPS + MEMORY_STEPS + cfg.warmup + cfg.rounds * cfg.steps_per_round
    return len(cfg.models) * sum(len(phase_methods(cfg, phase)) for phase in PHASES) * per_method


@contextlib.contextmanager
def forced_route(route: Optional[str]) -> Iterator[None]:
    """COLORA_MIXED_ROUTE set to `route` inside (unset for None: the library chooses), restored on exit."""
    before = os.environ.get(ROUTE_ENV)
    if route is None:
        os.environ.pop(ROUTE_ENV, None)
    else:
        os.environ[ROUTE_ENV] = route
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ROUTE_ENV, None)
        else:
            os.environ[ROUTE_ENV] = before


@contextlib.contextmanager
def routes_taken() -> Iterator[Counter]:
    """Counts the routes `mixed.route` returns inside (one per CoLoRA layer and mixed call): which route `auto`
    took. Only around untimed calls."""
    seen: Counter = Counter()
    original = mixed_lib.route

    def spy(*args, **kwargs):
        chosen = original(*args, **kwargs)
        seen[chosen] += 1
        return chosen

    mixed_lib.route = spy
    try:
        yield seen
    finally:
        mixed_lib.route = original


def colora_template(base: nn.Module, cfg: Config, names: Sequence[str]) -> nn.Module:
    """A copy of `base` with CoLoRA on its default targets (`get_colora_model`), adapters `names` added with small
    random values (a generator seeded cfg.seed), only they trainable, names[0] active."""
    model = get_colora_model(copy.deepcopy(base), CoLoRAConfig())
    for name in names:
        add_adapter(model, name)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for _, layer in colora_layers(model):
            for name in names:
                for p in layer.adapter_parameters([name]):
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * ADAPTER_SCALE)
    set_trainable_adapters(model, names)
    set_active_adapters(model, [names[0]])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def peft_template(base: nn.Module, cfg: Config, targets: Sequence[str], names: Sequence[str]) -> Tuple[nn.Module, str]:
    """`base` under PEFT's `get_peft_model` with one LoRA adapter per name on the convs `targets`, each matched to
    CoLoRA's rank-1 parameter count (`matched_lora_ranks`), lora_B random and small like CoLoRA's adapters; and a
    note for the table."""
    from peft import get_peft_model

    model = copy.deepcopy(base)
    ranks = matched_lora_ranks({n: model.get_submodule(n) for n in targets})
    config = lora_config(ranks)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LoRA adapter added to ConvNd layer with groups")  # merging
        model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32) * ADAPTER_SCALE)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rank = Counter(ranks.values()).most_common(1)[0][0]
    return model, f"LoRA r={rank} per adapter, {len(targets)} convs"


def model_copy(template: nn.Module, share_frozen: bool) -> nn.Module:
    """A deep copy of `template`; with `share_frozen` its frozen parameters are shared with the template (the
    copies timed side by side hold one backbone between them)."""
    memo = {id(p): p for p in template.parameters() if not p.requires_grad} if share_frozen else {}
    return copy.deepcopy(template, memo)


def method_forward(method: str, model: nn.Module, x: torch.Tensor, names: Sequence[str]) -> Callable[[], object]:
    """The call that computes `model`'s output on the mixed batch x the way `method` does (module docstring)."""
    if method == SINGLE:
        return lambda: model(x)
    if method in ROUTES:
        def forward():
            with forced_route(ROUTES[method]), adapters_per_sample(model, names):
                return model(x)
        return forward
    if method == SET_LOOP:
        # The index tensors are made once, outside the timed call (in set-loop's favour).
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        parts = [(name, torch.tensor(idx, device=x.device)) for name, idx in groups.items()]
        back = torch.argsort(torch.cat([idx for _, idx in parts]))

        def forward():
            outs = []
            for name, idx in parts:
                set_active_adapters(model, [name])
                outs.append(logits_of(model(x.index_select(0, idx))))
            return torch.cat(outs)[back]
        return forward
    if method == PEFT_MIXED:
        names = list(names)
        return lambda: model(x, adapter_names=names)
    raise ValueError(f"unknown mixed-mode method {method!r}")


def make_runner(method: str, phase: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str],
                cfg: Config) -> Callable[[], object]:
    """One call of `method` in `phase`: the forward (returning the logits) or a training step."""
    forward = method_forward(method, model, x, names)
    if phase == "train":
        model.train()
        return make_train_step(model, x, y, cfg, forward=forward)
    model.eval()

    def run():
        with torch.no_grad(), cfg.autocast():
            return logits_of(forward())
    return run


def max_relative_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.float(), reference.float()
    return float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def time_words(v: Verdict) -> str:
    """A verdict against single in words, as a time ratio: "1.12× single's time (95% interval 1.05–1.20×, 8
    rounds): slower than single"."""
    text = (f"{1 / v.speedup:.2f}× single's time ({CONFIDENCE:.0%} interval {1 / v.high:.2f}–{1 / v.low:.2f}×, "
            f"{v.rounds} rounds): ")
    if v.settled:
        return text + f"{v.verdict} than single"
    if v.verdict == TOO_FEW:
        return text + f"too few rounds for a verdict (at least {MIN_ROUNDS})"
    return text + NOISE


def bench_mixed(model_name: str, cfg: Config, progress: Progress) -> List[dict]:
    """Rows of results.csv for one model: per phase and method the step time, its ratio to single's with a
    verdict, mixed's speed-up over it, and peak memory."""
    base = build_base_model(model_name, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, generator=generator).to(cfg.device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=generator).to(cfg.device)
    names = assignment(cfg.batch, cfg.sets)
    label = lambda m: f"{model_name} {m}"  # noqa: E731

    templates: Dict[str, nn.Module] = {}
    notes: Dict[str, str] = {}
    failed: Dict[str, str] = {}
    progress.phase(f"{model_name}: building the CoLoRA and PEFT models with {cfg.sets} adapters")
    try:
        colora = colora_template(base, cfg, adapter_names(cfg.sets))
        targets = [n for n, _ in colora_layers(colora)]
        for method in cfg.methods:
            if method != PEFT_MIXED:
                templates[method] = colora
                notes[method] = f"{len(targets)} convs"
    except Exception as err:  # no CoLoRA model: every method reports why
        failed.update({m: failure_status(err) for m in cfg.methods})
        targets = []
    if PEFT_MIXED in cfg.methods and targets:
        try:
            templates[PEFT_MIXED], notes[PEFT_MIXED] = peft_template(base, cfg, targets, adapter_names(cfg.sets))
        except Exception as err:
            failed[PEFT_MIXED] = failure_status(err)
    for method, status in failed.items():
        progress.message(f"colora-bench: {label(method)}: {status}")
    base = None

    rows = []
    for p, phase in enumerate(PHASES):
        share = (len(PHASES) * cfg.models.index(model_name) + p + 1) / (len(PHASES) * len(cfg.models)) \
            if model_name in cfg.models else 1.0
        rows += _bench_phase(model_name, phase, share, templates, dict(failed), notes, x, y, names, cfg, progress)
    return rows


def _bench_phase(model_name: str, phase: str, share: float, templates: Dict[str, nn.Module], status: Dict[str, str],
                 notes: Dict[str, str], x: torch.Tensor, y: torch.Tensor, names: Sequence[str], cfg: Config,
                 progress: Progress) -> List[dict]:
    methods = phase_methods(cfg, phase)
    for method in methods:
        status.setdefault(method, "ok")
    label = lambda m: f"{model_name} {phase} {m}"  # noqa: E731
    info: Dict[str, dict] = {m: {} for m in methods}

    def fail(method: str, err: BaseException) -> None:
        status[method] = failure_status(err)
        progress.message(f"colora-bench: {label(method)}: {status[method]}")

    # The timed models (frozen weights shared) and one untimed call each: the routes auto takes, the outputs.
    progress.phase(f"{model_name} {phase}: building the methods, one untimed call each")
    runners: Dict[str, Callable[[], object]] = {}
    outputs: Dict[str, torch.Tensor] = {}
    for method in [m for m in methods if status[m] == "ok"]:
        progress.detail(f"{label(method)} untimed call")
        try:
            model = model_copy(templates[method], share_frozen=True)
            runner = make_runner(method, phase, model, x, y, names, cfg)
            with routes_taken() as seen:
                out = runner()
            if phase == "forward":
                outputs[method] = out
            if seen:
                info[method]["routes"] = ", ".join(f"{route} ×{n}" for route, n in seen.most_common())
            runners[method] = runner
            progress.advance(PROBE_STEPS)
        except Exception as err:  # reported in the table; the other methods go on
            fail(method, err)
    model = runner = out = None
    if SET_LOOP in outputs:
        for method in ROUTES:
            if method in outputs:
                info[method]["max_rel_diff_vs_set_loop"] = max_relative_difference(outputs[method], outputs[SET_LOOP])
    outputs.clear()

    # Peak memory, one method at a time, each on its own unshared copy.
    for method in [m for m in methods if status[m] == "ok"]:
        progress.phase(f"{label(method)}: peak memory")
        try:
            with PeakMemory(cfg.device) as memory:
                model = model_copy(templates[method], share_frozen=False)
                runner = make_runner(method, phase, model, x, y, names, cfg)
                for _ in range(MEMORY_STEPS):
                    runner()
                    progress.advance()
            info[method]["peak_mem"] = memory.peak
        except Exception as err:
            fail(method, err)
            runners.pop(method, None)
        model = runner = None
        release_memory(cfg.device)

    # Step times, all methods resident, interleaved.
    plan = dict(load=None, note="")

    def verdicts(times: Dict[str, List[List[float]]]) -> Dict[str, Verdict]:
        if SINGLE not in times:
            return {}
        single = round_means(times[SINGLE])
        return {m: compare(single, round_means(t)) for m, t in times.items() if m != SINGLE}

    def more_rounds(times: Dict[str, List[List[float]]], round_s: float) -> int:
        # The run's time is shared out evenly: phase j of model i ends by its share of --max-seconds.
        plan["load"] = load_average()
        seconds_left = cfg.max_seconds * share - progress.elapsed() if cfg.max_seconds > 0 else None
        extra, plan["note"] = extra_rounds(list(verdicts(times).values()), plan["load"], os.cpu_count() or 1,
                                           cfg.rounds, round_s, seconds_left, MAX_ROUNDS_FACTOR * cfg.rounds)
        if plan["note"]:
            progress.message(f"colora-bench: {model_name} {phase}: {plan['note']}")
        return extra

    runners = {m: r for m, r in runners.items() if status[m] == "ok"}
    times = interleaved_times(runners, cfg, status, progress, f"{model_name} {phase}: times of {len(runners)} methods",
                              label, more_rounds)
    runners.clear()
    release_memory(cfg.device)
    for method in methods:
        if status[method] == "OOM" and info[method].get("peak_mem") is not None:
            status[method] = "OOM with the other methods resident (fits alone: see its peak memory)"

    stats = {m: quantiles([ms for steps in t for ms in steps]) for m, t in times.items() if t}
    judged = verdicts(times)
    against_mixed = {m: compare(round_means(t), round_means(times[MIXED])) for m, t in times.items()
                     if MIXED in times and m != MIXED}
    single_mem = info.get(SINGLE, {}).get("peak_mem")
    rows = []
    for method in [m for m in cfg.methods if m in methods or m in INFERENCE_ONLY]:
        row = dict(model=model_name, phase=phase, method=method, sets=cfg.sets, batch=cfg.batch,
                   image_size=cfg.image_size, note=notes.get(method, ""))
        if method not in methods:
            rows.append(dict(row, status=INFERENCE_ONLY[method]))
            continue
        row.update(status=status[method], routes=info[method].get("routes"),
                   max_rel_diff_vs_set_loop=info[method].get("max_rel_diff_vs_set_loop"))
        if method in stats:
            p20, median, p80 = stats[method]
            row.update(ms=median, ms_p20=p20, ms_p80=p80, rounds=len(times[method]),
                       steps=sum(map(len, times[method])), images_per_s=cfg.batch / (median / 1e3),
                       load_average=plan["load"], rounds_note=plan["note"])
            if method == SINGLE:
                row.update(time_vs_single=1.0, time_vs_single_low=1.0, time_vs_single_high=1.0, verdict=REFERENCE)
            elif method in judged:
                v = judged[method]
                row.update(time_vs_single=1 / v.speedup, time_vs_single_low=1 / v.high,
                           time_vs_single_high=1 / v.low, verdict=v.verdict, rounds_to_settle=v.rounds_to_settle,
                           verdict_words=time_words(v))
            if method == MIXED:
                row.update(mixed_speedup=1.0, mixed_speedup_low=1.0, mixed_speedup_high=1.0, mixed_verdict=REFERENCE)
            elif method in against_mixed:
                v = against_mixed[method]
                row.update(mixed_speedup=v.speedup, mixed_speedup_low=v.low, mixed_speedup_high=v.high,
                           mixed_verdict=v.verdict)
        mem = info[method].get("peak_mem")
        if mem is not None:
            row.update(peak_mem_mib=mem / 2**20, mem_vs_single=mem / single_mem if single_mem else None)
        rows.append(row)
    for method, reason in cfg.skipped.items():
        rows.append(dict(model=model_name, phase=phase, method=method, status=f"skipped: {reason}"))
    return rows


# Issue #26's goals: (device, phase, what, check). A check reads the model's rows of its phase.
TARGET_MODEL = "resnet50"
TARGET_SETTINGS = {
    "cpu": dict(batch=32, sets=8),
    "cuda": dict(batch=64, sets=8, dtype="bf16", channels_last=True),
}


def _setting_text(device: str) -> str:
    s = TARGET_SETTINGS[device]
    if device == "cpu":
        return f"CPU (torch backend, ResNet-50 k×k, batch {s['batch']}, {s['sets']} sets)"
    return f"CUDA ({s['dtype']}, channels_last, ResNet-50 k×k, batch {s['batch']}, {s['sets']} sets)"


def _interval_text(value: float, low: float, high: float) -> str:
    return f"{value:.2f}× ({CONFIDENCE:.0%} interval {low:.2f}–{high:.2f}×)"


def _at_most(row: Optional[dict], key: str, limit: float, what: str) -> Tuple[str, str]:
    """met when the row's ratio `key` is at most `limit` (its median; the interval is quoted)."""
    if row is None or row.get(key) is None:
        return "n/a", f"{what}: not measured ({(row or {}).get('status', 'not run')})"
    value, low, high = row[key], row.get(f"{key}_low"), row.get(f"{key}_high")
    if low is None:
        return ("met" if value <= limit else "not met"), f"{what} {value:.2f}×"
    text = f"{what} {_interval_text(value, low, high)}"
    if low <= limit <= high:
        text += f"; the interval reaches across {limit:g}×"
    return ("met" if value <= limit else "not met"), text


def _mixed_faster(row: Optional[dict], factor: Optional[float], other: str) -> Tuple[str, str]:
    """met when mixed is faster than the row's method: a verdict of faster (factor None), or a median speed-up of
    at least `factor`."""
    if row is None or row.get("mixed_speedup") is None:
        return "n/a", f"{other}: not measured ({(row or {}).get('status', 'not run')})"
    v, low, high = row["mixed_speedup"], row["mixed_speedup_low"], row["mixed_speedup_high"]
    text = f"mixed's speed-up over {other} {_interval_text(v, low, high)}, {row['mixed_verdict']}"
    if factor is None:
        return ("met" if row["mixed_verdict"] == FASTER else "not met"), text
    if low <= factor <= high:
        text += f"; the interval reaches across {factor:g}×"
    return ("met" if v >= factor else "not met"), text


def targets(rows: List[dict], cfg: Config) -> List[Tuple[str, str, str]]:
    """(goal, met / not met / n/a, the evidence or why n/a) for each of issue #26's goals, from this run's rows."""
    goals = [
        ("cpu", "forward", "mixed forward ≤ 1.3× single's time",
         lambda r: _at_most(r.get(MIXED), "time_vs_single", 1.3, "mixed/single")),
        ("cpu", "forward", "mixed forward faster than set-loop",
         lambda r: _mixed_faster(r.get(SET_LOOP), None, SET_LOOP)),
        ("cpu", "forward", "mixed forward faster than peft-mixed",
         lambda r: _mixed_faster(r.get(PEFT_MIXED), None, PEFT_MIXED)),
        ("cuda", "train", "mixed training step ≤ 1.15× single's time",
         lambda r: _at_most(r.get(MIXED), "time_vs_single", 1.15, "mixed/single")),
        ("cuda", "train", "mixed training step ≥ 1.5× faster than set-loop",
         lambda r: _mixed_faster(r.get(SET_LOOP), 1.5, SET_LOOP)),
        ("cuda", "train", "mixed training step ≥ 1.5× faster than peft-mixed",
         lambda r: ("n/a", INFERENCE_ONLY[PEFT_MIXED][len("n/a: "):] + ": PEFT has no mixed training step")),
        ("cuda", "train", "mixed training peak memory ≤ 1.1× single's",
         lambda r: _at_most(r.get(MIXED), "mem_vs_single", 1.1, "mixed/single peak memory")),
    ]
    here = cfg.device.type
    actual = dict(batch=cfg.batch, sets=cfg.sets, dtype=cfg.dtype, channels_last=cfg.channels_last)
    results = []
    for device, phase, goal, check in goals:
        what = f"{_setting_text(device)}: {goal}"
        wanted = TARGET_SETTINGS[device]
        differ = {k: actual[k] for k, v in wanted.items() if actual[k] != v}
        if device != here:
            results.append((what, "n/a", f"a {device.upper()} goal; this run is on {here.upper()}"))
        elif TARGET_MODEL not in cfg.models:
            results.append((what, "n/a", f"{TARGET_MODEL} was not run"))
        elif differ:
            results.append((what, "n/a", "this run's setting differs: "
                            + ", ".join(f"{k} {v} (the goal's: {wanted[k]})" for k, v in differ.items())))
        else:
            by_method = {r["method"]: r for r in rows if r.get("model") == TARGET_MODEL and r.get("phase") == phase}
            status, evidence = check(by_method)
            results.append((what, status, evidence))
    return results
