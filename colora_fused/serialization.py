"""Crash-safe files and safetensors export of the merged plain model.

``atomic_write`` is how every file of ``colora-finetune`` reaches the disk: a reader (or a resumed run after a
SIGKILL or power loss) sees either the previous complete file or the new complete file, never part of one.

``save_merged`` writes what a user deploys: the state dict of the model with every CoLoRA layer folded into a
plain conv (``weight = K0 + ΔK``, ``bias = b0 + Δb``, no adapter keys), loadable into the original,
unwrapped architecture with ``load_state_dict`` and without this package. ``load_merged`` reads it back with
its metadata. Neither can run code: safetensors holds tensors and strings only. ``state_dict.save_colora``
writes the trained state of a wrapped model (adapters, trained modules, normalisation statistics) the same way.
"""
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .model import colora_layers

__all__ = ["METADATA_KEY", "atomic_write", "merged_state_dict", "save_merged", "load_merged"]

METADATA_KEY = "colora_fused"  # the safetensors metadata entry holding our JSON


def _fsync_directory(folder: str) -> None:
    """Make a rename in ``folder`` durable; POSIX only (Windows cannot open a directory, and NTFS journals it)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable) -> None:
    """Write ``path`` all or nothing: ``write(f)`` fills a binary file ``<path>.partial`` in the same folder,
    which is flushed and fsynced, renamed over ``path`` (atomic on POSIX and Windows), and the folder fsynced.

    A crash at any instant leaves ``path`` either as it was or complete. A crash before the rename can leave a
    ``.partial`` file, which nothing reads and the next write of ``path`` replaces. If ``write`` raises, the
    partial file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    tmp = f"{path}.partial"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> "OrderedDict[str, Tensor]":
    """``model.state_dict()`` with each CoLoRA layer's keys replaced by those of its ``to_conv()``.

    ``weight`` is ``K0 + ΔK`` (the layer's ``delta_weight()``), ``bias`` is ``b0 + Δb`` (present when either
    exists), and the adapter keys are gone. The model is not modified; keys keep their order. The adapters
    are folded in whether or not a layer's ``disable_adapters`` is set: this is the trained model.
    """
    plain = {name: layer.to_conv().state_dict() for name, layer in colora_layers(model)}
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, value in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in plain:
            out[key] = value
        elif plain[owner] is not None:  # the layer's plain keys go where its first key was
            out.update((f"{owner}.{k}" if owner else k, v) for k, v in plain[owner].items())
            plain[owner] = None
    return out


def _tensors_for_file(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """CPU, contiguous, and no two keys sharing storage (safetensors refuses aliases): shared ones are copied."""
    seen, out = set(), {}
    for key, value in sd.items():
        t = value.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _config_dict(config, caller: str) -> Optional[dict]:
    """``config`` as the JSON-ready dict a file's metadata holds: None, a dict, or anything with ``to_dict()``
    (``CoLoRAConfig``); TypeError naming ``caller`` otherwise."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return dict(config)
    if not callable(getattr(config, "to_dict", None)):
        raise TypeError(f"{caller}: config must be a dict or have a to_dict() method, got {type(config).__name__}")
    return config.to_dict()


def _write_safetensors(path: str, sd: Dict[str, Tensor], meta: dict) -> None:
    """``sd`` as ``.safetensors`` at ``path``, atomically, with ``meta`` as JSON under ``METADATA_KEY``."""
    from safetensors.torch import save

    data = save(_tensors_for_file(sd), metadata={"format": "pt", METADATA_KEY: json.dumps(meta)})
    atomic_write(path, lambda f: f.write(data))


def save_merged(model: nn.Module, path: str, config=None) -> "OrderedDict[str, Tensor]":
    """Write :func:`merged_state_dict` of ``model`` to ``path`` as ``.safetensors``, atomically.

    The file's metadata has one JSON entry, ``"colora_fused"``: ``{"version": <package version>,
    "config": <config as a dict> or null, "merged_layers": [qualified names of the CoLoRA layers folded]}``.
    ``config`` is anything with ``to_dict()`` returning JSON-ready values (``CoLoRAConfig``), or such a dict.
    The model is not modified. Returns the state dict written.
    """
    from . import __version__  # read at call time: the package's __init__ imports this module

    config = _config_dict(config, "save_merged")
    sd = merged_state_dict(model)
    _write_safetensors(path, sd, {"version": __version__, "config": config,
                                  "merged_layers": [name for name, _ in colora_layers(model)]})
    return sd


def _read_safetensors(path: str, caller: str, device: str = "cpu"
                      ) -> Tuple["OrderedDict[str, Tensor]", Optional[dict]]:
    """``(state_dict, metadata)`` of the safetensors file ``path``: ``metadata`` is its parsed ``"colora_fused"``
    entry, or None for a file written by anything else. ValueError starting with ``caller`` when the file is
    missing, not safetensors, or its entry is not JSON."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{caller}: {path} does not exist")
    try:
        sd = OrderedDict()
        with safe_open(path, framework="pt", device=device) as f:
            raw = f.metadata() or {}
            for key in f.keys():
                sd[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{caller}: cannot read {path} as safetensors: {reason}") from None
    if METADATA_KEY not in raw:
        return sd, None
    try:
        return sd, json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{caller}: {path} has a {METADATA_KEY!r} metadata entry that is not JSON: {e}") from None


def load_merged(path: str, device: str = "cpu") -> Tuple["OrderedDict[str, Tensor]", Optional[dict]]:
    """``(state_dict, metadata)`` of a safetensors file; ``metadata`` is the parsed ``"colora_fused"`` entry
    written by :func:`save_merged`, or None for a safetensors file written by anything else.

    Raises ValueError naming the file and the reason when it is missing, not safetensors, or its metadata
    entry is not JSON.
    """
    return _read_safetensors(path, "load_merged", device)
