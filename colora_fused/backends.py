"""The backends of a CoLoRA convolution, one record each: what `backend=` accepts and what each name runs.

Everything that lists, checks or tells backends apart reads this table: `functional` (the check, `auto`'s
candidates, the Triton refusals), `ops` (which paths fall back to torch on a Triton failure), `CoLoRAConfig` and
the layers (`check`) and the command-line tools (`NAMES`). A new backend is a record here plus its forward and
backward in `ops._FORWARD` / `ops._BACKWARD` (and, when it refuses more than every Triton path refuses, its
reason in `functional.unsupported_reason`).
"""
from typing import Dict, NamedTuple, Optional, Tuple


class Backend(NamedTuple):
    """One backend.

    - `triton`: runs a Triton kernel, so it needs triton installed, float32 / float16 / bfloat16 tensors and one
      of `devices` (or CPU tensors under Triton's interpreter, for tests); a Triton failure can happen there.
    - `devices`: the device types it runs on; None: wherever torch runs the convolution.
    - `auto_candidate`: `auto` measures it for each shape on CUDA and takes the fastest (`fastest_backend`).
    - `op`: the registered op runs it (`ops`); `auto` is a choice among those, `reference` runs apart.
    - `merged_weight`: it convolves with K0 + ΔK built in memory, so a layer's cached merge
      (`ops.MergedWeightCache`) serves it.
    """
    name: str
    runs: str
    triton: bool = False
    devices: Optional[Tuple[str, ...]] = None
    auto_candidate: bool = False
    op: bool = False
    merged_weight: bool = False

    @property
    def falls_back(self) -> bool:
        """Whether it has a variant that runs the torch path where Triton fails on a shape (what `auto` runs):
        true of the op backends with a Triton part."""
        return self.op and self.triton


TABLE: Dict[str, Backend] = {b.name: b for b in (
    Backend("auto", "triton, hybrid or torch on CUDA, whichever is measured fastest for the shape; torch elsewhere"),
    Backend("triton", "the fused kernels: K0 + ΔK built tile by tile in registers, never in memory",
            triton=True, devices=("cuda",), auto_candidate=True, op=True),
    Backend("hybrid", "torch's merged weight and library convs, the adapter gradients by the one-pass Triton kernel",
            triton=True, devices=("cuda",), auto_candidate=True, op=True, merged_weight=True),
    Backend("torch", "K0 + ΔK merged once, one library conv forward, the adapter gradients by aten ops",
            auto_candidate=True, op=True, merged_weight=True),
    Backend("reference", "the paper's equations as written, in aten ops (`reference.colora_conv_reference`)"),
)}

NAMES: Tuple[str, ...] = tuple(TABLE)
AUTO_CANDIDATES: Tuple[str, ...] = tuple(n for n, b in TABLE.items() if b.auto_candidate)
OP_BACKENDS: Tuple[str, ...] = tuple(n for n, b in TABLE.items() if b.op)


def check(name: str) -> str:
    """`name`, if it is a backend; ValueError naming the backends otherwise."""
    if name not in TABLE:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    return name
