"""What the study scripts (rank_study.py, collab_study.py) share: their command line, their progress report and
their CSV and Markdown outputs."""
import argparse
import csv
import os
import sys

import torch

from colora_fused.toolbox import Progress


def parse_args(argv, description: str, seeds: int, folder: str) -> argparse.Namespace:
    """--seeds (0..N-1) and --out (made here; default benchmarks/results/<folder>). Torch runs on one thread: the
    demo's 8×8 convs run fastest, and reproducibly, there."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=seeds, help=f"seeds 0..N-1 (default: {seeds})")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", folder), help="results folder")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    return args


def progress(args: argparse.Namespace, name: str, runs: int) -> Progress:
    """The study's progress report (`colora_fused.toolbox.Progress`): on stdout, a line "[name] ..." per phase (a
    run starting), a heartbeat between, and the study's messages (a run's result), all in <out>/study.log too.
    No bar: colora-finetune's own lines come between."""
    return Progress(runs, stream=sys.stdout, log_path=os.path.join(args.out, "study.log"), unit="run",
                    prefix=f"[{name}] ", bar=False)


def write_results(out: str, rows, lines) -> None:
    """results.csv (one row a dict, the first row's keys as the header) and results.md (the lines), printed too."""
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
