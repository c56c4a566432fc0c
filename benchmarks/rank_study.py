"""Rank, capacity allocation and merge schedules on the digits demo of `colora-finetune`, over several seeds.

    python benchmarks/rank_study.py [--seeds 20] [--out benchmarks/results/rank-study]

For each seed the demo's backbone is pre-trained once on digits 0-4 (`colora-finetune --strategy full`), then
CoLoRA fine-tunes it on digits 5-9 under each setting below (the demo's defaults otherwise: 8 epochs, batch 32,
Adam 3e-3, merge every 4 epochs). Settings in pairs of equal adapter budgets:

- rank 1 on every backbone conv, and `--rank-budget` at that many adapter parameters;
- rank 2 on every backbone conv, and `--rank-budget` at that many;
- `--rank-budget` at half the rank-1 count (what allocation does when not every conv can have a term);
- rank 1 with the three merge schedules: every 4 epochs (the first setting), per layer when its relative update
  ‖ΔK‖/‖K0‖ reaches 0.1 (checked every step), and every layer when the model's does.

Writes results.csv (one row per setting and seed), results.md (mean ± std per setting, and seed 0's allocation
plans) and study.log (progress).
The test accuracy is the best-validation model's, as `colora-finetune` reports it.
"""
import os
import statistics
import sys
import tempfile

import torch

import colora_fused as cf
from colora_fused.finetune import recipe as finetune
from colora_fused.toolbox import duration

import study_common

THRESHOLD = 0.1


def adapter_budget(rank: int) -> int:
    """Adapter parameters (Kp, Kd, Δb) of the demo's backbone with every conv at `rank`."""
    spec = finetune.build_model("smallcnn", 5, 1)
    finetune.setup_strategy(spec, "colora", rank=rank)
    return cf.count_parameters(spec.model)["adapter"]


def settings():
    b1, b2 = adapter_budget(1), adapter_budget(2)
    step = ["--merge-unit", "step", "--merge-every", "1", "--merge-when", str(THRESHOLD)]
    return [
        ("rank 1 everywhere", b1, ["--rank", "1"]),
        ("allocated rank (rank-1 budget)", b1, ["--rank-budget", str(b1)]),
        ("rank 2 everywhere", b2, ["--rank", "2"]),
        ("allocated rank (rank-2 budget)", b2, ["--rank-budget", str(b2)]),
        ("allocated rank (half the rank-1 budget)", b1 // 2, ["--rank-budget", str(b1 // 2)]),
        (f"rank 1, merge a layer at ‖ΔK‖/‖K0‖ ≥ {THRESHOLD}", b1, step),
        (f"rank 1, merge all at the model's ‖ΔK‖/‖K0‖ ≥ {THRESHOLD}", b1, step + ["--merge-scope", "model"]),
    ]


def main(argv=None):
    args = study_common.parse_args(argv, __doc__.split("\n\n")[0], 20, "rank-study")
    table = settings()
    rows, plans = [], {}
    with study_common.progress(args, "rank-study", args.seeds * len(table)) as progress, \
            tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            pre = os.path.join(work, f"seed{seed}", "pretrain")
            progress.phase(f"seed {seed}: pre-training")
            finetune.run(["--strategy", "full", "--epochs", "0", "--seed", str(seed), "--no-progress", "--out", pre])
            weights = os.path.join(pre, "pretrain", "model_final.safetensors")
            for index, (name, budget, extra) in enumerate(table):
                out = os.path.join(work, f"seed{seed}", str(index))
                progress.phase(f"seed {seed} | {name}")
                result = finetune.run(["--weights", weights, "--strategy", "colora", "--seed", str(seed),
                                       "--no-progress", "--out", out, *extra])[0]
                if seed == 0 and "--rank-budget" in extra:
                    with open(os.path.join(out, "finetune.log")) as f:
                        text = f.read()
                    first = text.rindex("\n", 0, text.index("| conv |")) + 1
                    plans[name] = text[first:text.index("used.") + len("used.")]
                    plans[name] = "\n".join(line.split(" ", 1)[1] for line in plans[name].splitlines())
                rows.append(dict(setting=name, budget=budget, seed=seed, test_acc=result["test_acc"],
                                 val_acc=result["val_acc"], trained_params=result["trained_params"],
                                 merges=result["merges"]))
                progress.advance()
                progress.message(f"[rank-study] seed {seed} | {name}: test acc {result['test_acc']:.4f}, "
                                 f"{result['merges']} merges | {duration(progress.elapsed())} elapsed, "
                                 f"{progress.tally()}")
    lines = ["# Rank, allocated capacity and merge schedules: the digits demo of colora-finetune", "",
             f"Command: `python benchmarks/rank_study.py --seeds {args.seeds}` (CPU, one thread, "
             f"torch {torch.__version__}). Test accuracy of the best-validation model, mean ± std over seeds "
             f"0-{args.seeds - 1}; each seed pre-trains its own backbone on digits 0-4, then every setting "
             "fine-tunes it on digits 5-9 (8 epochs, batch 32, Adam 3e-3; merges every 4 epochs unless the "
             "setting says otherwise). `adapter budget`: Kp, Kd and Δb parameters a setting may use; "
             "`trained params` adds the classifier head.", "",
             "| setting | adapter budget | trained params | merges | test acc |", "|---|---|---|---|---|"]
    for name, budget, _ in table:
        rs = [r for r in rows if r["setting"] == name]
        accs = [r["test_acc"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {budget:,d} | {statistics.mean(r['trained_params'] for r in rs):,.0f} | "
                     f"{statistics.mean(r['merges'] for r in rs):.1f} | {statistics.mean(accs):.4f} ± {std:.4f} |")
    for name, plan in plans.items():
        lines += ["", f"Seed 0, {name}: the plan `cf.allocate_rank` made (printed by colora-finetune).", "", plan]
    study_common.write_results(args.out, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
