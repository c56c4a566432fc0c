"""Adaptive merge schedules: merge a layer when its relative update ‖ΔK‖/‖K0‖ reaches a threshold (per layer),
or every layer when the model's does; in any loop (`MergeSchedule`) and in `colora-finetune` (`--merge-when`)."""
import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused.callbacks import layers_due, relative_updates


def _model(ratios):
    """Two CoLoRA layers whose relative updates are exactly `ratios` (ΔK scaled against K0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    cf.apply_colora(model)
    for (_, layer), ratio in zip(cf.colora_layers(model), ratios):
        with torch.no_grad():
            layer.depthwise.normal_()
            layer.depthwise.mul_(ratio * layer.weight.norm() / layer.delta_weight().norm())
    return model


def test_relative_updates_are_the_norm_ratio():
    model = _model([0.2, 0.01])
    updates = relative_updates(model)
    assert updates.keys() == {"0", "1"}
    torch.testing.assert_close(torch.tensor(list(updates.values())), torch.tensor([0.2, 0.01]))


def test_per_layer_threshold_merges_only_the_layers_past_it():
    model = _model([0.2, 0.01])
    layers = dict(cf.colora_layers(model))
    optimizer = torch.optim.Adam([p for layer in layers.values() for p in layer.adapter_parameters()])
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()
    optimizer.step()  # Adam state for every adapter tensor
    before, kd1 = model(x).detach(), layers["1"].depthwise.detach().clone()
    schedule = cf.MergeSchedule(model, optimizer, every=1, unit="step", threshold=0.1)
    assert schedule.step()
    assert schedule.merged == [["0"]] and schedule.merges == [(0, 1)]
    assert torch.count_nonzero(layers["0"].depthwise) == 0 and torch.equal(layers["1"].depthwise, kd1)
    assert layers["0"].depthwise not in optimizer.state and layers["1"].depthwise in optimizer.state
    torch.testing.assert_close(model(x), before)
    assert not schedule.step()  # nothing left past the threshold: no merge, nothing recorded
    assert schedule.merges == [(0, 1)]
    restored = cf.MergeSchedule(model, optimizer, unit="step", threshold=0.1)
    restored.load_state_dict(schedule.state_dict())
    assert restored.merged == [["0"]] and restored.steps == 2


def test_model_scope_merges_everything_once_the_whole_model_moved():
    low, high = _model([0.05, 0.05]), _model([0.3, 0.01])
    assert layers_due(low, 0.1, "model") == [] and layers_due(low, 0.04, "model") == ["0", "1"]
    # the model's ratio weighs each layer by its K0: one layer far past the threshold carries the rest
    assert layers_due(high, 0.1, "model") == ["0", "1"] and layers_due(high, 0.1, "layer") == ["0"]
    schedule = cf.MergeSchedule(high, every=2, unit="step", threshold=0.1, scope="model")
    assert not schedule.step() and schedule.step()  # checked on every 2nd step
    assert all(torch.count_nonzero(layer.depthwise) == 0 for _, layer in cf.colora_layers(high))


def test_bad_settings_are_refused():
    model = _model([0.1, 0.1])
    with pytest.raises(ValueError, match="threshold"):
        cf.MergeSchedule(model, threshold=0)
    with pytest.raises(ValueError, match="scope"):
        cf.MergeSchedule(model, threshold=0.1, scope="net")
    with pytest.raises(ValueError, match="not CoLoRA layers"):
        cf.merge_colora(model, names=["2"])
