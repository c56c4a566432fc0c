"""Adapters per sample: one batch whose samples use different adapters (serving many users' adapters at once,
training tasks mixed in each batch).

    with cf.adapters_per_sample(model, ["alice", ("shared", "bob"), None, "alice"]):
        out = model(x)          # x holds 4 samples

Inside, every CoLoRA layer computes sample i with the adapters `names[i]`: one adapter name, a tuple of names
(their sum, as `set_active_adapters` would sum them) or None (the base convs alone). The base conv runs once on
the whole batch; how the residuals run is `mixed`'s choice (design §10). Training works as usual: each adapter's
gradient is the sum over the samples that used it. On exit, also after an exception, every layer is as it was.
"""
import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .mixed import MixedBatch
from .model import _require_layers

Entry = Union[None, str, Sequence[str]]

__all__ = ["adapters_per_sample", "assignment"]


def assignment(names: Sequence[Entry]) -> Tuple[Tuple[Tuple[str, ...], ...], torch.Tensor]:
    """(sets, index) for per-sample `names`: the distinct adapter sets, sorted (a tuple of names each, () for
    None; sorted so that batches using the same sets share a compiled graph) and the set of each sample as a long
    tensor. ValueError for an empty list, an entry that is not a name, a tuple of names or None, and a name given
    twice in one entry."""
    if isinstance(names, (str, torch.Tensor)) or not isinstance(names, Sequence) or not len(names):
        raise ValueError("adapters_per_sample: names must be a non-empty list with one entry per sample (an "
                         f"adapter name, a tuple of names or None), got {names!r}")
    keys = [_entry(entry, i) for i, entry in enumerate(names)]
    sets = tuple(sorted(set(keys)))
    return sets, torch.tensor([sets.index(k) for k in keys], dtype=torch.long)


def _entry(entry: Entry, i: int) -> Tuple[str, ...]:
    if entry is None:
        return ()
    key = (entry,) if isinstance(entry, str) else tuple(entry) if isinstance(entry, (tuple, list)) else None
    if key is None or not all(isinstance(n, str) for n in key):
        raise ValueError(f"adapters_per_sample: sample {i} has {entry!r}; give an adapter name, a tuple of names or "
                         "None")
    if len(set(key)) != len(key):
        raise ValueError(f"adapters_per_sample: sample {i} names an adapter twice: {list(key)}")
    return key


@contextlib.contextmanager
def adapters_per_sample(model: nn.Module, names: Sequence[Entry]) -> Iterator[MixedBatch]:
    """Run every CoLoRA layer of `model` with the adapters `names[i]` for sample i (module docstring); yields
    the assignment. Every name is checked in every layer first: an unknown one raises ValueError listing the
    adapters the layer has, and nothing changes. A layer that then sees a batch of another size raises
    ValueError naming it and both sizes. Nested calls restore the outer assignment on exit."""
    layers = _require_layers(model, "adapters_per_sample")
    sets, index = assignment(names)
    wanted = sorted({n for names_ in sets for n in names_})
    for layer_name, layer in layers:
        missing = [n for n in wanted if n not in layer.adapter_names()]
        if missing:
            raise ValueError(f"adapters_per_sample: layer {layer_name!r} has no adapter {', '.join(map(repr, missing))}"
                             f"; it has {layer.adapter_names()}")
    counts = tuple(int(c) for c in torch.bincount(index, minlength=len(sets)))
    index = index.to(layers[0][1].weight.device)
    # getattr: a layer unpickled from before mixed batches has no _mixed_batch yet.
    previous: List[Tuple[nn.Module, Optional[MixedBatch]]] = [(layer, getattr(layer, "_mixed_batch", None))
                                                              for _, layer in layers]
    try:
        for layer_name, layer in layers:
            layer._mixed_batch = MixedBatch(sets, index, counts, layer_name)
        yield MixedBatch(sets, index, counts, "")
    finally:
        for layer, before in previous:
            layer._mixed_batch = before
