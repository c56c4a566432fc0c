"""Capacity by contribution (`cf.allocate_rank`): the separable-energy measure on gradients of known rank, and
the allocation on a model where the answer is known."""
import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused.capacity import separable_energy

from cases import ORDERS


@pytest.mark.parametrize("order", ORDERS)
def test_energy_of_a_sum_of_two_separable_kernels(order):
    """A weight gradient that is exactly two CoLoRA terms: two terms capture all its energy, a third nothing."""
    g = torch.Generator().manual_seed(0)
    groups, c_out, c_in_g, k = 2, 6, 3, (3, 3)
    kd_ch = c_out if order == "pointwise_first" else c_in_g * groups
    kp, kd = torch.randn(2, c_out, c_in_g, generator=g), torch.randn(2, kd_ch, *k, generator=g)
    grad = cf.CoLoRAConv2d(c_in_g * groups, c_out, k, groups=groups, order=order, rank=2)
    with torch.no_grad():
        grad.pointwise.copy_(kp)
        grad.depthwise.copy_(kd)
    gw = grad.delta_weight().detach()
    energy = separable_energy(gw, groups, order)
    total = gw.double().square().sum()
    assert energy[2:].abs().max() < 1e-9 * total
    torch.testing.assert_close(energy[:2].sum(), total)
    assert energy[0] >= energy[1] > 0


class TwoBranches(nn.Module):
    """The loss reads branch `a` only: branch `b`'s conv has a zero gradient, so it must stay plain."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.a(x), self.b(x)


def _loss(model, batch):
    return model(batch)[0].square().mean()


def test_only_the_layer_with_a_gradient_gets_capacity():
    torch.manual_seed(0)
    model = TwoBranches()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    term = 8 * 3 + 8 * 9  # Kp [8, 3] + Kd [8, 3, 3]
    plan = cf.allocate_rank(model, batches, _loss, budget=3 * term + 8)
    assert plan.ranks == {"a": 3}
    assert plan.used == 3 * term + 8 and plan.used <= plan.budget
    assert isinstance(model.a, cf.CoLoRAConv2d) and model.a.rank == 3
    assert type(model.b) is nn.Conv2d and not model.b.weight.requires_grad and not model.b.bias.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["a.pointwise", "a.depthwise", "a.bias_delta"]
    rows = {r["name"]: r for r in plan.rows}
    assert rows["b"]["rank"] == 0 and rows["b"]["energy"] == 0 and rows["a"]["share"] > 0.5
    assert "| a |" in plan.table() and "| b |" in str(plan)
    assert model.a.weight.grad is None and model.b.weight.grad is None  # the measurement left no gradients


def test_convs_left_out_of_the_selection_stay_as_they_were():
    """Rank 0 freezes only the convs allocate_rank was asked about; apply=False changes nothing."""
    torch.manual_seed(0)

    class Three(TwoBranches):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 8, 1)

        def forward(self, x):
            return self.a(x) + self.c(x), self.b(x)

    model = Three()
    batches = [torch.randn(4, 3, 6, 6)]
    term = 8 * 3 + 8 * 9
    cf.allocate_rank(model, batches, _loss, budget=term + 8, exclude=["c"], apply=False)
    assert all(p.requires_grad for p in model.parameters())
    plan = cf.allocate_rank(model, batches, _loss, budget=term + 8, exclude=["c"])
    assert plan.ranks == {"a": 1}
    assert not model.b.weight.requires_grad and not model.b.bias.requires_grad
    assert model.c.weight.requires_grad and model.c.bias.requires_grad


def test_budget_goes_by_energy_per_parameter():
    """Two layers with gradients of equal size per parameter get equal ranks; a budget below one term raises
    and wraps nothing."""
    torch.manual_seed(0)

    class Both(TwoBranches):
        def forward(self, x):
            return self.a(x) + self.b(x), None

    model = Both()
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight)
        model.b.bias.copy_(model.a.bias)
    batches = [torch.randn(4, 3, 6, 6)]
    term = 8 * 3 + 8 * 9
    plan = cf.allocate_rank(model, batches, _loss, budget=2 * (2 * term + 8), apply=False)
    assert plan.ranks == {"a": 2, "b": 2}
    assert type(model.a) is nn.Conv2d  # apply=False leaves the model as it was
    with pytest.raises(ValueError, match="no conv gets a term"):
        cf.allocate_rank(model, batches, _loss, budget=term - 1)
    assert type(model.a) is nn.Conv2d and type(model.b) is nn.Conv2d
