"""Every environment variable the library reads, each read here and documented once.

Each is read when its function is called (tests set them with `monkeypatch.setenv`), except where a caller says
it reads one once at import. The values are checked by their callers, which know what is valid.
"""
import os
from typing import Optional


def backend() -> str:
    """COLORA_BACKEND: what `backend="auto"` means for every call (a layer's or `colora_conv`'s); an explicit
    backend beats it. Unset or empty: "auto". One of `backends.NAMES` (`functional.requested_backend` checks)."""
    return os.environ.get("COLORA_BACKEND", "") or "auto"


def autotune() -> bool:
    """COLORA_AUTOTUNE=0: `auto` on CUDA takes the first candidate that can run (the fused kernels where they
    serve the shape) instead of measuring each candidate once per shape (`functional.fastest_backend`)."""
    return os.environ.get("COLORA_AUTOTUNE", "1") != "0"


def merge_cache() -> bool:
    """COLORA_MERGE_CACHE=0: the layers merge K0 + ΔK on every call instead of keeping it between calls
    (`ops.MergedWeightCache`)."""
    return os.environ.get("COLORA_MERGE_CACHE", "1") != "0"


def grad_route() -> Optional[str]:
    """COLORA_GRAD_ROUTE: "cheap" or "gradw" forces that route to the adapter gradients of every conv, where
    `_conv.adapter_grad_route` would count multiply-adds to choose; unset or empty: None (it chooses)."""
    return os.environ.get("COLORA_GRAD_ROUTE", "") or None


def triton_autotune() -> bool:
    """COLORA_TRITON_AUTOTUNE=0: each kernel runs one fixed config instead of autotuning on a GPU (the CUDA tests
    set it: autotuning every tiny test shape costs more than the tests). Read once, when the kernels are
    imported (`kernels._common.FIXED_CONFIG`)."""
    return os.environ.get("COLORA_TRITON_AUTOTUNE") != "0"


def nan_fill() -> bool:
    """COLORA_NAN_FILL=1: the kernels' outputs start as NaN instead of uninitialised memory, so that a tile a
    kernel fails to write shows up in the tests (`kernels._common.new_tensor`)."""
    return os.environ.get("COLORA_NAN_FILL") == "1"


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1 (Triton's own variable, set before triton is imported): Triton runs the kernels on CPU
    tensors in its interpreter; the triton and hybrid backends then accept CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def mixed_route() -> Optional[str]:
    """COLORA_MIXED_ROUTE: "segments", "gathered", "per_set" or "fused" forces that route for batches whose
    samples use different adapters (`mixed.route`; under torch.compile "segments" and "per_set" become
    "gathered"), where it would choose; unset or empty: None (it chooses)."""
    return os.environ.get("COLORA_MIXED_ROUTE", "") or None
