"""Mixed batches in the fused kernels (design §10): the segment metadata their `segments=` launches take.

A mixed batch convolves sample n with K0 + ΔK of its adapter set. The forward (`conv_fwd.colora_conv_forward`) and
the input gradient (`conv_bwd_input.colora_conv_backward_input`) take `segments=segments_of(index, counts)` and
every set's factors stacked along a leading set dim: their grids get a set axis, each set's rows are tiled on
their own (no tile straddles two sets, as vLLM's LoRA kernels keep per-segment metadata), each set's merged tile
is built in registers from its own factors, and each row reads and writes at its own sample, so nothing is gathered
or scattered in memory.
"""
from typing import Sequence

import torch

from ._common import Segments


def segments_of(index: torch.Tensor, counts: Sequence[int]) -> Segments:
    """The segments of a batch whose sample n belongs to set index[n], with counts[s] samples in set s (host
    ints, so that nothing waits for the device): the samples sorted by set (stable) and each set's offsets in
    that order, int32 on index's device."""
    sample = torch.argsort(index, stable=True).to(torch.int32)
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + int(count))
    seg = torch.tensor(offsets, dtype=torch.int32).to(index.device, non_blocking=True)
    return Segments(sample, seg, max(counts))
