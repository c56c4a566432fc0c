"""colora-bench's outputs: results.csv, results.md (what the README quotes), results.png and env.json."""
import csv
import json
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch

from .bench_common import Config, device_name, environment, memory_metric, peak_tflops

MODEL_COLUMNS = ("model", "method", "status", "step_ms", "step_ms_p20", "step_ms_p80", "steps", "images_per_s",
                 "speedup_vs_full", "peak_mem_mib", "mem_vs_full", "trainable_params", "total_params", "note")
LAYER_COLUMNS = ("model", "layer", "count", "method", "mode", "auto_path", "status", "ms", "ms_p20", "ms_p80",
                 "gflop", "tflops", "peak_fraction", "ratio_vs_conv", "speedup_vs_full", "batch", "in_channels",
                 "out_channels", "kernel", "stride", "groups", "input_size")


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
        "`all convs` sums each shape's time × its count. auto: the path a CoLoRA layer with backend=\"auto\" "
        "takes for the shape (torch: K0 + ΔK merged, one library conv; triton: the fused kernels).", ""]
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
                    text += f" · {r[ratio_key]:.2f}×"
                cells[(r["layer"], r["method"])] = text
            body = [(layer, _fmt(count, "d"), auto) + tuple(cells.get((layer, m), "") for m in methods)
                    for layer, (count, auto) in layers.items()]
            lines += [f"## {model_name}: {mode}", ""] + _table(("layer", "count", "auto") + tuple(methods), body) + [""]
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

