"""colora-bench's outputs: results.csv, results.md (what the README quotes), results.png and env.json, for each
mode (model, layers, mixed)."""
import csv
import json
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from .common import Config, device_name, environment, memory_metric, peak_tflops
from .stats import CONFIDENCE, FASTER, MIN_ROUNDS, NOISE, REFERENCE, RESAMPLES, SEED, SLOWER, TOO_FEW, busy

# speedup_vs_full_low/high: the CONFIDENCE interval of speedup_vs_full; verdict: faster, slower, within the noise,
# too few rounds, or reference (full itself); rounds_to_settle: for an unsettled verdict, about how many rounds
# might settle it; load_average: the 1-minute load average after the model's planned rounds.
MODEL_COLUMNS = ("model", "method", "status", "step_ms", "step_ms_p20", "step_ms_p80", "rounds", "steps",
                 "images_per_s", "speedup_vs_full", "speedup_vs_full_low", "speedup_vs_full_high", "verdict",
                 "rounds_to_settle", "load_average", "peak_mem_mib", "mem_vs_full", "trainable_params", "total_params",
                 "note")
LAYER_COLUMNS = ("model", "layer", "count", "method", "mode", "auto_path", "status", "ms", "ms_p20", "ms_p80",
                 "rounds", "gflop", "tflops", "peak_fraction", "ratio_vs_conv", "ratio_vs_conv_low",
                 "ratio_vs_conv_high", "speedup_vs_full", "speedup_vs_full_low", "speedup_vs_full_high", "verdict",
                 "rounds_to_settle", "batch", "in_channels", "out_channels", "kernel", "stride", "groups",
                 "input_size")
# Mixed mode: per model, phase (forward / train) and method; time_vs_single: the method's time over single's
# (below 1: faster), with its CONFIDENCE interval and verdict; mixed_speedup: the method's time over mixed's (above
# 1: mixed is faster), likewise; routes: the routes mixed.route took in the untimed call (layers × calls);
# max_rel_diff_vs_set_loop: forward output's largest difference from set-loop's, over set-loop's largest value.
MIXED_COLUMNS = ("model", "phase", "method", "status", "ms", "ms_p20", "ms_p80", "rounds", "steps", "images_per_s",
                 "time_vs_single", "time_vs_single_low", "time_vs_single_high", "verdict", "rounds_to_settle",
                 "mixed_speedup", "mixed_speedup_low", "mixed_speedup_high", "mixed_verdict", "load_average",
                 "peak_mem_mib", "mem_vs_single", "routes", "max_rel_diff_vs_set_loop", "sets", "batch", "image_size",
                 "note")
VERDICT_COLORS = {FASTER: "#2a7ab0", SLOWER: "#c0392b", NOISE: "#aaaaaa", TOO_FEW: "#aaaaaa", REFERENCE: "#555555"}
STATS = (f"Speed-up vs full: the median over the rounds of full fine-tuning's time / the method's in the same round "
         f"(a round times every method once, back to back); interval: {CONFIDENCE:.0%} percentile bootstrap of that "
         f"median over the rounds ({RESAMPLES} resamples, seed {SEED}); verdict: faster or slower when the interval "
         f"lies above or below 1, {NOISE} when it includes 1, {TOO_FEW} under {MIN_ROUNDS}.")


def write_csv(path: str, rows: List[dict], columns: Sequence[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _interval(row: dict, key: str) -> str:
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return "" if low is None or high is None else f"{low:.2f}–{high:.2f}×"


def _unsettled(row: dict, key: str) -> bool:
    """The ratio's interval includes 1, or too few rounds stand behind it (the reference itself excepted)."""
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if low is None or high is None or (low == high == 1.0):
        return False
    return low <= 1 <= high or (row.get("rounds") or 0) < MIN_ROUNDS


def _table(header: Sequence[str], body: List[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def _heading(cfg: Config) -> List[str]:
    layout = "channels_last" if cfg.channels_last else "contiguous"
    title = f"{cfg.mode} mode"
    if cfg.mode == "mixed":
        title = f"mixed mode, {cfg.sets} adapter sets per batch"
        timing = (f"per phase and method 1 untimed call, {cfg.warmup} warm-up calls, then {cfg.rounds} interleaved "
                  f"rounds of {cfg.steps_per_round} timed call(s)")
        if cfg.max_seconds > 0:
            timing += f" (more on a busy machine, until about {cfg.max_seconds:g} s into the run)"
    elif cfg.mode == "model":
        timing = (f"AdamW; per method {cfg.warmup} warm-up steps, then {cfg.rounds} interleaved rounds of "
                  f"{cfg.steps_per_round} timed step(s)")
        if cfg.max_seconds > 0:
            timing += f" (more on a busy machine, until about {cfg.max_seconds:g} s into the run)"
    else:
        timing = (f"per method and mode {cfg.warmup} warm-up samples, then {cfg.rounds} interleaved rounds of "
                  f"{cfg.steps_per_round} timed sample(s), a sample repeating the call for ≥ "
                  f"{cfg.sample_ms:g} ms")
    lines = [f"# colora-bench ({title}) on {device_name(cfg.device)}", "",
             f"batch {cfg.batch}, {cfg.image_size}×{cfg.image_size}, {cfg.dtype}"
             f"{' autocast' if cfg.amp_dtype else ''}, {layout}; {timing}. torch {torch.__version__}. "
             f"Command: `{cfg.command}`", ""]
    cores = os.cpu_count() or 1
    # The load average counts this process too (one runnable thread while it starts up).
    if cfg.load_at_start is not None and cfg.load_at_start - 1 >= 0.5 * cores:
        lines += [f"**Busy machine:** the 1-minute load average was {cfg.load_at_start:.1f} on {cores} cores when "
                  "the run started; other processes competed for the CPU, so the timings are noisy: the intervals "
                  "below are wider for it, and a ratio whose interval includes 1 is no verdict. The intervals "
                  "cover the noise from round to round, not what the load does to every round alike: on a busy "
                  "CPU the ratios can sit far from a quiet machine's, verdicts included.", ""]
    elif cfg.load_at_start is not None:
        lines += [f"1-minute load average {cfg.load_at_start:.1f} on {cores} cores when the run started.", ""]
    return lines


def _verdict_lines(rows: List[dict], what: str) -> List[str]:
    """A line in words per method with a verdict."""
    judged = [r for r in rows if r.get("verdict_words")]
    if not judged:
        return []
    return [f"{what}:", ""] + [f"- {r['method']}: {r['verdict_words']}" for r in judged] + [""]


def _rounds_line(rows: List[dict], cfg: Config) -> List[str]:
    """What the load was after the planned rounds and whether rounds were added."""
    timed = [r for r in rows if r.get("rounds")]
    if not timed:
        return []
    note, load = timed[0].get("rounds_note"), timed[0].get("load_average")
    if note:
        return [note[0].upper() + note[1:] + ".", ""]
    if load is None:
        return []
    cores = os.cpu_count() or 1
    return [f"Load average {load:.1f} on {cores} cores after the {cfg.rounds} planned rounds"
            + (", above the core count." if busy(load, cores) else ", not above the core count."), ""]


def model_markdown(rows: List[dict], cfg: Config) -> str:
    mem_header = "peak mem MiB (CUDA alloc)" if cfg.device.type == "cuda" else "peak RSS growth MiB"
    lines = _heading(cfg) + [
        f"Step time: median and p20–p80 over the timed steps. {STATS} Memory: {memory_metric(cfg.device)}, one "
        "method at a time on its own copy of the model. Adapter methods train their adapters and the classifier.",
        ""]
    header = ("method", "trainable params", "step ms", "p20–p80 ms", "images/s", "speedup vs full",
              f"{CONFIDENCE:.0%} interval", "verdict", mem_header, "mem vs full", "notes")
    for model_name in dict.fromkeys(r["model"] for r in rows):
        body = []
        model_rows = [r for r in rows if r["model"] == model_name]
        for r in model_rows:
            if "step_ms" not in r:
                body.append((r["method"], _fmt(r.get("trainable_params"), ","), "", "", "", "", "", "",
                             _fmt(r.get("peak_mem_mib"), ",.0f"), _fmt(r.get("mem_vs_full"), ".2f", "×"),
                             r["status"]))
                continue
            body.append((r["method"], _fmt(r["trainable_params"], ","), f"{r['step_ms']:.1f}",
                         f"{r['step_ms_p20']:.1f}–{r['step_ms_p80']:.1f}", f"{r['images_per_s']:.1f}",
                         _fmt(r.get("speedup_vs_full"), ".2f", "×"), _interval(r, "speedup_vs_full"),
                         r.get("verdict") or "", _fmt(r.get("peak_mem_mib"), ",.0f"),
                         _fmt(r.get("mem_vs_full"), ".2f", "×"), r["note"]))
        lines += [f"## {model_name}", ""] + _table(header, body) + [""]
        lines += _verdict_lines(model_rows, "Speed-up over full fine-tuning") + _rounds_line(model_rows, cfg)
    return "\n".join(lines)


def layer_markdown(rows: List[dict], cfg: Config) -> str:
    peak = peak_tflops(cfg.device, cfg.dtype)
    unit, scale = ("TFLOP/s", 1.0) if cfg.device.type == "cuda" else ("GFLOP/s", 1e3)
    lines = _heading(cfg) + [
        f"Each cell: median ms · achieved {unit}"
        + (f" (fraction of the {peak:g} TFLOP/s peak)" if peak else "")
        + " · ratio. forward: no autograd, ratio = time / the plain conv's (the floor). step: forward + backward "
        "with the input gradient, ratio = speedup vs full (full's time / this time). A ratio is the median of the "
        "per-round ratios. FLOP/s count the work the "
        "task needs (design §5): F forward; per step 2F frozen conv, 3F full, 2F + min(F, 2F/prod(k)) adapters. "
        "`all convs` sums each shape's time × its count; its ratios come from the per-round sums, with their "
        f"{CONFIDENCE:.0%} interval in brackets. ≈ marks a ratio not outside the noise: its interval includes 1, or "
        f"fewer than {MIN_ROUNDS} rounds stand behind it. auto: the path a CoLoRA layer with backend=\"auto\" "
        "takes for the shape (torch: K0 + ΔK merged, one library conv; triton: the fused kernels).", "", STATS, ""]
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("mode")))
    for model_name in dict.fromkeys(r["model"] for r in rows):
        for mode, ratio_key in (("forward", "ratio_vs_conv"), ("step", "speedup_vs_full")):
            cells: Dict[Tuple[str, str], str] = {}
            layers: Dict[str, Tuple[object, str]] = {}
            for r in rows:
                if r["model"] != model_name or r.get("mode") != mode:
                    continue
                layers.setdefault(r["layer"], (r.get("count"), r.get("auto_path") or ""))
                if "ms" not in r:
                    cells[(r["layer"], r["method"])] = r["status"]
                    continue
                text = f"{r['ms']:.3g} · {r['tflops'] * scale:.3g}"
                if r.get("peak_fraction") is not None:
                    text += f" ({r['peak_fraction']:.0%})"
                if r.get(ratio_key) is not None:
                    text += f" · {'≈' if _unsettled(r, ratio_key) else ''}{r[ratio_key]:.2f}×"
                    if r["layer"] == "all convs" and _interval(r, ratio_key):
                        text += f" ({_interval(r, ratio_key)})"
                cells[(r["layer"], r["method"])] = text
            body = [(layer, _fmt(count, "d"), auto) + tuple(cells.get((layer, m), "") for m in methods)
                    for layer, (count, auto) in layers.items()]
            lines += [f"## {model_name}: {mode}", ""] + _table(("layer", "count", "auto") + tuple(methods), body) + [""]
            if mode == "step":
                lines += _verdict_lines([r for r in rows if r["model"] == model_name and r.get("mode") == mode
                                         and r["layer"] == "all convs"],
                                        "All convs, training step, speed-up over full fine-tuning")
    skipped = {r["method"]: r["status"] for r in rows if not r.get("mode")}
    lines += [f"- {method}: {status}" for method, status in skipped.items()]
    return "\n".join(lines)


def mixed_markdown(rows: List[dict], cfg: Config) -> str:
    from .mixed_mode import PHASE_TITLES, PHASES, targets

    mem_header = "peak mem MiB (CUDA alloc)" if cfg.device.type == "cuda" else "peak RSS growth MiB"
    lines = _heading(cfg) + [
        f"One synthetic batch of {cfg.batch} images of {cfg.image_size}×{cfg.image_size}, its samples assigned "
        f"round-robin to {cfg.sets} adapters u0…u{cfg.sets - 1} (sample i uses u{{i mod {cfg.sets}}}). "
        "single: u0 active for the whole batch (the reference); mixed: `adapters_per_sample`, the route left to the "
        "library; mixed-segments / mixed-gathered / mixed-per-set: the same with COLORA_MIXED_ROUTE forced; "
        "set-loop: per set, `set_active_adapters` and a forward of its samples, the outputs put back in order; "
        "peft-mixed: PEFT LoRA on the same convs (rank matched to CoLoRA's parameter count per adapter) through "
        "`adapter_names=` (inference only). CoLoRA wraps its default targets (the k×k convs); only the adapters "
        "train.", "",
        f"Time: median and p20–p80 over the timed calls. *time vs single*: the median over the rounds of the method's "
        f"time / single's in the same round (a round times every method once, back to back; below 1 is faster), "
        f"its {CONFIDENCE:.0%} percentile bootstrap interval over the rounds ({RESAMPLES} resamples, seed {SEED}) "
        f"and the verdict: faster or slower when the interval lies below or above 1, {NOISE} when it includes 1, "
        f"{TOO_FEW} under {MIN_ROUNDS}. *mixed's speed-up*: that method's time / mixed's, per round, likewise "
        f"(above 1: mixed is faster). Memory: {memory_metric(cfg.device)}, one method at a time on its own copy of "
        "the model. routes: the route each CoLoRA layer took in the untimed call (× layers). max rel diff: the "
        "forward output's largest difference from set-loop's, relative to set-loop's largest value.", ""]
    header = ("method", "ms", "p20–p80 ms", "images/s", "time vs single", f"{CONFIDENCE:.0%} interval", "verdict",
              "mixed's speed-up", f"{CONFIDENCE:.0%} interval", mem_header, "mem vs single", "notes")
    for model_name in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## {model_name}", ""]
        for phase in PHASES:
            phase_rows = [r for r in rows if r["model"] == model_name and r.get("phase") == phase]
            body = []
            for r in phase_rows:
                notes = [n for n in (r.get("note"), r.get("routes") and f"routes: {r['routes']}") if n]
                if r.get("max_rel_diff_vs_set_loop") is not None:
                    notes.append(f"max rel diff vs set-loop {r['max_rel_diff_vs_set_loop']:.1e}")
                if "ms" not in r:
                    body.append((r["method"], "", "", "", "", "", "", "", "", _fmt(r.get("peak_mem_mib"), ",.0f"),
                                 _fmt(r.get("mem_vs_single"), ".2f", "×"), "; ".join([r["status"]] + notes)))
                    continue
                body.append((r["method"], f"{r['ms']:.1f}", f"{r['ms_p20']:.1f}–{r['ms_p80']:.1f}",
                             f"{r['images_per_s']:.1f}", _fmt(r.get("time_vs_single"), ".2f", "×"),
                             _interval(r, "time_vs_single"), r.get("verdict") or "",
                             _fmt(r.get("mixed_speedup"), ".2f", "×"), _interval(r, "mixed_speedup"),
                             _fmt(r.get("peak_mem_mib"), ",.0f"), _fmt(r.get("mem_vs_single"), ".2f", "×"),
                             "; ".join(notes)))
            lines += [f"### {PHASE_TITLES[phase]}", ""] + _table(header, body) + [""]
            lines += _verdict_lines(phase_rows, "Time against single") + _rounds_line(phase_rows, cfg)
    lines += ["## Targets", "",
              "Issue #26's goals, each met, not met, or n/a (not measurable by this run); a ratio is judged by its "
              "median, its interval quoted.", ""]
    lines += [f"- {goal}: **{status}** — {evidence}" for goal, status, evidence in targets(rows, cfg)]
    return "\n".join(lines)


def mixed_plot(path: str, rows: List[dict], cfg: Config) -> None:
    import matplotlib.pyplot as plt

    from .mixed_mode import PHASES

    panels = [(m, phase) for m in dict.fromkeys(r["model"] for r in rows) for phase in PHASES]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.9 + 0.42 * len(cfg.methods) * len(panels) + 0.6),
                             squeeze=False)
    for ax, (model_name, phase) in zip(axes[:, 0], panels):
        done = [r for r in rows if r["model"] == model_name and r.get("phase") == phase
                and r.get("time_vs_single") is not None]
        memory = lambda r: f"  mem {r['mem_vs_single']:.2f}×" if r.get("mem_vs_single") is not None else ""  # noqa: E731
        # Bars grow from 1 (level with single): right for a slow-down, left for a speed-up.
        _ratio_panel(ax, done, "time_vs_single", memory,
                     f"time / single's (median over rounds, {CONFIDENCE:.0%} interval; log scale; below 1 is faster)",
                     f"{model_name} {phase}, {cfg.sets} adapter sets: batch {cfg.batch}, {cfg.image_size}², "
                     f"{cfg.dtype} — {device_name(cfg.device)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _error_bar(row: dict, key: str, invert: bool = False) -> Tuple[float, float]:
    """The distances from the plotted ratio (1 / it with `invert`) down and up to the ends of its interval."""
    value, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if value is None or low is None or high is None:
        return 0.0, 0.0
    if invert:
        value, low, high = 1 / value, 1 / high, 1 / low
    return max(value - low, 0.0), max(high - value, 0.0)


def _ratio_panel(ax, done: List[dict], key: str, memory: Callable[[dict], str], xlabel: str, title: str) -> None:
    """One panel of horizontal bars growing from 1 to each row's ratio `key` (log scale), its interval as an error
    bar and a label: the ratio, its interval and verdict, and `memory(row)`. Model mode's and mixed mode's plots."""
    values = [r[key] for r in done]
    errors = [_error_bar(r, key) for r in done]
    bars = ax.barh([r["method"] for r in done], [v - 1 for v in values], left=1.0,
                   color=[VERDICT_COLORS.get(r.get("verdict"), "#aaaaaa") for r in done])
    ax.errorbar(values, range(len(done)), xerr=list(zip(*errors)) if errors else None, fmt="none",
                ecolor="black", capsize=3, linewidth=1)
    for bar, r in zip(bars, done):
        text = f"{r[key]:.2f}×"
        if r.get("verdict") != REFERENCE:
            text += f" [{_interval(r, key)}] {r.get('verdict') or ''}"
        ax.text(max(1.0, r[key], r.get(f"{key}_high") or 0), bar.get_y() + bar.get_height() / 2,
                " " + text + memory(r), va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    highest = max([r.get(f"{key}_high") or r[key] for r in done], default=1.0)
    lowest = min([r.get(f"{key}_low") or r[key] for r in done], default=1.0)
    ax.set_xlim(min(lowest, 1.0) / 1.3, max(highest, 1.0) * 6)  # room for the labels right of the bars
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
    ax.minorticks_off()
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)


def model_plot(path: str, rows: List[dict], cfg: Config) -> None:
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 0.5 + 0.45 * len(cfg.methods) * len(models) + 0.6),
                             squeeze=False)
    for ax, model_name in zip(axes[:, 0], models):
        done = [r for r in rows if r["model"] == model_name and r.get("speedup_vs_full") is not None]
        memory = lambda r: f"  {r['peak_mem_mib']:,.0f} MiB" if r.get("peak_mem_mib") is not None else ""  # noqa: E731
        # Bars grow from 1 (level with full fine-tuning): right for a speed-up, left for a slow-down.
        _ratio_panel(ax, done, "speedup_vs_full", memory,
                     f"speed-up over full fine-tuning (median over rounds, {CONFIDENCE:.0%} interval; log scale)",
                     f"{model_name}: batch {cfg.batch}, {cfg.image_size}², {cfg.dtype} — {device_name(cfg.device)}")
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
                values, errors = [], []
                for layer in layers:
                    value = by_layer.get(layer, {}).get(key)
                    values.append(float("nan") if value is None else (1 / value if key == "ratio_vs_conv" else value))
                    errors.append(_error_bar(by_layer.get(layer, {}), key, invert=key == "ratio_vs_conv"))
                ax.bar([x + (k - (len(methods) - 1) / 2) * width for x in range(len(layers))], values, width,
                       yerr=list(zip(*errors)), capsize=1.5, error_kw=dict(linewidth=0.6), label=method)
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
    columns, to_markdown, plot = {"layers": (LAYER_COLUMNS, layer_markdown, layer_plot),
                                  "mixed": (MIXED_COLUMNS, mixed_markdown, mixed_plot)}.get(
        cfg.mode, (MODEL_COLUMNS, model_markdown, model_plot))
    write_csv(os.path.join(cfg.out, "results.csv"), rows, columns)
    markdown = to_markdown(rows, cfg)
    with open(os.path.join(cfg.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown.rstrip("\n") + "\n")
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
        plot(os.path.join(cfg.out, "results.png"), rows, cfg)
    return markdown

