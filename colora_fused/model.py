"""Whole-model CoLoRA: wrap, merge, unwrap, save and load adapters, count parameters, PEFT-style helpers."""
import contextlib
import logging
import math
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ._conv import adapter_shapes
from .config import UNSUPPORTED, CoLoRAConfig, Selector, with_options
from .conv_kinds import SUPPORTED
from .layers import CONV_TO_COLORA, DEFAULT, _CoLoRAConvNd, merge_layers_

logger = logging.getLogger(__name__)

ADAPTER_KEYS = ("pointwise", "depthwise", "bias_delta")


def _selected(selector: Selector, name: str, module: nn.Module) -> bool:
    """A regex (searched in the qualified name), a list of qualified names, or a callable (name, module) -> bool."""
    if isinstance(selector, str):
        return re.search(selector, name) is not None
    if callable(selector):
        return bool(selector(name, module))
    return name in selector


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def colora_layers(model: nn.Module) -> List[Tuple[str, _CoLoRAConvNd]]:
    """The (qualified name, layer) of every CoLoRA layer in `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _CoLoRAConvNd)]


def _require_layers(model: nn.Module, caller: str) -> List[Tuple[str, _CoLoRAConvNd]]:
    """`colora_layers(model)`, or ValueError when there is none: a call with nothing to act on is a mistake."""
    layers = colora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no CoLoRA layer (apply_colora or get_colora_model first)")
    return layers


def _shown(names: Sequence[str], limit: int = 8) -> str:
    """The first `limit` names, then "(N more)": an error about a model of hundreds of convs stays readable."""
    names = list(names)
    more = f" ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def adapter_is_smaller(conv: nn.Module, order: str = "pointwise_first", rank: int = 1) -> bool:
    """Whether a CoLoRA adapter of `rank` terms (Kp + Kd) holds fewer numbers than `conv`'s weight: true of k×k
    convs with C_in/groups ≥ 2 (mostly), never of a 1×1 conv (Kp alone is as large) nor of a depthwise one (Kd
    alone is). `CoLoRAConfig`'s default wraps these convs only."""
    kp, kd = adapter_shapes(conv.weight.shape, conv.groups, order, rank)
    return math.prod(kp) + math.prod(kd) < conv.weight.numel()


def _refusals(chosen: List[Tuple[str, nn.Module]]) -> Dict[str, Tuple[str, List[str]]]:
    """{class name: (why CoLoRA refuses it, the qualified names of its convs)} over `chosen`."""
    refused: Dict[str, Tuple[str, List[str]]] = {}
    for name, conv in chosen:
        reason = CONV_TO_COLORA[_torch_conv(conv)].refusal(conv)
        if reason is not None:
            refused.setdefault(type(conv).__name__, (reason, []))[1].append(name)
    return refused


def _torch_conv(conv: nn.Module) -> type:
    return next(base for base in CONV_TO_COLORA if isinstance(conv, base))


def _select_convs(model: nn.Module, include: Selector, exclude: Selector, unsupported: str = "error", *,
                  caller: str = "apply_colora", args: Tuple[str, str] = ("include", "exclude"),
                  efficient: Optional[Tuple[str, int]] = None) -> List[Tuple[str, nn.Module]]:
    """The (name, conv) pairs `include` / `exclude` pick among the model's convs (nn.Conv1d/2d/3d and their
    subclasses), each name once.

    `include` None or "all": every conv; with `efficient` = (order, rank), None means the convs whose adapter is
    smaller than their weight (`adapter_is_smaller`) instead. Picked convs a CoLoRA layer cannot stand in for
    (`conv_kinds`) raise TypeError naming them, or with `unsupported="skip"` are left out and logged. Raises
    ValueError when the pick is empty, when it holds CoLoRA layers (a model wrapped a second time) or when it is
    the model itself. Errors name the caller and its arguments (`caller`, `args`).
    """
    if unsupported not in UNSUPPORTED:
        raise ValueError(f"{caller}: unsupported={unsupported!r}; choose one of {UNSUPPORTED}")
    convs = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, tuple(CONV_TO_COLORA))]
    if efficient is not None and include is None:
        described = "None (the default: the convs whose adapter is smaller than their weight)"
        # A lazy conv has no shape yet: it is selected, to be refused with its reason rather than left out unseen.
        include = lambda n, m: (isinstance(m, _CoLoRAConvNd) or is_lazy(m.weight)  # noqa: E731
                                or adapter_is_smaller(m, *efficient))
    else:
        described = repr(include)
        include = None if include == "all" else include
    chosen = [(n, m) for n, m in convs if (include is None or _selected(include, n, m))
              and not (exclude is not None and _selected(exclude, n, m))]
    wrapped = [n for n, m in chosen if isinstance(m, _CoLoRAConvNd)]
    if wrapped:
        raise ValueError(f"{caller}: the selection holds {_count(len(wrapped), 'CoLoRA layer')} already: "
                         f"{_shown(wrapped)}; the model is wrapped already (unapply_colora or merge_and_unload "
                         "first, or select only plain convs)")
    if not chosen:
        there = f"the model's {_count(len(convs), 'conv')}: {_shown(n for n, _ in convs)}" if convs else "none"
        raise ValueError(f"{caller}: {args[0]}={described}, {args[1]}={exclude!r} select no conv of {there}"
                         + ("; target_modules='all' wraps every conv" if efficient is not None else ""))
    if any(n == "" for n, _ in chosen):
        raise ValueError(f"{caller} wraps the convs inside a model; wrap a lone conv with "
                         "CoLoRAConv{1,2,3}d.from_conv(conv)")
    refused = _refusals(chosen)
    if not refused:
        return chosen
    count = sum(len(names) for _, names in refused.values())
    listed = "; ".join(f"{cls} ×{len(names)} ({_shown(names, 4)}): {reason}"
                       for cls, (reason, names) in refused.items())
    if unsupported == "error":
        raise TypeError(f"{caller}: {count} of the {_count(len(chosen), 'selected conv')} compute what a CoLoRA "
                        f"layer cannot repeat: {listed}. CoLoRA supports {SUPPORTED}. Leave them out with "
                        f"{args[1]}, or pass unsupported='skip' to leave every such conv plain; nothing was changed")
    logger.warning("%s: unsupported='skip' leaves %s plain: %s", caller, _count(count, "selected conv"), listed)
    left_out = {n for _, names in refused.values() for n in names}
    chosen = [(n, m) for n, m in chosen if n not in left_out]
    if not chosen:
        raise ValueError(f"{caller}: every selected conv is unsupported ({listed}); nothing to wrap")
    return chosen


def _plan_names(model: nn.Module, config: CoLoRAConfig, caller: str) -> Optional[List[str]]:
    """The names a {name: rank} plan (`config.rank`) gives, or None for an int rank. ValueError naming those that
    are no conv of the model (a typo must not be dropped)."""
    if isinstance(config.rank, int):
        return None
    convs = {n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, tuple(CONV_TO_COLORA))}
    unknown = [n for n in config.rank if n not in convs]
    if unknown:
        raise ValueError(f"{caller}: the rank plan names what is no conv of the model: {_shown(unknown)}")
    return list(config.rank)


def _wrap(model: nn.Module, chosen: List[Tuple[str, nn.Module]], config: CoLoRAConfig, caller: str) -> None:
    """Replace each chosen conv by its CoLoRA layer built from `config` (at its rank in a {name: rank} plan); a
    conv shared by several names once. Checks every rank before anything changes."""
    plan = config.rank if isinstance(config.rank, dict) else None
    missing = [n for n, _ in chosen if plan is not None and n not in plan]
    if missing:
        raise ValueError(f"{caller}: the rank plan gives no rank for {_count(len(missing), 'selected conv')}: "
                         f"{_shown(missing)}")
    ranks = {n: config.rank if plan is None else plan[n] for n, _ in chosen}
    first: Dict[int, str] = {}
    for name, conv in chosen:
        if ranks[first.setdefault(id(conv), name)] != ranks[name]:
            raise ValueError(f"{caller}: {name} shares its conv with another name of another rank")
    wrapped = {id(conv): CONV_TO_COLORA[_torch_conv(conv)].from_conv(conv, config, rank=ranks[name])
               for name, conv in chosen if first[id(conv)] == name}
    for name, conv in chosen:
        _set_submodule(model, name, wrapped[id(conv)])


def apply_colora(model: nn.Module, include: Selector = None, exclude: Selector = None,
                 config: Optional[CoLoRAConfig] = None, **options) -> List[str]:
    """Replace the selected convs of `model` (nn.Conv1d/2d/3d and the subclasses `conv_kinds` supports), in
    place, by CoLoRA layers sharing their weights.

    `include` None (or "all") selects every conv; `exclude` leaves out what it selects (both: a regex searched in
    the qualified name, a list of qualified names, or a callable (name, module) -> bool). The layers are built
    from `config` (a `CoLoRAConfig`; its `target_modules`, `exclude_modules` and `modules_to_save` are not read
    here) with keyword `options` overriding its fields: the layer options (`order`, `train_bias`, `backend`,
    `rank`, ...) and `unsupported`. `rank`: the terms of every wrapped conv, or a {qualified name: rank} plan (then
    `include=None` selects the plan's convs; a selected conv the plan does not name, a plan name that is no conv,
    or a conv selected under two names of different ranks raises ValueError). `unsupported`: "error" (a
    selected conv whose class computes something CoLoRA cannot repeat raises TypeError naming it) or "skip" (such
    convs stay plain, and a warning lists them).

    The wrapped convs' base weights and biases (and their other parameters, timm's gain) are frozen; nothing else
    is touched: BatchNorm, the classifier and the convs left out stay as trainable as they were.
    `get_colora_model` instead freezes everything but the adapters and `modules_to_save`, as PEFT does. Returns the
    qualified names replaced. Raises (and changes nothing) when the selection matches no conv, holds an
    unsupported conv (unless skipped) or includes CoLoRA layers already there.
    """
    unsupported = options.pop("unsupported", "error" if config is None else config.unsupported)
    config = with_options(config, options, "apply_colora")
    planned = _plan_names(model, config, "apply_colora")
    chosen = _select_convs(model, planned if include is None and planned is not None else include, exclude,
                           unsupported)
    _wrap(model, chosen, config, "apply_colora")
    return [n for n, _ in chosen]


def _modules_to_save(model: nn.Module, names: Optional[List[str]]) -> List[Tuple[str, nn.Module]]:
    """The modules `names` selects (qualified name equal to a name or ending in "." + name, as in PEFT).

    Raises ValueError naming each name that matches no module.
    """
    if not names:
        return []
    modules = list(model.named_modules())
    matches = lambda n, target: n == target or n.endswith("." + target)  # noqa: E731
    unmatched = [t for t in names if not any(matches(n, t) for n, _ in modules)]
    if unmatched:
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"get_colora_model: modules_to_save names no module: {_shown(unmatched)}; the model's "
                         f"top-level modules ({len(children)}): {_shown(children)}")
    return [(n, m) for n, m in modules if n and any(matches(n, t) for t in names)]


def get_colora_model(model: nn.Module, config: Optional[CoLoRAConfig] = None) -> nn.Module:
    """Wrap `model` in place as `config` says and freeze, as PEFT does, every parameter but the adapters and
    those of `config.modules_to_save`; returns `model`.

    With the default `target_modules=None` the convs wrapped are those whose adapter is smaller than their weight
    (`adapter_is_smaller`: k×k, not depthwise), or the plan's convs when `rank` is a {name: rank} plan; "all"
    wraps every conv. Each layer is built from `config` (`from_conv`). Unlike `apply_colora`, BatchNorm's
    affine parameters, the classifier and the convs left plain end up with `requires_grad=False` unless named in
    `modules_to_save` (BatchNorm's running statistics still follow the data in training mode). Raises and changes
    nothing when the selection matches no conv, when it holds a conv CoLoRA cannot stand in for (TypeError;
    `unsupported="skip"` leaves those plain instead), when a `modules_to_save` name matches no module, or when a
    module to save holds a conv that would be wrapped (a module is either adapted or trained whole), or when a
    rank plan misses a selected conv or names no conv.
    """
    config = CoLoRAConfig() if config is None else config
    planned = _plan_names(model, config, "get_colora_model")
    target = planned if config.target_modules is None and planned is not None else config.target_modules
    chosen = _select_convs(model, target, config.exclude_modules, config.unsupported,
                           caller="get_colora_model", args=("target_modules", "exclude_modules"),
                           efficient=(config.order, config.rank))
    saved = _modules_to_save(model, config.modules_to_save)
    chosen_ids = {id(m) for _, m in chosen}
    overlap = sorted({n for n, m in saved for sub in m.modules() if id(sub) in chosen_ids})
    if overlap:
        raise ValueError(f"get_colora_model: modules_to_save picks {_count(len(overlap), 'module')} holding convs "
                         f"that target_modules selects: {_shown(overlap)}; exclude them from target_modules or drop "
                         "them from modules_to_save")
    _wrap(model, chosen, config, "get_colora_model")
    keep: Set[int] = {id(p) for _, layer in colora_layers(model) for p in layer.adapter_parameters()}
    keep |= {id(p) for _, m in saved for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


def _broadcast_from_rank0(tensors: Iterable[Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


def _check_mergeable(layers: List[Tuple[str, _CoLoRAConvNd]], caller: str,
                     adapters: Sequence[str] = (DEFAULT,)) -> None:
    for name, layer in layers:
        try:
            layer.check_mergeable(adapters)
        except ValueError as err:
            raise ValueError(f"{caller}: layer {name!r}: {err}") from None


def _check_optimizer_holds_adapters(layers: List[Tuple[str, _CoLoRAConvNd]], optimizer: torch.optim.Optimizer,
                                    adapters: Sequence[str] = (DEFAULT,)) -> None:
    """ValueError naming the trainable adapter tensors (of `adapters`) `optimizer` does not update (its state
    could not be the one to clear: a wrong optimizer passed, or one built before apply_colora)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [key for adapter in adapters for key, t in _adapter_tensors(layers, adapter).items()
               if t.requires_grad and id(t) not in held]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"merge_colora: the optimizer does not hold the trainable adapter tensors {shown} "
                         "(build it after apply_colora, from the model's trainable parameters); nothing was merged")


@torch.no_grad()
def merge_colora(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 names: Optional[Iterable[str]] = None, adapters: Sequence[str] = (DEFAULT,)) -> List[str]:
    """Fold every CoLoRA layer's ΔK, Δb into its base weights and reset its adapters (eq. 10–13); on CUDA in one
    Triton launch per dtype combination for the whole model (`modules.merge_layers_`).

    All layers are checked first: if any holds a non-finite delta, or `optimizer` does not hold every
    trainable adapter tensor, ValueError is raised and nothing changes. With `optimizer`, the state of the
    reset tensors (Adam's moments, step) is cleared. Under torch.distributed the fresh Kp of rank 0 is
    broadcast so that replicas stay identical. Raises ValueError on a model without CoLoRA layers.
    `names` (qualified layer names) merges only those layers, as an adaptive schedule does; `adapters` names
    the adapters folded (and reset), "default" unless told. Returns the layer names merged.
    """
    layers = _require_layers(model, "merge_colora")
    if names is not None:
        wanted = set(names)
        unknown = sorted(wanted - {n for n, _ in layers})
        if unknown:
            raise ValueError(f"merge_colora: names {', '.join(unknown)} are not CoLoRA layers of the model")
        layers = [(n, layer) for n, layer in layers if n in wanted]
    adapters = tuple([adapters] if isinstance(adapters, str) else adapters)
    if not adapters or len(set(adapters)) != len(adapters):
        raise ValueError(f"merge_colora: adapters={list(adapters)} must name each adapter to fold once")
    for name, layer in layers:
        for adapter in adapters:
            layer.adapter(adapter)  # KeyError naming the layer's adapters
    _check_mergeable(layers, "merge_colora", adapters)
    if optimizer is not None:
        _check_optimizer_holds_adapters(layers, optimizer, adapters)
    merge_layers_([layer for _, layer in layers], adapters)
    if optimizer is not None:
        for _, layer in layers:
            for p in layer.adapter_parameters(adapters):
                optimizer.state.pop(p, None)
    _broadcast_from_rank0(layer.adapter(a).pointwise for _, layer in layers for a in adapters)
    return [n for n, _ in layers]


def unapply_colora(model: nn.Module) -> List[str]:
    """Replace every CoLoRA layer, in place, by a plain conv holding its merged weights. Returns their names.

    Raises ValueError on a model without CoLoRA layers.
    """
    layers = _require_layers(model, "unapply_colora")
    plain = {id(layer): layer.to_conv() for _, layer in layers}
    for name, layer in layers:
        _set_submodule(model, name, plain[id(layer)])
    return [n for n, _ in layers]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's `merge_and_unload`: every CoLoRA layer becomes a plain conv holding K0 + ΔK and b0 + Δb; returns
    the model (a lone CoLoRA layer gives its plain conv).

    The adapters are checked first: a non-finite ΔK or Δb raises ValueError and nothing changes. So does a
    model without CoLoRA layers.
    """
    if isinstance(model, _CoLoRAConvNd):
        _check_mergeable([("", model)], "merge_and_unload")
        return model.to_conv()
    _check_mergeable(_require_layers(model, "merge_and_unload"), "merge_and_unload")
    unapply_colora(model)
    return model


@contextlib.contextmanager
def disable_colora(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_colora(model): ...` runs every CoLoRA layer as its plain base conv (K0, b0), by setting
    each layer's `disable_adapters`; the previous values come back on exit, also after an exception.

    Unlike PEFT's `disable_adapter`, the modules of `modules_to_save` keep their trained weights (they are not
    copies here), and so do base weights into which earlier merges have folded adapters. Raises ValueError on a
    model without CoLoRA layers.
    """
    layers = [layer for _, layer in _require_layers(model, "disable_colora")]
    previous = [getattr(layer, "disable_adapters", False) for layer in layers]
    try:
        for layer in layers:
            layer.disable_adapters = True
        yield model
    finally:
        for layer, value in zip(layers, previous):
            layer.disable_adapters = value


def _adapter_prefix(adapter: str) -> str:
    """Where a layer's state dict keeps an adapter's tensors: at the top for "default", else under
    colora_adapters.<name>."""
    return "" if adapter == DEFAULT else f"colora_adapters.{adapter}."


def _adapter_tensors(layers: List[Tuple[str, _CoLoRAConvNd]], adapter: str) -> Dict[str, Tensor]:
    """The tensors of adapter `adapter` of these (qualified name, CoLoRA layer) pairs, keyed as in the model's
    state_dict() (every layer must have it: KeyError otherwise)."""
    prefix = _adapter_prefix(adapter)
    return {f"{name}.{prefix}{key}" if name else f"{prefix}{key}": getattr(layer.adapter(adapter), key)
            for name, layer in layers for key in ADAPTER_KEYS if getattr(layer.adapter(adapter), key) is not None}


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """{"total", "trainable", "adapter"} parameter counts, each shared parameter counted once."""
    params = list(model.parameters())
    adapter_ids = {id(p) for _, layer in colora_layers(model) for p in layer.adapter_parameters()}
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "adapter": sum(p.numel() for p in params if id(p) in adapter_ids),
    }


def print_trainable_parameters(model: nn.Module) -> None:
    """Print PEFT's line: `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`."""
    counts = count_parameters(model)
    trainable, total = counts["trainable"], counts["total"]
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
          f"{100 * trainable / total if total else 0.0:.4f}")
