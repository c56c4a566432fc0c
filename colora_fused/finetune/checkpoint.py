"""``colora-finetune``'s files: the checkpoint a run resumes from (what it holds, how it is read and checked
against this run before anything trains) and the JSON and CSV outputs, all written by ``atomic_write``."""
import csv
import io
import json
from collections import OrderedDict

import torch

import colora_fused as cf
from .data import training_set
from .models import UsageError, key_mismatch, reason
from ..serialization import atomic_write

# /3: the merge schedule's state (`MergeSchedule.state_dict()`, or None without merges) under "schedule".
CHECKPOINT_FORMAT = "colora-finetune/3"
CHECKPOINT_KEYS = ("config", "epoch", "step", "merges", "schedule", "model", "optimizer", "best", "history", "rng",
                   "train_time_s", "skipped_steps")
_KEPT = "nothing was changed; delete it or choose another --out to start afresh"


def run_config(args, strategy, splits, world):
    """The settings a checkpoint must have been made with to be resumed: those shaping the model, the data order
    and the updates. ``--epochs`` is not among them: a resumed run may train longer."""
    return {"model": args.model, "strategy": strategy, "num_classes": splits.num_classes,
            "in_channels": splits.in_channels, "order": args.order, "merge_every": args.merge_every,
            "merge_unit": args.merge_unit, "merge_when": args.merge_when, "merge_scope": args.merge_scope,
            "rank": args.rank, "rank_budget": args.rank_budget, "balance": args.balance,
            "train_size": len(training_set(splits.train, args.balance)), "batch_size": args.batch_size,
            "processes": world, "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
            "head_hidden": args.head_hidden, "image_size": args.image_size}


def trained_state(model, strategy, merged):
    """What training changed: trainable tensors, buffers, and (after a merge) the CoLoRA base weights."""
    if strategy == "full":
        return OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    keys = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    if merged:
        for name, layer in cf.colora_layers(model):
            keys |= {f"{name}.weight"} | ({f"{name}.bias"} if layer.bias is not None else set())
    return OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items() if k in keys)


def read_checkpoint(path):
    """The checkpoint at ``path`` (``torch.load(weights_only=True)``); UsageError naming the file and why not."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or holding objects that weights_only refuses
        raise UsageError(f"cannot resume from {path}: unreadable ({reason(e)}); {_KEPT}") from None
    if not isinstance(ck, dict) or "format" not in ck:
        raise UsageError(f"cannot resume from {path}: not a colora-finetune checkpoint; {_KEPT}")
    if ck["format"] != CHECKPOINT_FORMAT:
        raise UsageError(f"cannot resume from {path}: written in format {ck['format']!r}, this version reads "
                         f"{CHECKPOINT_FORMAT!r}; {_KEPT}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ck]
    if missing:
        raise UsageError(f"cannot resume from {path}: it lacks {', '.join(missing)}; {_KEPT}")
    kinds = (("config", dict), ("model", dict), ("optimizer", dict), ("history", list),
             ("schedule", (dict, type(None))))
    malformed = [k for k, kind in kinds if not isinstance(ck[k], kind)]
    malformed += ["model"] * (not malformed and not all(isinstance(v, torch.Tensor) for v in ck["model"].values()))
    if malformed:
        raise UsageError(f"cannot resume from {path}: malformed {', '.join(malformed)}; {_KEPT}")
    return ck


def check_checkpoint(ck, path, config, model, strategy):
    """UsageError naming ``path`` and the mismatch unless ``ck`` was made with ``config`` and fits ``model``."""
    if ck["config"] != config:
        keys = sorted(set(ck["config"]) | set(config))
        diff = ", ".join(f"{k}: {ck['config'].get(k)!r} vs {config.get(k)!r}"
                         for k in keys if ck["config"].get(k) != config.get(k))
        raise UsageError(f"cannot resume from {path}: it was made with other settings (saved vs now: {diff}); {_KEPT}")
    expected = {k: v.shape for k, v in trained_state(model, strategy, ck["merges"] > 0).items()}
    mismatch = key_mismatch(expected, ck["model"])
    if mismatch:
        raise UsageError(f"cannot resume from {path}: its weights do not fit this model ({mismatch}); {_KEPT}")
    # the optimizer state: one group over the trained parameters, each state tensor shaped like its parameter
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    groups = [g.get("params") for g in ck["optimizer"].get("param_groups", [])]
    state = ck["optimizer"].get("state", {})
    fits = groups == [list(range(len(shapes)))] and all(
        isinstance(i, int) and 0 <= i < len(shapes) and isinstance(st, dict)
        and all(t.dim() == 0 or t.shape == shapes[i] for t in st.values() if isinstance(t, torch.Tensor))
        for i, st in state.items())
    if not fits:
        raise UsageError(f"cannot resume from {path}: its optimizer state does not fit this model's {len(shapes)} "
                         f"trained tensors; {_KEPT}")


def save_torch(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_json(obj, path):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def save_history_csv(history, path):
    if not history:
        return
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))
