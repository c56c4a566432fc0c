"""The periodic merge (paper eq. 12–14) for any training loop: `MergeSchedule`, and callbacks for HF `Trainer`
and PyTorch Lightning built on it.

The two callbacks subclass their framework's base class, so they are built on first access
(`colora_fused.CoLoRATrainerCallback`, `colora_fused.CoLoRALightningCallback`); the package imports without
transformers or lightning installed.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .model import _require_layers, merge_colora

UNITS = ("epoch", "step")
SCOPES = ("layer", "model")


@torch.no_grad()
def relative_updates(model: nn.Module) -> Dict[str, float]:
    """‖ΔK‖ / ‖K0‖ (Frobenius) of every CoLoRA layer, by qualified name: how far its adapter has moved it."""
    return {name: float(layer.delta_weight().norm() / layer.weight.norm().clamp_min(1e-30))
            for name, layer in _require_layers(model, "relative_updates")}


@torch.no_grad()
def layers_due(model: nn.Module, threshold: float, scope: str = "layer") -> List[str]:
    """The CoLoRA layers to merge at a relative update of `threshold`: those with ‖ΔK‖/‖K0‖ ≥ threshold
    (`scope="layer"`), or all of them once ‖ΔK‖/‖K0‖ over the whole model (every layer's ΔK and K0 as one
    vector) is (`scope="model"`), else none."""
    if scope not in SCOPES:
        raise ValueError(f"layers_due: scope must be one of {SCOPES}, got {scope!r}")
    if scope == "layer":
        return [n for n, r in relative_updates(model).items() if r >= threshold]
    layers = _require_layers(model, "layers_due")
    delta = sum(float(layer.delta_weight().double().square().sum()) for _, layer in layers)
    base = sum(float(layer.weight.double().square().sum()) for _, layer in layers)
    return [n for n, _ in layers] if delta >= threshold ** 2 * base else []


def merge_seed(seed: int, index: int) -> int:
    """The seed of merge number `index` (0, 1, ...) of a schedule seeded with `seed`: distinct for every pair of
    a seed and a merge count below 7919, a prime."""
    return seed * 7919 + index + 1


class MergeSchedule:
    """Merge every `every` optimizer steps or epochs: call `.step()` after each `optimizer.step()` and
    `.epoch_end()` after each epoch; the one matching `unit` counts, and on its `every`-th call runs
    `merge_colora(model, optimizer)`, which folds ΔK into K0, resets the adapters and clears the optimizer
    state of the reset tensors.

    With `threshold`, the `every`-th call merges only when the adapters have moved far enough: the layers whose
    relative update ‖ΔK‖/‖K0‖ has reached `threshold` (`scope="layer"`), or every layer once the model's
    ‖ΔK‖/‖K0‖ over all layers together has (`scope="model"`). Checking costs a ΔK per layer: `every` thins it.

    With `seed`, each merge draws its fresh Kp from torch's generators seeded by `seed` and the merge's number
    (`merge_seed`), inside `torch.random.fork_rng`: the draws are the same in a run resumed from `state_dict()`,
    and the training's own random stream (dropout, data order) is left as it was. Without it, Kp comes from the
    global generators, as any other draw.

    `optimizer` may be set later (`schedule.optimizer = ...`), as frameworks build theirs after the callbacks.
    `merges` lists (epoch, step) — the counts of finished epochs and steps — at each merge, and `merged` the
    layer names each merge folded. `state_dict()` / `load_state_dict()` carry the counts and both lists across
    a resumed run (the settings — `every`, `unit`, `threshold`, `scope`, `seed` — are the caller's to repeat).
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, every: int = 1,
                 unit: str = "epoch", threshold: Optional[float] = None, scope: str = "layer",
                 seed: Optional[int] = None):
        if unit not in UNITS:
            raise ValueError(f"MergeSchedule: unit must be one of {UNITS}, got {unit!r}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"MergeSchedule: every must be a positive integer, got {every!r}")
        if threshold is not None and not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"MergeSchedule: threshold must be a positive number (‖ΔK‖/‖K0‖), got {threshold!r}")
        if scope not in SCOPES:
            raise ValueError(f"MergeSchedule: scope must be one of {SCOPES}, got {scope!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"MergeSchedule: seed must be an integer or None, got {seed!r}")
        _require_layers(model, "MergeSchedule")
        self.model, self.optimizer, self.every, self.unit = model, optimizer, every, unit
        self.threshold, self.scope, self.seed = threshold, scope, seed
        self.steps = 0
        self.epochs = 0
        self.merges: List[Tuple[int, int]] = []
        self.merged: List[List[str]] = []

    def step(self) -> bool:
        """Count one optimizer step; merge when the unit is "step" and it is the `every`-th. True if merged."""
        self.steps += 1
        return self._maybe_merge("step", self.steps)

    def epoch_end(self) -> bool:
        """Count one finished epoch; merge when the unit is "epoch" and it is the `every`-th. True if merged."""
        self.epochs += 1
        return self._maybe_merge("epoch", self.epochs)

    def due(self) -> Optional[List[str]]:
        """The layers a threshold schedule would merge now (`layers_due`); None without a threshold."""
        return None if self.threshold is None else layers_due(self.model, self.threshold, self.scope)

    def _maybe_merge(self, unit: str, count: int) -> bool:
        if unit != self.unit or count % self.every:
            return False
        names = self.due()
        if names == []:
            return False
        if self.seed is None:
            merged = merge_colora(self.model, self.optimizer, names)
        else:
            cuda = sorted({p.device.index for p in self.model.parameters() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(merge_seed(self.seed, len(self.merges)))
                merged = merge_colora(self.model, self.optimizer, names)
        self.merged.append(merged)
        self.merges.append((self.epochs, self.steps))
        return True

    def state_dict(self) -> Dict[str, object]:
        return {"steps": self.steps, "epochs": self.epochs, "merges": [list(m) for m in self.merges],
                "merged": [list(n) for n in self.merged]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.steps, self.epochs = int(state["steps"]), int(state["epochs"])
        self.merges = [(int(e), int(s)) for e, s in state["merges"]]
        self.merged = [list(n) for n in state.get("merged", [])]


def _trainer_callback_class():
    from transformers import TrainerCallback

    class CoLoRATrainerCallback(TrainerCallback):
        """HF `Trainer` callback: the CoLoRA merge every `every` epochs or optimizer steps (`unit`).

        `Trainer(..., callbacks=[cf.CoLoRATrainerCallback(every=1, unit="epoch")])`. The schedule is built at
        the start of training from the Trainer's model and optimizer; `.schedule` holds it afterwards.
        """

        def __init__(self, every: int = 1, unit: str = "epoch"):
            if unit not in UNITS:
                raise ValueError(f"CoLoRATrainerCallback: unit must be one of {UNITS}, got {unit!r}")
            self.every, self.unit = every, unit
            self.schedule: Optional[MergeSchedule] = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.schedule = MergeSchedule(model, optimizer, self.every, self.unit)
            # A resumed run starts from the checkpoint's counts, so that merges stay on their steps.
            self.schedule.steps, self.schedule.epochs = state.global_step, int(state.epoch or 0)

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            # Called once per optimizer step (after gradient accumulation), after the update.
            self.schedule.optimizer = optimizer
            self.schedule.step()

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            self.schedule.optimizer = optimizer
            self.schedule.epoch_end()

    return CoLoRATrainerCallback


def _lightning_callback_class():
    from lightning.pytorch import Callback

    class CoLoRALightningCallback(Callback):
        """PyTorch Lightning callback: the CoLoRA merge every `every` epochs or optimizer steps (`unit`).

        `Trainer(callbacks=[cf.CoLoRALightningCallback(every=1, unit="epoch")])`; the LightningModule must
        configure exactly one optimizer, which must hold the adapters. `.schedule` holds the schedule.
        """

        def __init__(self, every: int = 1, unit: str = "epoch"):
            if unit not in UNITS:
                raise ValueError(f"CoLoRALightningCallback: unit must be one of {UNITS}, got {unit!r}")
            self.every, self.unit = every, unit
            self.schedule: Optional[MergeSchedule] = None

        def on_train_start(self, trainer, pl_module):
            if len(trainer.optimizers) != 1:
                raise ValueError(f"CoLoRALightningCallback needs exactly one optimizer, the LightningModule "
                                 f"configures {len(trainer.optimizers)}")
            self.schedule = MergeSchedule(pl_module, trainer.optimizers[0], self.every, self.unit)
            # A resumed run starts from the checkpoint's counts, so that merges stay on their steps.
            self.schedule.steps, self.schedule.epochs = trainer.global_step, trainer.current_epoch

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # global_step counts optimizer steps: with gradient accumulation, not every batch ends in one.
            while self.schedule.steps < trainer.global_step:
                self.schedule.step()

        def on_train_epoch_end(self, trainer, pl_module):
            self.schedule.epoch_end()

    return CoLoRALightningCallback


# name → (builder, the package it needs)
_LAZY = {"CoLoRATrainerCallback": (_trainer_callback_class, "transformers"),
         "CoLoRALightningCallback": (_lightning_callback_class, "lightning")}
_BUILT: Dict[str, type] = {}


def __getattr__(name: str):
    """Build a framework callback class on first access (PEP 562), importing its framework only then."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        build, package = _LAZY[name]
        try:
            cls = build()
        except ImportError as err:
            raise ImportError(f"colora_fused.{name} needs {package} (pip install {package}): {err}") from err
        cls.__qualname__ = name  # so that pickle and Lightning's callback state keys find it by this name
        _BUILT[name] = cls
    return _BUILT[name]
