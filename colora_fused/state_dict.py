"""The trained state of a CoLoRA model: `colora_state_dict`, `load_colora_state_dict` and `save_colora`.

What training changes in a wrapped model, and so what the state dict holds, keyed as in `model.state_dict()`:

- the adapter tensors (Kp, Kd, Δb) of every CoLoRA layer: of "default", or of the named `adapter`;
- with `include_trainable`, every other parameter that requires grad: the `modules_to_save` of `get_colora_model`
  (the classifier), or whatever `apply_colora` left trainable (BatchNorm's affine parameters, the classifier);
- with `include_norm_stats`, the buffers of every layer that keeps running statistics (BatchNorm, InstanceNorm
  with `track_running_stats`: any module with a `running_mean` or `running_var` buffer). Training updates them in
  train mode even when the layer's parameters are frozen, and eval-mode outputs depend on them.

"Trainable" is `requires_grad` when the call is made. `get_colora_model` freezes all but the adapters and the
modules to save, so the flags are the record of `modules_to_save`: nothing has to be stored on the model, and a
model unfrozen by hand is saved as it was trained. Save the model as trained and load into one built the same way
(the architecture, then `get_colora_model` with the same config); the load compares the key sets.

Not held: the base weights of the CoLoRA layers. A merge (`merge_colora`) moves the update into them, so after
one the trained model is `model.state_dict()` or the merged file of `save_merged`.
"""
import dataclasses
import os
from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .adapters import add_adapter, delete_adapter
from .config import CoLoRAConfig
from .model import ADAPTER_KEYS, _adapter_prefix, _adapter_tensors, _require_layers, colora_layers
from .layers import DEFAULT
from .serialization import _config_dict, _read_safetensors, _write_safetensors

__all__ = ["colora_state_dict", "load_adapter", "load_colora_state_dict", "save_colora"]

SHOWN = 5  # names listed per kind of problem in an error; the rest are counted

# (kind, as counted on the first line of an error, as labelled on its own line)
PROBLEM_KINDS = (
    ("nested", "nested dicts (pass the state dict itself, not a checkpoint holding it)"),
    ("not-a-tensor", "not tensors"),
    ("missing", "missing"),
    ("unexpected", "unexpected"),
    ("mis-shaped", "mis-shaped"),
    ("wrong-dtype", "wrong dtype"),
    ("meta", "meta tensors without data"),
    ("non-finite", "non-finite values"),
)


def _keeps_running_stats(module: nn.Module) -> bool:
    return any(isinstance(module._buffers.get(name), Tensor) for name in ("running_mean", "running_var"))


def _trained_tensors(model: nn.Module, adapter: str, include_trainable: bool, include_norm_stats: bool,
                     caller: str) -> Dict[str, Tensor]:
    """The tensors of the module docstring, keyed as in model.state_dict(): the adapter's first (layer order),
    then the rest in state-dict order. ValueError when the model has no CoLoRA layer, KeyError when a layer
    lacks `adapter`."""
    layers = _require_layers(model, caller)
    out = _adapter_tensors(layers, adapter)
    adapter_ids = {id(p) for _, layer in layers for p in layer.adapter_parameters()}
    norms = {name for name, m in model.named_modules(remove_duplicate=False) if _keeps_running_stats(m)}
    for key, t in model.state_dict(keep_vars=True).items():
        if key in out or not isinstance(t, Tensor) or id(t) in adapter_ids:
            continue
        trainable = include_trainable and isinstance(t, nn.Parameter) and t.requires_grad
        norm_stat = include_norm_stats and not isinstance(t, nn.Parameter) and key.rpartition(".")[0] in norms
        if trainable or norm_stat:
            out[key] = t
    return out


def colora_state_dict(model: nn.Module, adapter: str = DEFAULT, *, include_trainable: bool = True,
                      include_norm_stats: bool = True) -> Dict[str, Tensor]:
    """What training changed in `model` (module docstring), keyed as in model.state_dict(), detached (sharing
    storage with the model): the adapter tensors of every CoLoRA layer ("default", or the named `adapter`), the
    other trainable parameters (`include_trainable`) and the running statistics of the normalisation layers
    (`include_norm_stats`); both False give the adapter tensors alone.

    Raises ValueError on a model without CoLoRA layers, KeyError when a layer has no adapter `adapter`.
    """
    tensors = _trained_tensors(model, adapter, include_trainable, include_norm_stats, "colora_state_dict")
    return {k: v.detach() for k, v in tensors.items()}


def save_colora(model: nn.Module, path: str, config=None, adapter: str = DEFAULT, *, include_trainable: bool = True,
                include_norm_stats: bool = True) -> Dict[str, Tensor]:
    """Write :func:`colora_state_dict` of `model` to `path` as ``.safetensors``, atomically
    (`serialization.atomic_write`); `load_colora_state_dict(model, path)` reads it back.

    The file's metadata has one JSON entry, ``"colora_fused"``: ``{"version", "config": <config as a dict> or
    null, "adapter", "include_trainable", "include_norm_stats"}``; `config` is a `CoLoRAConfig` (anything with
    ``to_dict()``) or such a dict, and `serialization.load_merged(path)` returns the entry with the tensors.
    Returns the state dict written.
    """
    from . import __version__  # read at call time: the package's __init__ imports this module

    config = _config_dict(config, "save_colora")
    sd = colora_state_dict(model, adapter, include_trainable=include_trainable,
                           include_norm_stats=include_norm_stats)
    _write_safetensors(path, sd, {"version": __version__, "config": config, "adapter": adapter,
                                  "include_trainable": include_trainable, "include_norm_stats": include_norm_stats})
    return sd


def _read(source, caller: str) -> Tuple[Mapping, Optional[dict]]:
    """(state dict, the file's "colora_fused" metadata or None) of a dict or of a .safetensors / torch.save path."""
    if isinstance(source, Mapping):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{caller}: expected a state dict (a dict of tensors) or the path of a .safetensors or .pt "
                        f"file, got {type(source).__name__}")
    path = os.fspath(source)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, caller)
    if not os.path.isfile(path):
        raise ValueError(f"{caller}: {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of other objects, a truncated file, a safetensors file named .pt
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{caller}: cannot read {path} with torch.load(weights_only=True): {reason}") from None
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{caller}: {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded, None


def _problems(own: Dict[str, Tensor], state_dict: Mapping) -> Dict[str, List[Tuple[str, str]]]:
    """Each reason `state_dict` cannot be loaded into the tensors `own`: {kind: [(key, detail)]}, kinds as in
    PROBLEM_KINDS, each list in the model's order (unexpected keys in the state dict's)."""
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, Tensor)}
    common = [k for k in own if k in tensors]
    finite = lambda t: t.is_meta or not t.is_floating_point() or bool(torch.isfinite(t).all())  # noqa: E731
    found = {
        "nested": [(k, "") for k, v in state_dict.items() if isinstance(v, Mapping)],
        "not-a-tensor": [(k, "") for k, v in state_dict.items() if not isinstance(v, (Tensor, Mapping))],
        "missing": [(k, "") for k in own if k not in state_dict],
        "unexpected": [(k, "") for k in tensors if k not in own],
        "mis-shaped": [(k, f": {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}") for k in common
                       if tensors[k].shape != own[k].shape],
        "wrong-dtype": [(k, f": {tensors[k].dtype} vs {own[k].dtype}") for k in common
                        if tensors[k].dtype != own[k].dtype],
        "meta": [(k, "") for k in common if tensors[k].is_meta],
        "non-finite": [(k, "") for k in common if not finite(tensors[k])],
    }
    return {kind: entries for kind, entries in found.items() if entries}


def _listed(entries: List[str]) -> str:
    """The first SHOWN entries, then "(N more)"."""
    more = f" ({len(entries) - SHOWN} more)" if len(entries) > SHOWN else ""
    return ", ".join(entries[:SHOWN]) + more


def _adapter_of(key: str) -> Optional[str]:
    """The adapter an adapter key belongs to ("default" for a layer's own tensors); None for other keys."""
    head, _, leaf = key.rpartition(".")
    if leaf not in ADAPTER_KEYS:
        return None
    parts = head.split(".")
    return parts[-1] if len(parts) > 1 and parts[-2] == "colora_adapters" else DEFAULT


def _hints(problems: Dict[str, List[Tuple[str, str]]], own: Dict[str, Tensor], model: nn.Module, state_dict: Mapping,
           adapter: str, meta: Optional[dict]) -> Tuple[List[str], bool]:
    """(what probably went wrong, whether the architecture or the wrapping differs), for the mistakes a person
    fixes by building the model or calling differently."""
    if meta is not None and "merged_layers" in meta:
        return ["the file is a merged plain model (save_merged): load it with load_state_dict into the unwrapped "
                "architecture"], False
    keys = {kind: [k for k, _ in entries] for kind, entries in problems.items()}
    nested = [k for k in keys.get("nested", []) if set(state_dict[k]) & set(own)]
    if nested:
        return [f"the state dict sits under {nested[0]!r}: pass checkpoint[{nested[0]!r}]"], False
    hints = []
    missing, unexpected, misshaped = (keys.get(kind, []) for kind in ("missing", "unexpected", "mis-shaped"))
    others = sorted({_adapter_of(k) for k in unexpected} - {None, adapter})
    if others:
        hints.append(f"it holds adapter {', '.join(map(repr, others))}, not {adapter!r}: pass adapter=<name> "
                     "(add_adapter(model, <name>, rank=...) first where the model lacks it)")
    layers_differ = not others and (any(_adapter_of(k) for k in missing + misshaped)
                                    or any(_adapter_of(k) == adapter for k in unexpected))
    if layers_differ:
        hints.append("its CoLoRA layers differ from the model's: wrap the same architecture with the same config "
                     "(target_modules, exclude_modules, rank, order, train_bias)")
    if missing and not any(_adapter_of(k) for k in missing):
        flags = [flag for flag, absent in (
            ("include_trainable", any(isinstance(own[k], nn.Parameter) for k in missing)),
            ("include_norm_stats", any(not isinstance(own[k], nn.Parameter) for k in missing))) if absent]
        off = ", ".join(f"{flag}=False" for flag in flags)
        hints.append(f"its adapters are complete but not the rest: saved with {off}, or an adapters-only state dict? "
                     f"pass {off} to load what it holds; or the model saved had other modules_to_save")
    model_keys = model.state_dict(keep_vars=True)
    untrained = [k for k in unexpected if k in model_keys and not _adapter_of(k)]
    if untrained:
        hints.append(f"{_listed(untrained)} {'is' if len(untrained) == 1 else 'are'} in the model but not trained "
                     "there: build it with the modules_to_save of the model saved (get_colora_model)")
    if meta is not None and meta.get("config") is not None and (layers_differ or untrained):
        hints.append(f"the file was saved from a model wrapped with {_config_call(meta['config'])}")
    return hints, layers_differ or bool(misshaped)


def _config_call(config: dict) -> str:
    """`CoLoRAConfig(...)` with the fields of `config` (a `to_dict()`) that differ from the defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(CoLoRAConfig)}
    fields = ", ".join(f"{k}={v!r}" for k, v in config.items() if k not in defaults or v != defaults[k])
    return f"CoLoRAConfig({fields})"


def _report(problems: Dict[str, List[Tuple[str, str]]], hints: List[str], another: bool, caller: str) -> str:
    """Counts first, then the first few keys of each problem, then the hints."""
    counts = ", ".join(f"{len(problems[kind])} {kind}" for kind, _ in PROBLEM_KINDS if kind in problems)
    total = sum(len(keys) for keys in problems.values())
    suspect = " — another architecture or config?" if another else "."
    lines = [f"{caller}: {counts} {'key' if total == 1 else 'keys'}{suspect} Nothing was loaded."]
    lines += [f"  {label}: {_listed([k + detail for k, detail in problems[kind]])}" for kind, label in PROBLEM_KINDS
              if kind in problems]
    lines += [f"  hint: {hint}" for hint in hints]
    return "\n".join(lines)


@torch.no_grad()
def load_colora_state_dict(model: nn.Module, state_dict, adapter: str = DEFAULT, *, include_trainable: bool = True,
                           include_norm_stats: bool = True) -> None:
    """Load what :func:`colora_state_dict` (with the same `adapter`, `include_trainable`, `include_norm_stats`)
    holds, all or nothing. `state_dict` is a dict, or the path of a ``.safetensors`` file (`save_colora`'s) or of
    a ``torch.save`` file (read with ``torch.load(weights_only=True)``).

    Every key is checked first: any nested dict, non-tensor, missing, unexpected or mis-shaped key, any tensor of
    another dtype than the model's, any meta tensor and any NaN/Inf raise ValueError, and nothing is loaded. The
    message counts the problems, names the first keys of each and hints at the likely cause (the model is not
    wrapped, or wrapped or frozen differently than the model saved). Tensors may sit on another device than the
    model (a CPU state dict loads into a CUDA model): each is copied to its target's device.
    """
    caller = "load_colora_state_dict"
    state_dict, meta = _read(state_dict, caller)
    if not colora_layers(model):
        config = meta.get("config") if meta else None
        saved = f": {_config_call(config)}" if config is not None else ""
        raise ValueError(f"{caller}: the model has no CoLoRA layer. Nothing was loaded.\n  hint: wrap it first with "
                         f"get_colora_model/apply_colora using the same config as the model saved{saved}")
    own = _trained_tensors(model, adapter, include_trainable, include_norm_stats, caller)
    problems = _problems(own, state_dict)
    if problems:
        raise ValueError(_report(problems, *_hints(problems, own, model, state_dict, adapter, meta), caller))
    for key, t in own.items():
        t.copy_(state_dict[key])


def load_adapter(model: nn.Module, source, name: str, *, saved_adapter: Optional[str] = None) -> None:
    """Load one adapter saved by `save_colora` / `colora_state_dict` (a dict or a file path) into `model` as the
    named adapter `name`, whatever name it was saved under (PEFT's `load_adapter(path, adapter_name=...)`): how a
    server puts many users' adapters, each trained as "default" of its own copy, side by side in one model.

    `name` is created (`add_adapter`; rank and Δb from the saved shapes) when the layers lack it, or overwritten.
    Only adapter tensors are read: the rest of the file (a trained head, norm statistics) is not, since the
    adapters it serves beside share those. `saved_adapter` picks one when the file holds several. All or nothing:
    ValueError as for `load_colora_state_dict`, and a created adapter is removed again."""
    caller = "load_adapter"
    state_dict, meta = _read(source, caller)
    layers = _require_layers(model, caller)
    saved = sorted({a for a in map(_adapter_of, state_dict) if a is not None})
    if saved_adapter is None and len(saved) != 1:
        raise ValueError(f"{caller}: the state dict holds adapters {saved}; pick one with saved_adapter=<name>"
                         if saved else f"{caller}: the state dict holds no adapter tensors. Nothing was loaded.")
    saved_adapter = saved_adapter or saved[0]
    if saved_adapter not in saved:
        raise ValueError(f"{caller}: the state dict has no adapter {saved_adapter!r}; it holds {saved}")
    src, dst = _adapter_prefix(saved_adapter), _adapter_prefix(name)
    renamed = {}
    for layer_name, _ in layers:
        for key in ADAPTER_KEYS:
            prefix = f"{layer_name}." if layer_name else ""
            if f"{prefix}{src}{key}" in state_dict:
                renamed[f"{prefix}{dst}{key}"] = state_dict[f"{prefix}{src}{key}"]
    created = name not in layers[0][1].adapter_names()
    if created:
        first = layers[0][0] + "." if layers[0][0] else ""
        kp = renamed.get(f"{first}{dst}pointwise")
        rank = kp.shape[0] if kp is not None and kp.dim() == 3 else 1
        add_adapter(model, name, rank=rank, train_bias=f"{first}{dst}bias_delta" in renamed)
    try:
        load_colora_state_dict(model, renamed, adapter=name, include_trainable=False, include_norm_stats=False)
    except ValueError:
        if created:
            delete_adapter(model, name)
        raise
