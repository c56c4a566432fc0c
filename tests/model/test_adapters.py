"""Named adapters: several CoLoRA adapters per layer (a shared one plus per-task ones), summed when active, on
every backend against the float64 reference; switching never serves a stale merged weight; merge, save and load
per adapter; a model with only "default" is what it was."""
import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused import functional
from colora_fused.reference import colora_conv_reference

from cases import ORDERS, TOLERANCE, assert_close, backend_device, fp32_tolerance

TOL = TOLERANCE[torch.float32]


def _backends():
    names = ["torch", "reference"] + (["triton", "hybrid"] if functional.triton_available() else [])
    return [pytest.param(n, id=n) for n in names]


def _layer(order, backend, groups=1):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    layer = cf.CoLoRAConv2d.from_conv(conv, order=order, backend=backend)
    layer.add_adapter("task", rank=2)
    with torch.no_grad():
        for name in layer.adapter_names():
            adapter = layer.adapter(name)
            adapter.depthwise.normal_()
            adapter.bias_delta.normal_()
    return layer


def _reference(layer, x, names):
    """The float64 oracle: the base conv plus every term of every named adapter (rank-stacked), Δb summed."""
    kps, kds, dbs = [], [], []
    for name in names:
        a = layer.adapter(name)
        kps.append(a.pointwise.double().reshape(-1, *a.pointwise.shape[-2:]))
        kds.append(a.depthwise.double().reshape(-1, *layer.depthwise.shape))
        dbs.append(a.bias_delta.double())
    return colora_conv_reference(x.double(), layer.weight.double(), layer.bias.double(), torch.cat(kps),
                                 torch.cat(kds), sum(dbs), 1, 1, 1, layer.groups, order=layer.order)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("groups", [1, 2])
def test_active_adapters_sum_on_every_backend(backend, order, groups):
    """Output and the gradients of both adapters, default (rank 1) + task (rank 2) active, against the oracle."""
    device = backend_device(backend)
    tol = fp32_tolerance(device)
    layer = _layer(order, backend, groups).to(device)
    layer.active_adapters = ("default", "task")
    x = torch.randn(2, 4, 7, 7, device=device, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    params = {n: [p.detach().double().requires_grad_() for p in layer.adapter_parameters([n])]
              for n in ("default", "task")}
    x64 = x.detach().double().requires_grad_()
    kp = torch.cat([params["default"][0].unsqueeze(0), params["task"][0]])
    kd = torch.cat([params["default"][1].unsqueeze(0), params["task"][1]])
    ref = colora_conv_reference(x64, layer.weight.double(), layer.bias.double(), kp, kd,
                                params["default"][2] + params["task"][2], 1, 1, 1, groups, order=order)
    ref.backward(grad.double())
    assert_close(out, ref.detach(), torch.float32, "out", tol)
    assert_close(x.grad, x64.grad, torch.float32, "x", tol)
    for name in ("default", "task"):
        for p, p64 in zip(layer.adapter_parameters([name]), params[name]):
            assert_close(p.grad, p64.grad, torch.float32, f"{name} grad", tol)


def test_switching_never_serves_a_stale_merged_weight():
    """torch backend, merge cache on: each switch, and each in-place change of an adapter, shows in the output."""
    layer = _layer("pointwise_first", "torch")
    x = torch.randn(2, 4, 7, 7)
    for names in (["default"], ["default", "task"], ["task"], [], ["default"], ["task", "default"]):
        cf.set_active_adapters(nn.Sequential(layer), names)
        expected = _reference(layer, x, names) if names else nn.functional.conv2d(x, layer.weight, layer.bias,
                                                                                  padding=1).double()
        assert_close(layer(x), expected, torch.float32, f"active {names}", TOL)
        with torch.no_grad():
            layer.adapter("task").depthwise.mul_(1.5)  # an optimizer step's worth of change, between batches
        expected = _reference(layer, x, names) if names else expected
        assert_close(layer(x), expected, torch.float32, f"after an update, active {names}", TOL)


def test_merge_folds_only_the_named_adapters():
    model = nn.Sequential(_layer("depthwise_first", "torch"))
    layer = model[0]
    cf.set_active_adapters(model, ["default", "task"])
    x = torch.randn(2, 4, 7, 7)
    before, default_kd = model(x).detach(), layer.depthwise.detach().clone()
    weight = (layer.weight + layer.delta_weight(["task"])).detach()
    assert cf.merge_colora(model, adapters=["task"]) == ["0"]
    assert_close(layer.weight, weight.double(), torch.float32, "K0 + ΔK_task")
    assert torch.count_nonzero(layer.adapter("task").depthwise) == 0 and torch.equal(layer.depthwise, default_kd)
    assert_close(model(x), before.double(), torch.float32, "output after merging task")
    with pytest.raises(KeyError, match="no adapter 'user9'"):
        cf.merge_colora(model, adapters=["user9"])
    with pytest.raises(ValueError, match="once"):
        cf.merge_colora(model, adapters=["task", "task"])


def test_save_and_load_one_adapter_and_default_keys_unchanged():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 6, 3))
    cf.apply_colora(plain)
    default_keys = set(plain.state_dict())
    model = nn.Sequential(nn.Conv2d(3, 6, 3))
    model[0].load_state_dict(plain[0].state_dict(), strict=False)
    cf.apply_colora(model)
    assert set(model.state_dict()) == default_keys  # only "default": the keys and names of before
    cf.add_adapter(model, "task", rank=2)
    with torch.no_grad():
        model[0].adapter("task").depthwise.normal_()
    task = cf.colora_state_dict(model, adapter="task")
    assert set(task) == {"0.colora_adapters.task.pointwise", "0.colora_adapters.task.depthwise",
                         "0.colora_adapters.task.bias_delta"}
    assert set(cf.colora_state_dict(model)) == {"0.pointwise", "0.depthwise", "0.bias_delta"}
    cf.add_adapter(plain, "task", rank=2)
    with pytest.raises(ValueError, match="missing"):
        cf.load_colora_state_dict(plain, {k: v for k, v in task.items() if "bias" not in k}, adapter="task")
    cf.load_colora_state_dict(plain, task, adapter="task")
    cf.set_active_adapters(model, ["default", "task"])
    cf.set_active_adapters(plain, ["default", "task"])
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(plain(x), model(x))


def test_management_is_all_or_nothing():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 3))
    cf.apply_colora(model)
    cf.add_adapter(model, "shared")
    model[1].add_adapter("only_here")
    with pytest.raises(KeyError, match="only_here"):
        cf.set_active_adapters(model, ["shared", "only_here"])
    assert cf.active_adapters(model) == ["default"]
    with pytest.raises(ValueError, match="already has an adapter 'shared'"):
        cf.add_adapter(model, "shared")
    with pytest.raises(ValueError, match="identifier"):
        cf.add_adapter(model, "user-1")
    with pytest.raises(ValueError, match="cannot be deleted"):
        model[0].delete_adapter("default")
    cf.set_trainable_adapters(model, ["shared"])
    assert all(p.requires_grad for _, layer in cf.colora_layers(model) for p in layer.adapter_parameters(["shared"]))
    assert not any(p.requires_grad for _, layer in cf.colora_layers(model)
                   for p in layer.adapter_parameters(["default"]))
    cf.set_active_adapters(model, ["shared"])
    cf.delete_adapter(model, "shared")
    assert cf.active_adapters(model) == [] and model[0].adapter_names() == ["default"]
