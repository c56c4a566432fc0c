"""colora-bench, the benchmark (a tool; `import colora_fused` does not load it).

    cli.py         the command line (`colora-bench`, `python -m colora_fused.bench`)
    model_mode.py  whole models: full fine-tuning, CoLoRA per backend, PEFT LoRA, step time and peak memory
    layer_mode.py  each distinct conv shape: forward and training step, TFLOP/s
    mixed_mode.py  one batch mixing adapter sets (--mixed A): adapters_per_sample against one adapter, a loop
                   over the sets and PEFT's adapter_names; forward and training step
    common.py      what the modes share: methods, configuration, interleaved timing, the environment, the
                   progress report (colora_fused.toolbox's, with colora-bench's prefix)
    stats.py       paired per-round ratios, bootstrap intervals and verdicts
    report.py      results.csv, results.md, results.png, env.json
"""
from .cli import main

__all__ = ["main"]
