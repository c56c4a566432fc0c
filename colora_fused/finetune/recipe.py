"""colora-finetune: the paper's fine-tuning recipe end to end (Rivera & Hoyos 2025, §3.3 and §4).

A pretrained backbone gets the paper's head — a 1×1 conv reducing the backbone's channels to 128, then two
fully connected layers — and is fine-tuned with one of three strategies, on the same data and schedule:

  colora  CoLoRA on every backbone conv + the head trained; the adapters are merged into the frozen weights and
          reset every N epochs (the paper: every epoch) or every N steps, clearing their optimizer state.
  full    every parameter trained.
  head    the backbone frozen, only the head trained.

With no ``--data`` it runs a demo that needs no download: a small CNN is pre-trained on scikit-learn's digits
0–4, then fine-tuned on digits 5–9 with each strategy, and a comparison table is printed.

``--tasks N`` runs the collaborative recipe instead (``collab.py``): N tasks of related classes, each
with its head, trained with shared+personal, personal-only and shared-only named CoLoRA adapters.

Merge schedule on small data. A merge folds ΔK into the frozen weights, resets Kd = 0, draws a fresh Kp and
clears Adam's moments for them, so every merge period restarts the adapters from ΔK = 0 (with dL/dKp = 0 until
Kd has moved) and Adam from its first step. Each period needs enough steps to make progress. Measured on the
digits demo (537 training images; Adam lr 3e-3; smallcnn pre-trained on digits 0-4; test accuracy of the
best-validation epoch, mean ± std over seeds 0-4; test split 179 images, one image = 0.006):

  batch 32 (17 steps/epoch), 8 epochs = 136 steps      batch 128 (5 steps/epoch), 8 epochs = 40 steps
    colora, merge every 5 steps (27 merges) 0.941±0.021    colora, merge every epoch (8)     0.897±0.022
    colora, merge every epoch (8)           0.949±0.011    colora, merge every 20 steps (2)  0.892±0.020
    colora, merge every 4 epochs (2)        0.964±0.011    colora, merge only at the end     0.903±0.020
    colora, merge only at the end           0.966±0.018    full                              0.970±0.010
    full                                    0.972±0.016    head                              0.880±0.029
    head                                    0.915±0.016

Every 4 epochs beat every epoch on each of the five seeds (+0.011 to +0.022). The step budget matters most:
with 40 steps CoLoRA (like head-only) stays ~7 points below full fine-tuning whatever the schedule, with 136
steps it is within ~1 point once a merge period spans ~60 steps or more. The demo therefore uses batch 32
and merges every 4 epochs (68 steps); with data sets the default is the paper's merge per epoch, which on
OCTMNIST (97k training images) leaves thousands of steps per period. Lower learning rates shrink what one
period can do (lr 1e-3, batch 32: every epoch 0.931, every 5 steps 0.918, at the end 0.936).

Outputs (per strategy, under ``--out/<strategy>/``): ``history.json``/``history.csv`` (per-epoch train, val
and test loss and accuracy, steps skipped), ``checkpoint.pt`` (resumable), ``best.safetensors`` (the
best-validation-accuracy model) and ``model_final.safetensors`` (the final one), both merged plain models
written by ``serialization.save_merged`` (no adapter keys; loadable into the unwrapped architecture without this
package), ``metrics.json`` (accuracy, per-class recall/precision/specificity/AUC of the best model on the test
split), ``confusion_matrix.png`` and ``roc.png``; ``summary.json``/``summary.csv`` and ``finetune.log`` (every
progress line, time-stamped, appended across resumes) under ``--out``.

Crash safety. Every file but the log is written by ``serialization.atomic_write`` (temporary file, fsync,
rename, fsync of the folder), and an epoch's checkpoint is its last write, so a kill at any instant leaves the
last checkpoint whole and ``--resume`` reproduces the uninterrupted run (bit for bit on the CPU). With
``--resume``, every checkpoint is read and checked against this run's settings and model before anything
trains; one that cannot be used stops the run with its path and the reason, and nothing is written.

Non-finite training. A NaN/Inf loss or gradient stops the run before the update with a message naming the
strategy, epoch and step; the last checkpoint stays as it was and no non-finite delta is merged. With
``--skip-nonfinite`` such steps are skipped instead (as AMP's GradScaler skips them) and counted.

Progress. On a terminal a progress bar; otherwise (a log, CI, ``--no-progress``) a line per phase and per
epoch, and during an epoch at least every ``--log-every`` seconds (30), each with the elapsed time and what
remains.

Merges. ``cf.MergeSchedule`` runs them (``--merge-every``/``--merge-unit``, ``--merge-when``/``--merge-scope``
as its ``every``/``unit``/``threshold``/``scope``), seeded with ``--seed`` so that each merge's fresh Kp is drawn
from the seed and the merge's number: the same draws in a resumed run. ``cf.get_colora_model`` wraps and
freezes (``models.setup_strategy``).

Checkpoints hold what training changed: the adapters (``cf.colora_state_dict``) and the head, the buffers
(BatchNorm statistics), the optimizer state, the merge schedule's state, counters and RNG states. Once a merge
has happened the merged base weights of the CoLoRA layers are part of that too (merging moves the update into
them), so an adapters-and-head-only checkpoint is what ``--merge-every 0`` (merge only at the end) produces.

Multi-GPU: ``torchrun --nproc_per_node G -m colora_fused.finetune ...`` trains with DistributedDataParallel
(NCCL on GPUs, gloo on CPU); every rank merges at the same step, rank 0 logs and writes the files.

This module is the command line and the training loop; the models and strategies live in models.py, the
checkpoint and output files in checkpoint.py, evaluation and the test report in evaluation.py, the data in
data.py, the progress report in ``colora_fused.toolbox``.
"""
import argparse
import copy
import importlib.util
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import colora_fused as cf
from . import collab, metrics
from .. import backends
from .checkpoint import (CHECKPOINT_FORMAT, check_checkpoint, read_checkpoint, run_config, save_history_csv,
                         save_json, save_torch, trained_state)
from .data import (DataError, EpochSampler, load_data, load_digits_task, make_loader, prepare_batch,
                   training_set)
from .evaluation import predict, scores, write_test_report
from .models import UsageError, build_model, in_head, read_state_dict, setup_strategy
from ..serialization import save_merged
from ..toolbox import Progress, duration

STRATEGIES = ("colora", "full", "head")

DEMO_DEFAULTS = dict(epochs=8, pretrain_epochs=10, batch_size=32, lr=3e-3, merge_every=4)
DATA_DEFAULTS = dict(epochs=20, batch_size=32, lr=1e-4, merge_every=1)


class NonFiniteError(RuntimeError):
    """Training met a NaN/Inf loss, gradient or parameter; the message names the strategy, epoch and step."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0

    @property
    def active(self):
        return self.world > 1


def init_distributed(device):
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if world <= 1:
        return Dist(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


class Log(Progress):
    """colora-finetune's progress report (``toolbox.Progress``): the recipe's own lines on stdout, from rank 0
    only (``enabled``), each also in finetune.log once it is opened (appended: a resumed run adds to it); on a
    terminal, unless ``bar=False`` (``--no-progress``), a bar over the training steps instead of step lines."""

    def __init__(self, enabled=True, bar=True):
        super().__init__(stream=sys.stdout, bar=bar, lines=False, interval_s=None, enabled=enabled)


class Trainer:
    """One strategy's run: model, optimizer, loaders, the training loop and the run's files.

    Merges: ``cf.MergeSchedule`` (CoLoRA with ``--merge-every`` above 0), told of every step and epoch.

    Crash safety: every file goes through ``atomic_write``, and each epoch writes its checkpoint last, so a
    kill at any instant leaves the previous epoch's checkpoint whole; ``--resume`` redoes what came after it,
    which on the CPU reproduces the uninterrupted run bit for bit (data order, merges' Kp draws and the RNG
    state are all restored or derived from the seed).

    Non-finite values: every step checks the loss and the gradients before ``optimizer.step()``; a NaN/Inf
    stops the run with :class:`NonFiniteError` (the update not taken, nothing written after the last
    checkpoint) or, with ``--skip-nonfinite``, drops that step as AMP's GradScaler does. A merge of a
    non-finite delta is refused (``merge_colora``), and the parameters are checked before each checkpoint.
    """

    def __init__(self, args, splits, spec, strategy, out_dir, ctx):
        self.args, self.splits, self.spec, self.strategy = args, splits, spec, strategy
        self.out, self.ctx = out_dir, ctx
        self.tag = f"[{strategy}]"
        self.model = spec.model.to(ctx.device)
        self.channels_last = ctx.device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names, self.params = [n for n, _ in named], [p for _, p in named]
        self.optimizer = torch.optim.Adam(self.params, lr=args.lr, weight_decay=args.weight_decay)
        self.schedule = None
        if strategy == "colora" and args.merge_every > 0:
            self.schedule = cf.MergeSchedule(self.model, self.optimizer, args.merge_every, args.merge_unit,
                                             args.merge_when, args.merge_scope, seed=args.seed)
        self.net = self.model
        if ctx.active:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.image_size = args.image_size or spec.image_size
        train = training_set(splits.train, args.balance)
        self.sampler = EpochSampler(train.labels, shuffle=True, balance=args.balance == "sample",
                                    num_replicas=ctx.world, rank=ctx.rank, seed=args.seed)
        self.train_loader = make_loader(train, self.sampler, args.batch_size, args.workers, ctx.device.type == "cuda")
        self.ck_path = os.path.join(out_dir, "checkpoint.pt")
        self.epoch = self.step = self.skipped = 0
        self.train_time = 0.0
        self.best = {"val_acc": -1.0, "epoch": None, "test_probs": None, "test_labels": None}
        self.history = []

    @property
    def merges(self):
        return len(self.schedule.merges) if self.schedule is not None else 0

    def config(self):
        return run_config(self.args, self.strategy, self.splits, self.ctx.world)

    def _input(self, images):
        return prepare_batch(images, self.spec, self.image_size, self.ctx.device, self.channels_last)

    def _finished(self, unit):
        """Tell the merge schedule that a step or an epoch ("step", "epoch") finished: it merges when one is due.
        ``merge_colora`` checks every layer first, so a refused merge changed nothing."""
        if self.schedule is None:
            return
        try:
            if unit == "step":
                self.schedule.step()
            else:
                self.schedule.epoch_end()
        except ValueError as e:
            raise NonFiniteError(f"{self.tag} the merge after step {self.step} was refused: {e}; "
                                 f"{self._kept()}") from None

    def _kept(self):
        if self.epoch == 0:
            return "no epoch had finished, so this run has no checkpoint yet"
        return (f"the last good checkpoint, {self.ck_path} (end of epoch {self.epoch}), is kept: --resume continues "
                "from it")

    def _nonfinite(self, loss):
        """None when the loss and every gradient are finite, else which is not ('loss', 'gradient of <name>').

        One host sync per step (as GradScaler's); under DDP the ranks agree (MIN over their flags), so every
        rank stops or skips together.
        """
        ok = torch.ones((), dtype=torch.bool, device=loss.device)
        flags = torch.stack([torch.isfinite(loss)]
                            + [torch.isfinite(p.grad).all() if p.grad is not None else ok for p in self.params])
        if self.ctx.active:
            flags = flags.int()
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if bool(flags.all()):
            return None
        first = int(torch.nonzero(flags == 0)[0, 0])
        return "loss" if first == 0 else f"gradient of {self.param_names[first - 1]}"

    def train_epoch(self, log):
        """One pass over the training split; returns (mean loss, accuracy, steps skipped) over the steps taken."""
        a = self.args
        self.net.train()
        self.sampler.set_epoch(self.epoch)
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # loss sum, correct, count
        where = f"{self.strategy} epoch {self.epoch + 1}/{a.epochs}"
        log.detail(where)
        lines = not log.has_bar  # no bar to watch: progress lines every --log-every seconds instead
        steps, skipped, start = len(self.train_loader), 0, time.perf_counter()
        for i, (images, labels) in enumerate(self.train_loader, 1):
            x = self._input(images)
            y = labels.to(self.ctx.device, non_blocking=True)
            with torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, enabled=a.amp):
                logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            bad = self._nonfinite(loss)
            if bad is None:
                self.optimizer.step()
                totals[0] += loss.detach() * y.numel()
                totals[1] += (logits.argmax(1) == y).sum()
                totals[2] += y.numel()
            else:
                at = f"epoch {self.epoch + 1}/{a.epochs}, step {self.step + 1} (batch {i}/{steps} of the epoch)"
                if not a.skip_nonfinite:
                    raise NonFiniteError(f"{self.tag} non-finite {bad} at {at}; stopped before the update; "
                                         f"{self._kept()}. Lower --lr, check the data, or pass --skip-nonfinite to "
                                         "skip such steps")
                skipped += 1
                log.message(f"{self.tag} non-finite {bad} at {at}: step skipped (--skip-nonfinite)")
            self.step += 1
            log.advance()
            if lines and self._line_due(log):
                per_step = (time.perf_counter() - start) / i
                left = per_step * ((steps - i) + (a.epochs - self.epoch - 1) * steps)
                log.message(f"{self.tag} epoch {self.epoch + 1}/{a.epochs} step {i}/{steps}  loss {loss.item():.4f} | "
                            f"{duration(log.elapsed())} elapsed, ~{duration(left)} of training left")
            elif not lines and self.step % 20 == 0:  # .item() waits for the GPU: not every step
                log.detail(f"{where} loss {loss.item():.3f}")
            self._finished("step")
        if skipped == steps:
            raise NonFiniteError(f"{self.tag} every step of epoch {self.epoch + 1}/{a.epochs} was non-finite and "
                                 f"skipped; {self._kept()}")
        if self.ctx.active:
            dist.all_reduce(totals)
            for b in self.model.buffers():  # BatchNorm statistics: keep rank 0's on every rank
                dist.broadcast(b, 0)
        self._check_parameters()
        self.epoch += 1
        self._finished("epoch")
        self.skipped += skipped
        loss_sum, correct, count = totals.tolist()
        return loss_sum / count, correct / count, skipped

    def _check_parameters(self):
        """A finite gradient can still step a parameter to Inf: nothing non-finite is merged or checkpointed."""
        bad = [n for n, p in zip(self.param_names, self.params) if not bool(torch.isfinite(p).all())]
        if bad:
            raise NonFiniteError(f"{self.tag} parameters {', '.join(bad[:3])} became non-finite in epoch "
                                 f"{self.epoch + 1} (by step {self.step}); {self._kept()}")

    def _line_due(self, log):
        """Whether a progress line is due (rank 0): ``--log-every`` seconds since the last line of any kind."""
        return self.ctx.main and self.args.log_every >= 0 and log.quiet_for() >= self.args.log_every

    def evaluate(self, dataset, log, name):
        """(loss, accuracy, probabilities, labels) on ``dataset``, with progress lines while it runs."""
        def line(i, n):
            if self._line_due(log):
                log.message(f"{self.tag} epoch {self.epoch}/{self.args.epochs} evaluating {name}: batch {i}/{n} | "
                            f"{duration(log.elapsed())} elapsed")

        logits, labels = predict(self.model, dataset, self.ctx, self.args.batch_size * 2, self.args.workers,
                                 self._input, self.args.amp, self.splits.num_classes, line)
        return scores(logits, labels)

    def checkpoint(self):
        rng = {"torch": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config(),
            "epoch": self.epoch, "step": self.step, "merges": self.merges, "skipped_steps": self.skipped,
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "model": trained_state(self.model, self.strategy, self.merges > 0),
            "optimizer": self.optimizer.state_dict(),
            "best": self.best, "history": self.history, "rng": rng, "train_time_s": self.train_time,
        }

    @torch.no_grad()
    def resume(self, path):
        ck = read_checkpoint(path)
        check_checkpoint(ck, path, self.config(), self.model, self.strategy)
        own = self.model.state_dict()
        for k, v in ck["model"].items():
            own[k].copy_(v)
        self.optimizer.load_state_dict(ck["optimizer"])
        if self.schedule is not None:
            self.schedule.load_state_dict(ck["schedule"])
        self.epoch, self.step, self.skipped = ck["epoch"], ck["step"], ck["skipped_steps"]
        self.best, self.history, self.train_time = ck["best"], ck["history"], ck["train_time_s"]
        torch.set_rng_state(ck["rng"]["torch"])
        if "cuda" in ck["rng"] and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.ctx.device)

    def save_epoch(self, improved):
        """Rank 0 writes the epoch's files: the best model when it improved, the history, then the checkpoint,
        which commits the epoch (a kill before it only makes ``--resume`` redo the epoch)."""
        if not self.ctx.main:
            return
        os.makedirs(self.out, exist_ok=True)
        if improved:
            save_merged(self.model, os.path.join(self.out, "best.safetensors"), self.config())
        save_json(self.history, os.path.join(self.out, "history.json"))
        save_history_csv(self.history, os.path.join(self.out, "history.csv"))
        save_torch(self.checkpoint(), self.ck_path)

    def run(self, log):
        """Train the remaining epochs, then write the final model and reports; returns the result row."""
        a, out, tag = self.args, self.out, self.tag
        if a.resume and os.path.exists(self.ck_path):
            self.resume(self.ck_path)
            log.message(f"{tag} resumed from {self.ck_path} at epoch {self.epoch}/{a.epochs}, step {self.step}")
        counts = cf.count_parameters(self.model)
        if self.epoch < a.epochs:
            log.message(f"{tag} training epochs {self.epoch + 1}-{a.epochs}, {len(self.train_loader)} steps each, "
                        f"{counts['trainable']:,} of {counts['total']:,} parameters trained")
            log.add_total((a.epochs - self.epoch) * len(self.train_loader))
        start, epochs_here = time.perf_counter(), 0
        while self.epoch < a.epochs:
            t0 = time.perf_counter()
            train_loss, train_acc, skipped = self.train_epoch(log)
            dt = time.perf_counter() - t0
            self.train_time += dt
            val_loss, val_acc, _, _ = self.evaluate(self.splits.val, log, "val")
            test_loss, test_acc, test_probs, test_labels = self.evaluate(self.splits.test, log, "test")
            row = {"epoch": self.epoch, "step": self.step, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                   "merges": self.merges, "skipped_steps": skipped, "epoch_time_s": dt}
            self.history.append(row)
            improved = val_acc > self.best["val_acc"]
            if improved:
                self.best = {"val_acc": val_acc, "epoch": self.epoch, "test_probs": test_probs,
                             "test_labels": test_labels}
            self.save_epoch(improved)
            epochs_here += 1
            left = (time.perf_counter() - start) / epochs_here * (a.epochs - self.epoch)
            log.message(f"{tag} epoch {self.epoch}/{a.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f} | "
                        f"val loss {val_loss:.4f} acc {val_acc:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                        f"{dt:.1f}s" + (f", {skipped} skipped" if skipped else "") + ("  *best" if improved else "")
                        + f" | {duration(log.elapsed())} elapsed, ~{duration(left)} left")
        if a.dump_rank_state:
            os.makedirs(a.dump_rank_state, exist_ok=True)
            save_torch(OrderedDict((k, v.detach().cpu()) for k, v in self.model.state_dict().items()),
                       os.path.join(a.dump_rank_state, f"{self.strategy}_rank{self.ctx.rank}.pt"))
        result = {"strategy": self.strategy, "epochs": self.epoch, "steps": self.step, "merges": self.merges,
                  "skipped_steps": self.skipped, "trained_params": counts["trainable"],
                  "total_params": counts["total"], "adapter_params": counts["adapter"],
                  "train_time_s": self.train_time, "wall_time_s": time.perf_counter() - start}
        if self.best["epoch"] is None:
            return result
        report = metrics.classification_report(self.best["test_labels"], self.best["test_probs"],
                                               self.splits.class_names)
        result.update(best_epoch=self.best["epoch"], val_acc=self.best["val_acc"], test_acc=report["accuracy"],
                      test_auc=report["macro"]["auc"], final_test_acc=self.history[-1]["test_acc"])
        if self.ctx.main:
            log.message(f"{tag} writing the final model and reports to {out}")
            save_merged(self.model, os.path.join(out, "model_final.safetensors"), self.config())
            write_test_report(out, self.strategy, self.best, report, result, self.splits.class_names)
        log.message(f"{tag} done: test acc {report['accuracy']:.4f} (best epoch {self.best['epoch']}) | "
                    f"{duration(log.elapsed())} elapsed")
        return result


def build_parser():
    demo, data = DEMO_DEFAULTS, DATA_DEFAULTS
    p = argparse.ArgumentParser(
        prog="colora-finetune",
        description="Fine-tune a pretrained CNN with CoLoRA (Rivera & Hoyos 2025), full fine-tuning or head-only "
                    "training, and compare. With no --data: the bundled digits demo (pre-train on 0-4, fine-tune on "
                    "5-9). Files are written atomically; --resume continues after a crash or kill.")
    p.add_argument("--data", metavar="PATH",
                   help="a MedMNIST .npz file or an ImageFolder directory (default: the digits demo)")
    p.add_argument("--model", help="vgg16, resnet50, smallcnn or a torchvision classification model name (default: "
                                   "vgg16; the demo: smallcnn)")
    p.add_argument("--weights", metavar="FILE",
                   help="pretrained weights: .pt/.pth (read with torch.load(weights_only=True)) or .safetensors; never "
                        "downloaded (default: the demo pre-trains its own; otherwise random initialisation)")
    p.add_argument("--strategy", help="comma list of colora, full, head, or 'all' (default: colora; the demo: all)")
    p.add_argument("--epochs", type=int, metavar="N",
                   help=f"epochs per strategy (default: {data['epochs']}; the demo: {demo['epochs']})")
    p.add_argument("--batch-size", type=int, metavar="N", help=f"batch size per process (default: {data['batch_size']}"
                   + (f"; the demo: {demo['batch_size']})" if demo["batch_size"] != data["batch_size"] else ")"))
    p.add_argument("--lr", type=float, help=f"Adam learning rate (default: {data['lr']:g}; the demo: {demo['lr']:g})")
    p.add_argument("--weight-decay", type=float, default=0.0, metavar="WD",
                   help="Adam weight decay (L2 penalty) on the trained parameters (default: 0)")
    p.add_argument("--merge-every", type=int, metavar="N",
                   help=f"merge the CoLoRA adapters into the frozen weights every N merge units; 0: only at the end "
                        f"(default: {data['merge_every']}, the paper; the demo: {demo['merge_every']})")
    p.add_argument("--merge-unit", choices=("epoch", "step"), default="epoch",
                   help="what --merge-every counts: epochs or optimizer steps (default: epoch)")
    p.add_argument("--merge-when", type=float, metavar="T",
                   help="adaptive merge: at each point --merge-every/--merge-unit names, merge only the layers whose "
                        "relative update ||dK||/||K0|| reached T (see --merge-scope); default: merge every layer there")
    p.add_argument("--merge-scope", choices=("layer", "model"), default="layer",
                   help="--merge-when per layer, or once for all layers by the whole model's ||dK||/||K0|| "
                        "(default: layer)")
    p.add_argument("--tasks", type=int, metavar="N",
                   help="the collaborative recipe instead of --strategy: N tasks of related classes (t, t+1), each "
                        "with its head, trained as shared+personal, personal-only and shared-only CoLoRA adapters side "
                        "by side; an epoch is then one step per task (the study uses --epochs 40)")
    p.add_argument("--task-batches", choices=collab.TASK_BATCHES, default="mixed",
                   help="with --tasks: 'mixed' batches hold every task's images, each sample with its task's adapters "
                        "(cf.adapters_per_sample); 'separate': one task per batch (default: mixed)")
    p.add_argument("--task-samples", type=int, default=10, metavar="K",
                   help="with --tasks: training images per class and task, no image in two tasks (default: 10)")
    p.add_argument("--rank", type=int, default=1, metavar="R",
                   help="Kp (x) Kd terms of each CoLoRA layer (default: 1, the paper)")
    p.add_argument("--rank-budget", type=int, metavar="PARAMS",
                   help="instead of --rank: give each backbone conv a rank by its measured contribution "
                        f"(cf.allocate_rank, {ALLOCATION_BATCHES} training batches) within this many adapter "
                        "parameters; convs given rank 0 stay frozen")
    p.add_argument("--order", choices=("pointwise_first", "depthwise_first"), default="pointwise_first",
                   help="CoLoRA factor order: pointwise_first (paper §3.2, Kd per output channel) or depthwise_first "
                        "(paper §3.1, Keras SeparableConv2D) (default: pointwise_first)")
    p.add_argument("--backend", choices=backends.NAMES, default="auto",
                   help="CoLoRA conv implementation: auto picks the fastest on a GPU and torch elsewhere; reference is "
                        "the slow unmerged oracle (default: auto)")
    p.add_argument("--balance", choices=("none", "sample", "truncate"), default="none",
                   help="class balance of the training split: none, class-weighted sampling, or the paper's "
                        "first-n-per-class truncation (default: none)")
    p.add_argument("--image-size", type=int, metavar="PIXELS",
                   help="resize inputs to this square size (default: 224 for torchvision models, native for smallcnn)")
    p.add_argument("--head-hidden", type=int, default=128, metavar="N",
                   help="width of the head's first fully connected layer (default: 128)")
    p.add_argument("--class-names", metavar="NAMES",
                   help="comma-separated class names for reports (default: the folder names, or 0, 1, ...)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="validation share of a single ImageFolder directory (default: 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1, metavar="F",
                   help="test share of a single ImageFolder directory (default: 0.1)")
    p.add_argument("--pretrain-epochs", type=int, default=demo["pretrain_epochs"], metavar="N",
                   help=f"the demo: epochs of pre-training on digits 0-4 (default: {demo['pretrain_epochs']})")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="DataLoader worker processes for image folders (default: 4)")
    p.add_argument("--amp", action="store_true", help="train and evaluate under bf16 autocast (CUDA)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the initialisation, the data order, the demo's splits and each merge's fresh Kp "
                        "(default: 0)")
    p.add_argument("--out", default="finetune-results", metavar="DIR",
                   help="output folder: one sub-folder per strategy, summary files and finetune.log (default: "
                        "finetune-results)")
    p.add_argument("--resume", action="store_true",
                   help="continue each strategy from <out>/<strategy>/checkpoint.pt when present; a checkpoint that "
                        "cannot be read or was made by other settings stops the run before anything is written")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip an optimizer step whose loss or gradient is NaN/Inf (as AMP's GradScaler does) instead "
                        "of stopping the run; a skipped step still counts for --merge-unit step")
    p.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between progress lines during an epoch when no progress bar is shown (output not a "
                        "terminal, or --no-progress); 0: every step; negative: none (default: 30)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar on a terminal (progress lines are printed instead, see --log-every)")
    p.add_argument("--dump-rank-state", help=argparse.SUPPRESS)  # tests: every rank saves its final state here
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    demo = args.data is None
    defaults = DEMO_DEFAULTS if demo else DATA_DEFAULTS
    for k in ("epochs", "batch_size", "lr", "merge_every"):
        if getattr(args, k) is None:
            setattr(args, k, defaults[k])
    args.model = args.model or ("smallcnn" if demo else "vgg16")
    strategy = args.strategy or ("all" if demo else "colora")
    args.strategies = list(STRATEGIES) if strategy == "all" else [s.strip() for s in strategy.split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown or not args.strategies:
        raise UsageError(f"unknown strategy {', '.join(unknown) or repr(strategy)}: choose from "
                         f"{', '.join(STRATEGIES)} or all")
    for k in ("epochs", "batch_size", "pretrain_epochs"):
        if getattr(args, k) < (1 if k == "batch_size" else 0):
            raise UsageError(f"--{k.replace('_', '-')} must be positive")
    if args.merge_every < 0:
        raise UsageError("--merge-every must be >= 0")
    if args.rank < 1:
        raise UsageError("--rank must be >= 1")
    if args.tasks is not None and (args.tasks < 1 or args.task_samples < 1):
        raise UsageError("--tasks and --task-samples must be >= 1")
    if args.tasks is not None and args.merge_when is not None:
        raise UsageError("--tasks trains without merges (a personal adapter cannot be folded into shared weights): "
                         "drop --merge-when")
    if args.rank_budget is not None and args.rank_budget < 1:
        raise UsageError("--rank-budget must be a positive number of parameters")
    if args.merge_when is not None and not (math.isfinite(args.merge_when) and args.merge_when > 0):
        raise UsageError("--merge-when must be a positive number (a relative update ||dK||/||K0||)")
    if not math.isfinite(args.lr) or not math.isfinite(args.log_every):
        raise UsageError("--lr and --log-every must be finite numbers")
    args.class_names = args.class_names.split(",") if args.class_names else None
    return args


def format_table(results):
    cols = [("strategy", "{}"), ("test_acc", "{:.4f}"), ("val_acc", "{:.4f}"), ("test_auc", "{:.4f}"),
            ("trained_params", "{:,}"), ("total_params", "{:,}"), ("merges", "{}"), ("train_time_s", "{:.1f}")]
    head = ["strategy", "test acc", "val acc", "test AUC", "trained params", "total params", "merges", "train time (s)"]
    rows = [[fmt.format(r[k]) if r.get(k) is not None else "-" for k, fmt in cols] for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


ALLOCATION_BATCHES = 4


def batch_of(dataset, indices, spec, image_size, device):
    """(normalised images, labels) of `dataset`'s items at `indices`, on `device`, one item at a time (image
    folders hold images of several sizes until resized)."""
    items = [dataset[int(i)] for i in indices]
    x = torch.cat([prepare_batch(image.unsqueeze(0), spec, image_size, device, False) for image, _ in items])
    return x, torch.as_tensor([int(label) for _, label in items], device=device)


def allocated_ranks(args, spec, splits, device, log=None):
    """With ``--rank-budget``, the ranks ``cf.allocate_rank`` gives the backbone convs of ``spec`` within it,
    measured on ``ALLOCATION_BATCHES`` training batches (a draw fixed by the seed: the same plan on a resume) on
    ``device``; else ``args.rank``."""
    if not args.rank_budget:
        return args.rank
    train = training_set(splits.train, args.balance)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=g)[:ALLOCATION_BATCHES * args.batch_size]
    size = args.image_size or spec.image_size
    batches = [batch_of(train, chunk, spec, size, device) for chunk in order.split(args.batch_size)]
    spec.model.to(device)
    plan = cf.allocate_rank(spec.model, batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), args.rank_budget,
                            include=lambda n, m: not in_head(n, spec.head), order=args.order, apply=False)
    if log is not None:
        log.message("rank allocation (--rank-budget):\n" + plan.table())
    return plan.ranks


def run_strategy(args, splits, weights, strategy, ctx, log, out=None, epochs=None):
    torch.manual_seed(args.seed)
    spec = build_model(args.model, splits.num_classes, splits.in_channels, weights, args.weights or "weights",
                       args.head_hidden)
    rank = allocated_ranks(args, spec, splits, ctx.device, log) if strategy == "colora" else args.rank
    setup_strategy(spec, strategy, args.order, args.backend, rank)
    run_args = copy.copy(args)
    if epochs is not None:
        run_args.epochs = epochs
    return Trainer(run_args, splits, spec, strategy, out or os.path.join(args.out, strategy), ctx).run(log)


def main(argv=None):
    """The ``colora-finetune`` command (returns None, as a console script's exit status)."""
    run(argv)


def run(argv=None):
    """Parse ``argv``, train every strategy asked for, print the comparison; returns one result dict per strategy.

    Every check that can fail before training (options, data, weights, models, and with ``--resume`` every
    checkpoint) runs first, and exits with one line and nothing written.
    """
    try:
        args = parse_args(argv)
    except UsageError as e:
        raise SystemExit(f"colora-finetune: error: {e}") from None
    ctx = init_distributed(args.device)
    log = Log(ctx.main, bar=args.progress)
    if args.data is None and ctx.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the demo's 8×8 convs are too small to split: one thread ran it 5-10× faster
    try:
        try:
            if importlib.util.find_spec("matplotlib") is None:  # the plots come last: fail before training
                raise UsageError("colora-finetune needs matplotlib: pip install 'colora_fused[finetune]'")
            weights = read_state_dict(args.weights) if args.weights else None
            if args.data is None:
                pre = load_digits_task(range(5), seed=args.seed)
                splits = load_digits_task(range(5, 10), seed=args.seed)
            else:
                pre = None
                splits = load_data(args.data, args.image_size or 224, args.val_fraction, args.test_fraction,
                                   args.seed, args.class_names)
            pretrain = pre is not None and weights is None
            plan = [("full", pre, os.path.join(args.out, "pretrain"))] if pretrain else []
            plan += [(s, splits, os.path.join(args.out, s)) for s in args.strategies]
            for strategy, data, out in plan:  # every model, and every checkpoint to resume, before anything trains
                spec = build_model(args.model, data.num_classes, data.in_channels, weights,
                                   args.weights or "weights", args.head_hidden)
                setup_strategy(spec, strategy, args.order, args.backend,
                               allocated_ranks(args, spec, data, ctx.device) if strategy == "colora" else args.rank)
                ck = os.path.join(out, "checkpoint.pt")
                if args.resume and os.path.exists(ck):
                    check_checkpoint(read_checkpoint(ck), ck, run_config(args, strategy, data, ctx.world),
                                     spec.model, strategy)
            del spec
        except (UsageError, DataError, ValueError, TypeError) as e:
            raise SystemExit(f"colora-finetune: error: {e}") from None
        log.open_log(os.path.join(args.out, "finetune.log"), append=True)
        log.message(f"colora-finetune {' '.join(argv if argv is not None else sys.argv[1:])}", console=False)
        log.message(f"data: {splits.description}")
        try:
            if pretrain:
                log.message(f"demo: pre-training {args.model} on {pre.description} for {args.pretrain_epochs} epochs")
                pre_dir = os.path.join(args.out, "pretrain")
                run_strategy(args, pre, None, "full", ctx, log, out=pre_dir, epochs=args.pretrain_epochs)
                if ctx.active:
                    dist.barrier()
                weights = read_state_dict(os.path.join(pre_dir, "model_final.safetensors"))
                log.message(f"demo: fine-tuning on {splits.description}")
            if args.tasks:
                spec = build_model(args.model, splits.num_classes, splits.in_channels, weights,
                                   args.weights or "weights", args.head_hidden)
                size = args.image_size or spec.image_size
                prepare = lambda ds, idx: batch_of(ds, idx, spec, size, ctx.device)  # noqa: E731
                results = collab.run(args, splits, spec, ctx.device, prepare, log)
                log.message(f"\noutputs in {os.path.abspath(args.out)} | {duration(log.elapsed())} elapsed")
                return results
            results = [run_strategy(args, splits, weights, s, ctx, log) for s in args.strategies]
        except NonFiniteError as e:
            log.message(f"error: {e}", console=False)
            raise SystemExit(f"colora-finetune: error: {e}") from None
        if ctx.main:
            save_json(results, os.path.join(args.out, "summary.json"))
            save_history_csv(results, os.path.join(args.out, "summary.csv"))
        log.message("\n" + format_table(results))
        log.message(f"\noutputs in {os.path.abspath(args.out)} | {duration(log.elapsed())} elapsed")
        if ctx.active:
            dist.barrier()  # no rank tears gloo/NCCL down while a peer still talks to it
        return results
    finally:
        log.close()
        if ctx.active:
            dist.destroy_process_group()
