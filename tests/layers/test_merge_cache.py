"""The per-layer merged-weight cache (issue 10, item 1): K0 + ΔK built once per adapter version, reused by the
backward and by every forward until K0, Kp or Kd changes, and never served stale.

Each test changes the layer one way and checks the next output and gradients against the float64 reference of
the layer's current tensors; `merges` counts how often K0 + ΔK is really built.
"""
import copy

import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused import ops
from colora_fused.reference import colora_conv_reference

from cases import TOLERANCE


@pytest.fixture
def merges(monkeypatch):
    """The number of K0 + ΔK constructions so far (cached or not)."""
    calls = []
    real = ops.merged_weight

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "merged_weight", counting)
    return calls


def _layer(order="pointwise_first", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layer = cf.CoLoRAConv2d(4, 6, 3, padding=1, order=order, train_bias=True, backend="torch", dtype=dtype)
    with torch.no_grad():
        layer.depthwise.normal_()
        layer.bias_delta.normal_()
    return layer


def _x(dtype=torch.float32, seed=1):
    return torch.randn(2, 4, 7, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _expected(layer, x):
    as64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return colora_conv_reference(x.double(), as64(layer.weight), as64(layer.bias), as64(layer.pointwise),
                                 as64(layer.depthwise), as64(layer.bias_delta), layer.stride, layer.padding,
                                 layer.dilation, layer.groups, layer.padding_mode, layer.order)


def _assert_current(layer, x, what, dtype=torch.float32):
    """The layer's output matches the reference of its current tensors."""
    with torch.no_grad():
        out = layer(x)
    atol, rtol = TOLERANCE[dtype]
    expected = _expected(layer, x)
    torch.testing.assert_close(out.double(), expected, atol=atol * expected.abs().max().item(), rtol=rtol,
                               msg=lambda m: f"stale merged weight after {what}: {m}")


def _train_step(layer, x, optimizer):
    optimizer.zero_grad()
    layer(x).square().mean().backward()
    optimizer.step()


def test_one_merge_per_step_shared_by_forward_backward_and_eval(merges):
    layer, x = _layer(), _x()
    opt = torch.optim.SGD(layer.adapter_parameters(), lr=0.1)
    _train_step(layer, x, opt)
    assert len(merges) == 1, "forward and backward must share one merge"
    for _ in range(3):
        _assert_current(layer, x, "an optimizer step")
    assert len(merges) == 2, "the evaluation forwards after one step share one merge"


@pytest.mark.parametrize("optimizer", [
    pytest.param(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), id="sgd-momentum"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.05, foreach=True), id="adamw-foreach"),
    pytest.param(lambda p: torch.optim.AdamW(p, lr=0.05, foreach=False), id="adamw-for-loop"),
    pytest.param(lambda p: torch.optim.Adam(p, lr=0.05, fused=True), id="adam-fused"),
])
def test_in_place_optimizer_steps(optimizer):
    layer, x = _layer(), _x()
    opt = optimizer(layer.adapter_parameters())
    for step in range(3):
        _train_step(layer, x, opt)
        _assert_current(layer, x, f"optimizer step {step}")


def test_gradient_accumulation_and_grads_match_reference(merges):
    layer, x = _layer(), _x()
    x2 = _x(seed=2)
    (layer(x).sum() + layer(x2).square().sum()).backward()
    assert len(merges) == 1
    params = {n: getattr(layer, n).detach().double().requires_grad_(True) for n in ("pointwise", "depthwise")}

    def ref(inp):
        return colora_conv_reference(inp.double(), layer.weight.double(), layer.bias.double(), params["pointwise"],
                                     params["depthwise"], layer.bias_delta.detach().double(), 1, 1, 1, 1)

    (ref(x).sum() + ref(x2).square().sum()).backward()
    for n, p in params.items():
        torch.testing.assert_close(getattr(layer, n).grad.double(), p.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change", ["merge_", "reset_adapter_", "load_state_dict", "copy_", "new_parameter",
                                    "base_weight_add_", "to_float64", "merge_colora"])
def test_every_kind_of_change_rebuilds(change):
    layer, x = _layer(), _x()
    _assert_current(layer, x, "construction")
    dtype = torch.float32
    if change == "merge_":
        before = layer(x).detach()
        layer.merge_()
        torch.testing.assert_close(layer(x), before, atol=1e-4, rtol=1e-4)
    elif change == "reset_adapter_":
        layer.reset_adapter_()
    elif change == "load_state_dict":
        other = _layer(seed=5)
        layer.load_state_dict(other.state_dict())
    elif change == "copy_":
        with torch.no_grad():
            layer.pointwise.copy_(torch.randn_like(layer.pointwise))
    elif change == "new_parameter":
        layer.depthwise = nn.Parameter(torch.randn_like(layer.depthwise))
    elif change == "base_weight_add_":
        with torch.no_grad():
            layer.weight.add_(1.0)
    elif change == "to_float64":
        layer.double()
        x, dtype = x.double(), torch.float64
    elif change == "merge_colora":
        model = nn.Sequential(layer)
        cf.merge_colora(model)
    _assert_current(layer, x, change, dtype)


def test_autocast_keeps_one_buffer_per_dtype(merges):
    layer, x = _layer(), _x()
    _assert_current(layer, x, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = _expected(layer, x)
    torch.testing.assert_close(out.double(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    _assert_current(layer, x, "autocast")
    assert len(merges) == 2, "one merge per dtype, each reused"
    assert layer.depthwise.grad.dtype == torch.float32


def test_no_grad_and_inference_mode_then_training():
    layer, x = _layer(), _x()
    with torch.inference_mode():
        _assert_current(layer, x, "inference mode")
    out = layer(x)  # a buffer built under inference_mode cannot be saved for backward: another one is used
    out.sum().backward()
    assert layer.depthwise.grad is not None


def test_a_pending_graph_keeps_its_own_merged_weight():
    """Forward with one set of adapters, then with another (functional_call), then both backwards: the first
    graph's backward must not see the rebuilt buffer."""
    layer, x = _layer(), _x()
    other = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p in other.values():
            p.mul_(-2.0)
    out_a = layer(x)
    out_b = torch.func.functional_call(layer, other, (x,))
    out_b.sum().backward()
    out_a.square().sum().backward()
    ref = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters() if p.requires_grad}
    colora_conv_reference(x.double(), layer.weight.double(), layer.bias.double(), ref["pointwise"],
                          ref["depthwise"], ref["bias_delta"], 1, 1, 1, 1).square().sum().backward()
    for n, p in ref.items():
        torch.testing.assert_close(getattr(layer, n).grad.double(), p.grad, atol=1e-4, rtol=1e-4)


def test_compiled_layer_stays_current():
    layer, x = _layer(), _x()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(layer.adapter_parameters(), lr=0.1)
    for step in range(2):
        opt.zero_grad()
        compiled(x).square().mean().backward()
        opt.step()
        with torch.no_grad():
            out = compiled(x)
        expected = _expected(layer, x)
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("how", ["attribute", "env"])
def test_turning_the_cache_off(monkeypatch, merges, how):
    layer, x = _layer(), _x()
    if how == "attribute":
        layer.cache_merged_weight = False
    else:
        monkeypatch.setenv("COLORA_MERGE_CACHE", "0")
    layer(x).sum().backward()
    _assert_current(layer, x, "no cache")
    assert len(merges) == 3, "without the cache forward, backward and the next forward each merge"
    assert not layer._merge_cache._entries


def test_deepcopy_gets_its_own_cache():
    layer, x = _layer(), _x()
    _assert_current(layer, x, "construction")
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.depthwise.zero_()
    _assert_current(clone, x, "deepcopy")
    _assert_current(layer, x, "a copy's change")


def test_disable_adapters_runs_the_base_conv():
    layer, x = _layer(), _x()
    layer.disable_adapters = True
    base = nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(layer(x), base)
    assert layer.chosen_backend(x) == "base"
    layer.disable_adapters = False
    _assert_current(layer, x, "re-enabling the adapters")


def test_a_training_loop_rebuilds_in_place():
    """After a step the merged weight is rewritten in the same buffer (a fresh weight-sized buffer per step
    costs page faults on CPU), since the previous graph has released it."""
    layer, x = _layer(), _x()
    opt = torch.optim.SGD(layer.adapter_parameters(), lr=0.1)
    pointers = set()
    for _ in range(3):
        _train_step(layer, x, opt)
        pointers.add(layer._merge_cache._entries[(torch.float32, False)][1].data_ptr())
    assert len(pointers) == 1
    _assert_current(layer, x, "in-place rebuilds")


def test_unfrozen_base_weight_with_the_cache():
    layer, x = _layer(), _x()
    layer.weight.requires_grad_(True)
    opt = torch.optim.SGD([layer.weight, *layer.adapter_parameters()], lr=0.05)
    for step in range(2):
        _train_step(layer, x, opt)
        _assert_current(layer, x, f"a step on K0 and the adapters ({step})")
    ref = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
    layer.zero_grad()
    layer(x).square().sum().backward()
    colora_conv_reference(x.double(), ref["weight"], ref["bias"], ref["pointwise"], ref["depthwise"],
                          ref["bias_delta"], 1, 1, 1, 1).square().sum().backward()
    for n in ("weight", "pointwise", "depthwise", "bias_delta"):
        torch.testing.assert_close(getattr(layer, n).grad.double(), ref[n].grad, atol=1e-4, rtol=1e-4)


def test_writes_through_data_need_clear_merged_cache():
    """`.data` writes bypass version counters (documented); clear_merged_cache() makes the layer current again."""
    layer, x = _layer(), _x()
    _assert_current(layer, x, "construction")
    layer.depthwise.data.mul_(2.0)
    layer.clear_merged_cache()
    _assert_current(layer, x, "a .data write and clear_merged_cache()")


def test_conv3d_to_channels_last_3d():
    """Module.to(memory_format=channels_last_3d) converts K0 and leaves the 4-d Kd usable (as for nn.Conv3d)."""
    torch.manual_seed(0)
    layer = cf.CoLoRAConv3d(3, 4, 3, padding=1, backend="torch", dtype=torch.float64)
    with torch.no_grad():
        layer.depthwise.normal_()
    x = torch.randn(2, 3, 4, 5, 4, dtype=torch.float64)
    expected = layer(x)
    layer.to(memory_format=torch.channels_last_3d)
    assert layer.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert layer.depthwise.shape == (4, 3, 3, 3)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last_3d)), expected)
    layer.float()
    assert layer.depthwise.dtype == torch.float32 and isinstance(layer.depthwise, nn.Parameter)


def test_cache_tells_storages_at_one_address_apart():
    """`.float().double()` frees each parameter's storage, and the new one may come at the same address with the
    parameter's version count unchanged: the cache must tell storages apart, not addresses. Two storages over one
    buffer stand in for that reuse here, deterministically."""
    import colora_fused as cf
    layer = cf.CoLoRAConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    memory = bytearray(layer.depthwise.numel() * 8)
    first = torch.frombuffer(memory, dtype=torch.float64).view(layer.depthwise.shape)
    first.normal_()
    layer.depthwise.data = first
    layer(x)  # builds the cache on the first storage
    second = torch.frombuffer(memory, dtype=torch.float64).view(layer.depthwise.shape)
    assert second.data_ptr() == first.data_ptr()
    layer.depthwise.data = second
    second.mul_(3.0)  # new values at the same address; the parameter's own version count does not move
    expected = cf.functional.colora_conv(x, layer.weight, layer.bias, layer.pointwise, layer.depthwise,
                                         layer.bias_delta, padding=1, backend="reference")
    torch.testing.assert_close(layer(x), expected)
