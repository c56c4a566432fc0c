"""Several named adapters per CoLoRA layer (PEFT's add_adapter / set_adapter for convs): a shared adapter plus
per-task ones, switched per batch without a weight copy per combination.

Every CoLoRA layer holds its own adapter, "default" (what `apply_colora` made; its tensors keep their names and
state-dict keys), and any number of named ones added here (`layer.colora_adapters.<name>`). The active adapters
are summed: ΔK = Σ over them of Σ over their terms Kp ⊛ Kd, Δb = Σ of their Δb. On every backend that sum is
one rank-stacked adapter (their terms concatenated along the rank dim), so the fused kernels build
`K0 + ΔK_shared + ΔK_task` in registers and the merged-weight path merges it once per call; switching costs no
recompilation as long as the total rank is unchanged, and nothing merged for another combination is ever served
(the cache compares the very tensors it merged). `merge_colora(model, optimizer, adapters=[...])` folds only the
adapters named; `colora_state_dict(model, adapter=name)` / `load_colora_state_dict(model, sd, adapter=name)` save
and load one adapter.
"""
from typing import List, Optional, Sequence

from torch import nn

from .model import _require_layers
from .layers import DEFAULT

__all__ = ["DEFAULT", "active_adapters", "add_adapter", "delete_adapter", "set_active_adapters",
           "set_trainable_adapters"]


def add_adapter(model: nn.Module, name: str, rank: int = 1, train_bias: Optional[bool] = None) -> List[str]:
    """Add a fresh adapter `name` (ΔK = 0) of `rank` terms to every CoLoRA layer of `model`, trainable and not
    active; returns the layer names. Raises ValueError, changing nothing, when the name is taken in any layer or
    is not a Python identifier."""
    layers = _require_layers(model, "add_adapter")
    for layer_name, layer in layers:
        if name in layer.adapter_names():
            raise ValueError(f"add_adapter: layer {layer_name!r} already has an adapter {name!r}")
    for _, layer in layers:
        layer.add_adapter(name, rank, train_bias)
    return [n for n, _ in layers]


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` (not "default") from every CoLoRA layer; all or nothing."""
    layers = _require_layers(model, "delete_adapter")
    for _, layer in layers:
        layer.adapter(name)
    for _, layer in layers:
        layer.delete_adapter(name)


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """The adapters every CoLoRA layer's forward sums from now on (an empty list: the base convs alone). Every
    name is checked in every layer before any layer changes."""
    names = tuple([names] if isinstance(names, str) else names)
    if len(set(names)) != len(names):
        raise ValueError(f"set_active_adapters: {list(names)} names an adapter twice")
    layers = _require_layers(model, "set_active_adapters")
    for _, layer in layers:
        for name in names:
            layer.adapter(name)
    for _, layer in layers:
        layer.active_adapters = names


def active_adapters(model: nn.Module) -> List[str]:
    """The active adapters of the model's CoLoRA layers (ValueError if the layers disagree)."""
    found = {layer.active_adapters for _, layer in _require_layers(model, "active_adapters")}
    if len(found) != 1:
        raise ValueError(f"active_adapters: the layers disagree: {sorted(map(list, found))}")
    return list(found.pop())


def set_trainable_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """requires_grad on the tensors of the adapters `names`, off on every other adapter's (the base weights are
    left as they are); every name is checked in every layer first."""
    names = set([names] if isinstance(names, str) else names)
    layers = _require_layers(model, "set_trainable_adapters")
    for _, layer in layers:
        for name in names:
            layer.adapter(name)
    for _, layer in layers:
        for adapter in layer.adapter_names():
            for p in layer.adapter_parameters([adapter]):
                p.requires_grad_(adapter in names)
