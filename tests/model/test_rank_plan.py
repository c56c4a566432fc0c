"""The config travels to the layers, and `CoLoRAConfig.rank` takes a {conv name: rank} plan: a model wrapped with
a plan has each layer at its planned rank and computes what the same convs wrapped one by one compute."""
import copy
import json

import pytest
import torch
from torch import nn

import colora_fused as cf

from cases import assert_close


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 6, 1),
                                  nn.Conv2d(6, 6, (3, 1), padding=(1, 0), bias=False))
        self.head = nn.Conv2d(6, 4, 3, stride=2)

    def forward(self, x):
        return self.head(self.body(self.stem(x).relu()))


PLAN = {"stem": 2, "body.0": 1, "body.3": 3, "head": 4}


def _net():
    torch.manual_seed(0)
    return Net().double()


def _by_hand(model, plan, **options):
    """Each planned conv replaced by its own `from_conv` at its rank, in place."""
    for name, rank in plan.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, cf.CoLoRAConv2d.from_conv(getattr(owner, child), rank=rank, **options))
    return model


def _randomize_(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in cf.colora_layers(model):
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


def _output_and_grads(model, x):
    out = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out.square().sum(), params)


@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
def test_plan_gives_each_layer_its_rank_and_matches_the_layers_wrapped_one_by_one(order):
    model = cf.get_colora_model(_net(), cf.CoLoRAConfig(rank=PLAN, order=order, train_bias=True, backend="torch"))
    assert {n: layer.rank for n, layer in cf.colora_layers(model)} == PLAN
    assert all(layer.order == order and layer.backend == "torch" for _, layer in cf.colora_layers(model))
    assert type(model.body[2]) is nn.Conv2d and not model.body[2].weight.requires_grad  # not planned: plain, frozen
    reference = _by_hand(_net(), PLAN, order=order, train_bias=True, backend="reference")
    for p in reference.parameters():  # frozen as get_colora_model freezes: every parameter but the adapters
        p.requires_grad_(False)
    for _, layer in cf.colora_layers(reference):
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    _randomize_(model)
    _randomize_(reference)
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    out, grads = _output_and_grads(model, x)
    expected, expected_grads = _output_and_grads(reference, x)
    assert_close(out, expected, torch.float64, "output")
    assert len(grads) == len(expected_grads) == 3 * len(PLAN)  # Kp, Kd, Δb (train_bias) each
    for i, (a, b) in enumerate(zip(grads, expected_grads)):
        assert_close(a, b, torch.float64, f"grad {i}")


def test_apply_colora_takes_the_plan_as_its_selection():
    model = _net()
    assert cf.apply_colora(model, rank=PLAN) == list(PLAN)
    assert {n: layer.rank for n, layer in cf.colora_layers(model)} == PLAN
    assert model.body[2].weight.requires_grad  # apply_colora freezes only what it wraps
    model = _net()
    assert cf.apply_colora(model, include=["stem", "head"], rank=PLAN) == ["stem", "head"]
    assert [layer.rank for _, layer in cf.colora_layers(model)] == [2, 4]


def test_a_plan_that_misses_a_selected_conv_or_names_no_conv_changes_nothing():
    model = _net()
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"get_colora_model: the rank plan gives no rank for 1 selected conv: "
                                         r"body\.2"):
        cf.get_colora_model(model, cf.CoLoRAConfig(target_modules="all", rank=PLAN))
    with pytest.raises(ValueError, match=r"apply_colora: the rank plan names what is no conv of the model: "
                                         r"body\.1, nothing"):
        cf.apply_colora(model, rank={**PLAN, "body.1": 2, "nothing": 1})
    assert dict(model.named_modules()) == modules and not cf.colora_layers(model)


def test_plan_config_round_trips_and_refuses_what_is_no_plan():
    config = cf.CoLoRAConfig(rank=PLAN, modules_to_save=["body.2"])
    restored = cf.CoLoRAConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config and restored.rank == PLAN
    a, b = cf.get_colora_model(_net(), config), cf.get_colora_model(_net(), restored)
    assert [(n, layer.rank) for n, layer in cf.colora_layers(a)] == [(n, layer.rank) for n, layer in
                                                                     cf.colora_layers(b)]
    with pytest.raises(ValueError, match=r"rank\['stem'\]: rank must be an int >= 1"):
        cf.CoLoRAConfig(rank={"stem": 0})
    with pytest.raises(ValueError, match="empty"):
        cf.CoLoRAConfig(rank={})
    with pytest.raises(TypeError, match="qualified conv names"):
        cf.CoLoRAConfig(rank={1: 2})
    with pytest.raises(ValueError, match="plan"):
        cf.CoLoRAConv2d.from_conv(nn.Conv2d(3, 4, 3), rank={"stem": 2})


def test_allocate_rank_plan_wraps_a_fresh_copy_the_same_way():
    torch.manual_seed(0)
    model = Net()
    fresh = copy.deepcopy(model)
    batches = [torch.randn(2, 3, 9, 9) for _ in range(2)]
    plan = cf.allocate_rank(model, batches, lambda m, x: m(x).square().mean(), budget=400, max_rank=3)
    cf.get_colora_model(fresh, cf.CoLoRAConfig(rank=plan.ranks))
    assert {n: layer.rank for n, layer in cf.colora_layers(fresh)} == plan.ranks == \
        {n: layer.rank for n, layer in cf.colora_layers(model)}


def test_the_config_travels_to_the_layer_and_keywords_override_it():
    conv = nn.Conv2d(4, 6, 3)
    config = cf.CoLoRAConfig(order="depthwise_first", train_bias=False, backend="torch", rank=2)
    layer = cf.CoLoRAConv2d.from_conv(copy.deepcopy(conv), config)
    assert (layer.order, layer.backend, layer.rank, layer.bias_delta) == ("depthwise_first", "torch", 2, None)
    layer = cf.CoLoRAConv2d.from_conv(copy.deepcopy(conv), config, rank=3, train_bias=True)
    assert (layer.order, layer.rank, layer.bias_delta is not None) == ("depthwise_first", 3, True)
    layer = cf.CoLoRAConv2d(4, 6, 3, config=config, backend="reference")
    assert (layer.order, layer.backend, layer.rank) == ("depthwise_first", "reference", 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    cf.apply_colora(model, config=config, order="pointwise_first")
    assert [(layer.order, layer.rank) for _, layer in cf.colora_layers(model)] == [("pointwise_first", 2)] * 2
    with pytest.raises(TypeError, match="unexpected keyword arguments alpha; the options are order, train_bias"):
        cf.CoLoRAConv2d.from_conv(nn.Conv2d(3, 4, 3), alpha=2)
    with pytest.raises(TypeError, match="unexpected keyword arguments target_modules"):
        cf.CoLoRAConv2d(3, 4, 3, target_modules="all")
    with pytest.raises(TypeError, match="config must be a CoLoRAConfig"):
        cf.CoLoRAConv2d.from_conv(nn.Conv2d(3, 4, 3), "depthwise_first")
