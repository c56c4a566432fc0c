"""The collaborative recipe on the digits demo: shared+personal, personal-only and shared-only CoLoRA adapters
over several seeds (`colora-finetune --tasks 5`).

    python benchmarks/collab_study.py [--seeds 10] [--out benchmarks/results/collab-study]

For each seed the demo pre-trains its backbone on digits 0-4, then `colora-finetune --tasks 5` splits digits
5-9 into 5 tasks of related classes, (5, 6), (6, 7), (7, 8), (8, 9), (9, 5), each with its own head and
`--task-samples` training images per class (3 and 10: few samples), and trains the three strategies on the same
data (40 passes of one step per task, Adam 3e-3, rank 1), once with every batch mixing the tasks
(`--task-batches mixed`: each sample with its own task's adapters, `cf.adapters_per_sample`) and once with one
task per batch (`separate`). Writes results.csv (batches × strategy × seed × task), results.md (per batching,
strategy and task: mean ± std of the test accuracy over seeds; trained parameters) and study.log.
"""
import os
import statistics
import sys
import tempfile

import torch

from colora_fused.finetune import collab, recipe as finetune
from colora_fused.toolbox import duration

import study_common

SAMPLES = (3, 10)
TASKS = 5


def main(argv=None):
    args = study_common.parse_args(argv, __doc__.split("\n\n")[0], 10, "collab-study")
    rows, params = [], {}
    runs = len(collab.TASK_BATCHES) * args.seeds * len(SAMPLES)
    with study_common.progress(args, "collab-study", runs) as progress, tempfile.TemporaryDirectory() as work:
        for batches in collab.TASK_BATCHES:
            for samples in SAMPLES:
                for seed in range(args.seeds):
                    out = os.path.join(work, f"{batches}-k{samples}-s{seed}")
                    progress.phase(f"{batches} batches, {samples} per class, seed {seed}")
                    results = finetune.run(["--tasks", str(TASKS), "--task-samples", str(samples), "--epochs", "40",
                                            "--task-batches", batches, "--seed", str(seed), "--no-progress",
                                            "--out", out])
                    for r in results:
                        params[r["strategy"]] = r["trained_params"]
                        for task, acc in enumerate(r["task_acc"]):
                            rows.append(dict(batches=batches, samples=samples, strategy=r["strategy"], seed=seed,
                                             task=task, test_acc=acc))
                    progress.advance()
                    progress.message(f"[collab-study] {batches} batches, {samples} per class, seed {seed}: "
                                     + ", ".join(f"{r['strategy']} {r['mean_acc']:.3f}" for r in results)
                                     + f" | {duration(progress.elapsed())} elapsed, {progress.tally()}")
    tasks = [f"({5 + t}, {5 + (t + 1) % 5})" for t in range(TASKS)]
    lines = ["# The collaborative recipe: shared + personal CoLoRA adapters on digits tasks", "",
             f"Command: `python benchmarks/collab_study.py --seeds {args.seeds}` (CPU, one thread, torch "
             f"{torch.__version__}). Test accuracy per task, mean ± std over seeds 0-{args.seeds - 1} (each seed its "
             "own pre-trained backbone, task split and training images); `mean`: over the tasks, its std over "
             "seeds. Trained parameters include the five per-task heads. `mixed`: every batch mixes the tasks, each "
             "sample with its own task's adapters (`cf.adapters_per_sample`); `separate`: one task per batch.", ""]
    for batches, samples in ((b, k) for b in collab.TASK_BATCHES for k in SAMPLES):
        lines += [f"## {batches} batches, {samples} training images per class and task", "",
                  "| strategy | trained params | " + " | ".join(tasks) + " | mean |",
                  "|---|---|" + "---|" * (len(tasks) + 1)]
        for strategy in collab.STRATEGIES:
            rs = [r for r in rows if r["batches"] == batches and r["samples"] == samples
                  and r["strategy"] == strategy]
            cells = []
            for task in range(TASKS):
                accs = [r["test_acc"] for r in rs if r["task"] == task]
                cells.append(f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}")
            per_seed = [statistics.mean(r["test_acc"] for r in rs if r["seed"] == s) for s in range(args.seeds)]
            lines.append(f"| {strategy} | {params[strategy]:,} | " + " | ".join(cells)
                         + f" | {statistics.mean(per_seed):.4f} ± {statistics.stdev(per_seed):.4f} |")
        lines.append("")
    study_common.write_results(args.out, rows, lines)


if __name__ == "__main__":
    sys.exit(main())
