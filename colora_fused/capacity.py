"""Capacity by contribution: how many Kp ⊛ Kd terms (rank) each conv gets, within a parameter budget.

The measure. A rank-r CoLoRA adapter of a conv can move its weight only along rank-r separable kernels:
per output channel o (pointwise_first) the update ΔK[o] is a C_in/groups × taps matrix of rank ≤ r, per input
channel c (depthwise_first) the update ΔK[group(c) rows, c] is a C_out/groups × taps matrix of rank ≤ r. The
contribution a layer can make at rank r is the energy of its weight gradient G (summed over a few batches) that
the best such update captures: Σ over those matrices of their r largest squared singular values, σ₁² + … + σᵣ²
(Eckart–Young). A gradient step restricted to what the adapter can express lowers the loss, to first order, in
proportion to that energy, so the r-th term of a layer is worth σᵣ² summed over its matrices.

The allocation. Each term costs its parameters (Kp and Kd of one term; a layer's first term also pays for its
bias delta). Terms are given greedily by worth per parameter until the budget is spent; the marginal worths of
a layer decrease with r, so the greedy order is the order of a fractional knapsack. A layer whose first term is
never worth it keeps rank 0: it stays a plain, frozen conv.
"""
import dataclasses
import heapq
import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from ._conv import adapter_shapes, check_order
from .config import LAYER_FIELDS, CoLoRAConfig, Selector, with_options
from .model import _select_convs, apply_colora


def separable_energy(grad_weight: Tensor, groups: int, order: str) -> Tensor:
    """Squared singular values, summed over the separable matrices of `grad_weight` [C_out, C_in/groups, *k],
    largest first: entry i is the energy the (i+1)-th term of a CoLoRA adapter of this conv can capture."""
    check_order(order)
    c_out, c_in_g = grad_weight.shape[:2]
    g = grad_weight.detach().double().reshape(c_out, c_in_g, -1)  # [C_out, C_in/groups, taps]
    if order == "depthwise_first":  # per input channel: its group's output channels × taps
        g = g.reshape(groups, c_out // groups, c_in_g, -1).transpose(1, 2).reshape(groups * c_in_g, c_out // groups, -1)
    return torch.linalg.svdvals(g).square().sum(0)


@dataclasses.dataclass
class RankPlan:
    """What `allocate_rank` decided: per conv its rank, the energy captured and the parameters it costs."""
    ranks: Dict[str, int]
    rows: List[dict]
    budget: int
    used: int

    def table(self) -> str:
        """A Markdown table, one row per conv."""
        head = ("conv", "weight", "rank", "energy share at rank", "gradient energy", "adapter params")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            lines.append(f"| {r['name']} | {'×'.join(map(str, r['weight']))} | {r['rank']} | {r['share']:.3f} | "
                         f"{r['energy']:.3g} | {r['params']:,d} |")
        lines.append(f"\nBudget {self.budget:,d} adapter parameters, {self.used:,d} used.")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _term_params(conv: nn.Module, order: str) -> int:
    kp, kd = adapter_shapes(conv.weight.shape, conv.groups, order)
    return math.prod(kp) + math.prod(kd)


def measure_gradients(model: nn.Module, convs: List[nn.Module], batches: Iterable, loss_fn: Callable) -> List[Tensor]:
    """Σ over `batches` of ∂loss_fn(model, batch)/∂weight for each conv, with the model in eval mode (BatchNorm
    statistics untouched) and every requires_grad flag, .grad and the training mode restored afterwards."""
    params = list(model.parameters())
    flags, grads = [p.requires_grad for p in params], [p.grad for p in params]
    modes = [m.training for m in model.modules()]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for conv in convs:
            conv.weight.requires_grad_(True)
        for batch in batches:
            loss_fn(model, batch).backward()
        return [torch.zeros_like(c.weight) if c.weight.grad is None else c.weight.grad.detach().clone()
                for c in convs]
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in zip(model.modules(), modes):
            m.training = mode


def plan_ranks(named_convs, energies: List[Tensor], budget: int, order: str, max_rank: int,
               train_bias: Optional[bool] = None) -> RankPlan:
    """The greedy allocation of the module docstring, from each conv's `separable_energy`."""
    ranks = {name: 0 for name, _ in named_convs}
    costs = {}
    heap = []
    for (name, conv), energy in zip(named_convs, energies):
        term = _term_params(conv, order)
        bias = conv.out_channels if (conv.bias is not None if train_bias is None else train_bias) else 0
        costs[name] = (term, bias)
        if len(energy) and energy[0] > 0:
            heapq.heappush(heap, (-float(energy[0]) / (term + bias), name))
    energy_of = {name: e for (name, _), e in zip(named_convs, energies)}
    used = 0
    while heap:
        _, name = heapq.heappop(heap)
        term, bias = costs[name]
        cost = term + (bias if ranks[name] == 0 else 0)
        if used + cost > budget:
            continue  # a cheaper term of another conv may still fit
        used += cost
        ranks[name] += 1
        r, energy = ranks[name], energy_of[name]
        if r < min(max_rank, len(energy)) and energy[r] > 0:
            heapq.heappush(heap, (-float(energy[r]) / term, name))
    rows = []
    for (name, conv), energy in zip(named_convs, energies):
        total, r = float(energy.sum()), ranks[name]
        term, bias = costs[name]
        rows.append(dict(name=name, weight=tuple(conv.weight.shape), rank=r, energy=total,
                         share=float(energy[:r].sum()) / total if total > 0 else 0.0,
                         params=r * term + (bias if r else 0)))
    return RankPlan({n: r for n, r in ranks.items() if r > 0}, rows, budget, used)


def allocate_rank(model: nn.Module, batches: Iterable, loss_fn: Callable[[nn.Module, object], Tensor], budget: int,
                  include: Selector = None, exclude: Selector = None, *, max_rank: int = 8, apply: bool = True,
                  config: Optional[CoLoRAConfig] = None, **options) -> RankPlan:
    """Measure each selected plain conv's contribution on `batches` (`loss_fn(model, batch)` → scalar loss),
    give ranks within `budget` adapter parameters (Kp, Kd and Δb) as the module docstring says, and, with
    `apply`, wrap each conv of rank ≥ 1 by `apply_colora` at its rank and freeze the weight and bias of each
    selected conv of rank 0, which stays plain (the convs left out of the selection are not touched). The layers'
    options come from `config` with keyword `options` overriding them, as for `apply_colora` (`order` and
    `train_bias` also price the terms; the rank is the plan's). Returns the `RankPlan` (print it for the table;
    `CoLoRAConfig(rank=plan.ranks)` wraps a fresh copy of the model the same way). Raises ValueError when no conv
    can be given a term within the budget.
    """
    unsupported = options.pop("unsupported", "error" if config is None else config.unsupported)
    config = with_options(config, options, "allocate_rank", tuple(f for f in LAYER_FIELDS if f != "rank"))
    order = config.order
    named = _select_convs(model, include, exclude, unsupported, caller="allocate_rank")
    convs = [conv for _, conv in named]
    grads = measure_gradients(model, convs, batches, loss_fn)
    energies = [separable_energy(g, conv.groups, order) for g, conv in zip(grads, convs)]
    plan = plan_ranks(named, energies, budget, order, max_rank, config.train_bias)
    if not plan.ranks:
        raise ValueError(f"allocate_rank: no conv gets a term within budget={budget:,d} (the smallest term costs "
                         f"{min(_term_params(c, order) for c in convs):,d} parameters, or every gradient is zero)")
    if apply:
        apply_colora(model, config=config, rank=plan.ranks)
        for name, conv in named:
            if name not in plan.ranks:
                conv.requires_grad_(False)
    return plan
