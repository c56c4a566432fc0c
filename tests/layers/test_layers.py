"""CoLoRAConv1d/2d/3d: torch-compatible construction, from_conv, init, merge, reset, to_conv and errors."""
import math

import pytest
import torch
from torch import nn

import colora_fused as cf
from cases import CASE_PARAMS, ORDERS, Case, assert_close, make_tensors, reference_output
from colora_fused.reference import delta_weight_reference

LAYERS = {1: cf.CoLoRAConv1d, 2: cf.CoLoRAConv2d, 3: cf.CoLoRAConv3d}
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
ADAPTER_NAMES = ("pointwise", "depthwise", "bias_delta")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# Constructor arguments as one would pass them to nn.ConvNd: (dim, args, kwargs).
CONSTRUCTOR_CASES = [
    pytest.param(2, (4, 6, 3), {}, id="2d-defaults"),
    pytest.param(2, (4, 6, (3, 5)), dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), id="2d-tuples"),
    pytest.param(2, (4, 6, 3), dict(padding="same", dilation=2), id="2d-same-dilated"),
    pytest.param(2, (3, 5, 4), dict(padding="same", bias=False), id="2d-same-even-k-nobias"),
    pytest.param(2, (4, 6, 3), dict(padding="valid", stride=2), id="2d-valid-stride2"),
    pytest.param(2, (6, 9, 3), dict(padding=1, groups=3), id="2d-groups3"),
    pytest.param(2, (6, 6, 3), dict(padding=1, groups=6, bias=False), id="2d-depthwise"),
    pytest.param(2, (5, 7, 1), dict(bias=False), id="2d-1x1-nobias"),
    pytest.param(2, (3, 4, 3), dict(padding=1, padding_mode="reflect"), id="2d-reflect"),
    pytest.param(2, (3, 4, 3), dict(padding=(2, 1), padding_mode="replicate", stride=2), id="2d-replicate"),
    pytest.param(2, (3, 4, 3), dict(padding=1, padding_mode="circular", dilation=(2, 1)), id="2d-circular"),
    pytest.param(2, (3, 4, 3), dict(padding="same", padding_mode="reflect"), id="2d-same-reflect"),
    pytest.param(1, (4, 6, 5), dict(stride=2, padding=2, padding_mode="circular"), id="1d-circular-stride2"),
    pytest.param(1, (4, 4, 3), dict(padding="same", groups=4), id="1d-same-depthwise"),
    pytest.param(3, (4, 6, (1, 3, 3)), dict(padding=(0, 1, 1), groups=2), id="3d-1x3x3-groups2"),
    pytest.param(3, (2, 3, 3), dict(padding=1, padding_mode="replicate", bias=False), id="3d-replicate"),
]


def input_for(layer: nn.Module, size=9, batch=2, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, layer.in_channels) + (size,) * (layer.weight.dim() - 2)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def randomize_adapters_(layer: nn.Module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ADAPTER_NAMES:
            p = getattr(layer, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return layer


def plain_conv_like(layer: nn.Module, weight, bias) -> nn.Module:
    conv = CONVS[layer.weight.dim() - 2](layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                         layer.padding, layer.dilation, layer.groups, bias is not None,
                                         layer.padding_mode, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def glorot_bound(layer) -> float:
    return math.sqrt(6.0 / (layer.in_channels // layer.groups + layer.out_channels))


def snapshot(layer):
    return {name: (None if t is None else t.detach().clone())
            for name, t in [("weight", layer.weight), ("bias", layer.bias)]
            + [(n, getattr(layer, n)) for n in ADAPTER_NAMES]}


def assert_snapshot_equal(layer, snap):
    for name, value in snap.items():
        current = getattr(layer, name)
        if value is None:
            assert current is None, f"{name} appeared"
        else:
            torch.testing.assert_close(current.detach(), value, atol=0, rtol=0, equal_nan=True,
                                       msg=lambda m, name=name: f"{name} changed: {m}")


# --- construction ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [1, 2, 3])
def test_is_a_torch_conv(dim):
    layer = LAYERS[dim](3, 4, 3)
    assert isinstance(layer, CONVS[dim])
    assert issubclass(LAYERS[dim], CONVS[dim])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dim, args, kwargs", CONSTRUCTOR_CASES)
def test_constructor_mirrors_torch(dim, args, kwargs, order):
    torch.manual_seed(0)
    conv = CONVS[dim](*args, **kwargs)
    torch.manual_seed(0)
    layer = LAYERS[dim](*args, **kwargs, order=order)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    # Same seed, same base weights: torch's init is kept.
    assert torch.equal(layer.weight, conv.weight)
    assert (layer.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(layer.bias, conv.bias)
    assert not layer.weight.requires_grad
    assert layer.bias is None or not layer.bias.requires_grad
    x = input_for(layer, dtype=torch.float32)
    assert torch.equal(layer(x), conv(x)), "a fresh layer must reproduce its base conv exactly"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dim, args, kwargs", CONSTRUCTOR_CASES)
def test_adapter_shapes_init_and_count(dim, args, kwargs, order):
    layer = LAYERS[dim](*args, **kwargs, order=order)
    c_in, c_out, groups = layer.in_channels, layer.out_channels, layer.groups
    k = tuple(layer.kernel_size)
    kd_channels = c_out if order == "pointwise_first" else c_in
    assert layer.pointwise.shape == (c_out, c_in // groups)
    assert layer.depthwise.shape == (kd_channels, *k)
    assert isinstance(layer.pointwise, nn.Parameter) and layer.pointwise.requires_grad
    assert isinstance(layer.depthwise, nn.Parameter) and layer.depthwise.requires_grad
    assert torch.count_nonzero(layer.depthwise) == 0
    assert layer.pointwise.abs().max() <= glorot_bound(layer)
    assert layer.pointwise.abs().max() > 0
    has_bias = kwargs.get("bias", True)
    if has_bias:
        assert layer.bias_delta.shape == (c_out,) and layer.bias_delta.requires_grad
        assert torch.count_nonzero(layer.bias_delta) == 0
    else:
        assert layer.bias_delta is None
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    expected = c_out * (c_in // groups) + kd_channels * math.prod(k) + (c_out if has_bias else 0)
    assert trainable == expected
    total = sum(p.numel() for p in layer.parameters())
    assert total == expected + c_out * (c_in // groups) * math.prod(k) + (c_out if has_bias else 0)


def test_pointwise_is_glorot_uniform():
    layer = cf.CoLoRAConv2d(96, 160, 3)
    bound = math.sqrt(6.0 / (96 + 160))
    kp = layer.pointwise.detach()
    assert kp.abs().max() <= bound
    assert kp.abs().max() > 0.98 * bound
    assert abs(kp.mean().item()) < 0.02 * bound
    assert kp.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    grouped = cf.CoLoRAConv2d(96, 160, 3, groups=8)
    assert grouped.pointwise.abs().max() <= math.sqrt(6.0 / (12 + 160))
    assert grouped.pointwise.abs().max() > 0.95 * math.sqrt(6.0 / (12 + 160))


BAD_CONSTRUCTOR_KWARGS = [
    pytest.param(dict(padding="same", stride=2), id="same-strided"),
    pytest.param(dict(padding="full"), id="unknown-padding-string"),
    pytest.param(dict(groups=4), id="groups-not-dividing"),
    pytest.param(dict(padding_mode="mirror"), id="unknown-padding-mode"),
]


@pytest.mark.parametrize("kwargs", BAD_CONSTRUCTOR_KWARGS)
def test_constructor_errors_mirror_torch(kwargs):
    with pytest.raises(Exception) as torch_error:
        nn.Conv2d(6, 9, 3, **kwargs)
    with pytest.raises(torch_error.type):
        cf.CoLoRAConv2d(6, 9, 3, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_unbatched_input(dim, backend):
    layer = randomize_adapters_(LAYERS[dim](3, 4, 3, padding=1, padding_mode="circular", backend=backend,
                                            dtype=torch.float64))
    x = input_for(layer, size=6)
    torch.testing.assert_close(layer(x[1]), layer(x)[1], atol=1e-12, rtol=1e-10)


def test_module_dtype_conversion_moves_adapters():
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 4, 3)).double()
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert not layer.weight.requires_grad and layer.pointwise.requires_grad
    x = input_for(layer)
    expected = plain_conv_like(layer, layer.weight + layer.delta_weight(), layer.bias + layer.bias_delta)(x)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_device_and_dtype_kwargs(order):
    layer = cf.CoLoRAConv2d(3, 4, 3, dtype=torch.float64, device="cpu", order=order)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in layer.parameters())
    meta = cf.CoLoRAConv3d(3, 4, 3, device="meta", dtype=torch.float16, order=order)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in meta.parameters())
    assert len(list(meta.parameters())) == 5


@pytest.mark.parametrize("train_bias, base_bias, has_delta", [
    (None, True, True), (None, False, False), (True, True, True), (True, False, True), (False, True, False),
    (False, False, False)])
def test_train_bias(train_bias, base_bias, has_delta):
    layer = cf.CoLoRAConv2d(3, 4, 3, bias=base_bias, train_bias=train_bias)
    assert (layer.bias_delta is not None) == has_delta
    assert (layer.bias is not None) == base_bias
    conv = nn.Conv2d(3, 4, 3, bias=base_bias)
    wrapped = cf.CoLoRAConv2d.from_conv(conv, train_bias=train_bias)
    assert (wrapped.bias_delta is not None) == has_delta


def test_state_dict_keys_keep_torch_names():
    layer = cf.CoLoRAConv2d(3, 4, 3)
    assert set(layer.state_dict()) == {"weight", "bias", "pointwise", "depthwise", "bias_delta"}
    conv = nn.Conv2d(3, 4, 3)
    result = layer.load_state_dict(conv.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["bias_delta", "depthwise", "pointwise"]
    assert result.unexpected_keys == []
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)


# --- from_conv -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dim, args, kwargs", CONSTRUCTOR_CASES)
def test_from_conv_reuses_and_freezes(dim, args, kwargs, order):
    conv = CONVS[dim](*args, **kwargs, dtype=torch.float64)
    x = input_for(conv)
    expected = conv(x)
    weight_ptr = conv.weight.data_ptr()
    layer = LAYERS[dim].from_conv(conv, order=order)
    assert type(layer) is LAYERS[dim]
    assert layer.weight is conv.weight and layer.weight.data_ptr() == weight_ptr
    assert not conv.weight.requires_grad
    if conv.bias is not None:
        assert layer.bias is conv.bias and not conv.bias.requires_grad
    else:
        assert layer.bias is None
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "_reversed_padding_repeated_twice"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.pointwise.dtype == torch.float64 and layer.depthwise.dtype == torch.float64
    assert torch.equal(layer(x), expected)


def test_from_conv_keeps_training_mode():
    conv = nn.Conv2d(3, 4, 3).eval()
    assert not cf.CoLoRAConv2d.from_conv(conv).training
    assert cf.CoLoRAConv2d.from_conv(nn.Conv2d(3, 4, 3)).training


@pytest.mark.parametrize("module", [nn.Linear(3, 4), nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(3)],
                         ids=["linear", "conv-transpose2d", "batchnorm"])
def test_from_conv_rejects_non_convs(module):
    with pytest.raises(TypeError):
        cf.CoLoRAConv2d.from_conv(module)


def test_from_conv_rejects_wrong_dimension():
    with pytest.raises((TypeError, ValueError)):
        cf.CoLoRAConv2d.from_conv(nn.Conv1d(3, 4, 3))
    with pytest.raises((TypeError, ValueError)):
        cf.CoLoRAConv1d.from_conv(nn.Conv3d(3, 4, 3))


@pytest.mark.parametrize("kwargs", [dict(order="separable"), dict(backend="cuda"), dict(backend="Torch")],
                         ids=["order", "backend", "backend-case"])
def test_unknown_order_or_backend(kwargs):
    with pytest.raises(ValueError):
        cf.CoLoRAConv2d(3, 4, 3, **kwargs)
    with pytest.raises(ValueError):
        cf.CoLoRAConv2d.from_conv(nn.Conv2d(3, 4, 3), **kwargs)


# --- forward over the shared case table ------------------------------------------------------------------

def layer_from_case(case: Case, order: str, backend: str, tensors):
    layer = LAYERS[case.dim](case.c_in, case.c_out, case.kernel, bias=case.bias, order=order, backend=backend,
                             dtype=tensors["x"].dtype, **case.conv_kwargs())
    with torch.no_grad():
        for name in ("weight", "bias") + ADAPTER_NAMES:
            if tensors[name] is not None:
                getattr(layer, name).copy_(tensors[name])
    return layer


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_layer_matches_reference(case, order, backend):
    t = make_tensors(case, order, dtype=torch.float64)
    layer = layer_from_case(case, order, backend, t)
    x = t["x"].clone().requires_grad_(True)
    out = layer(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_out, ref_grads = reference_output(case, order, t, grad_out=grad_out)
    assert_close(out, ref_out, torch.float64, "out")
    out.backward(grad_out)
    assert_close(x.grad, ref_grads["x"], torch.float64, "grad x")
    for name in ADAPTER_NAMES:
        if getattr(layer, name) is not None:
            assert_close(getattr(layer, name).grad, ref_grads[name], torch.float64, f"grad {name}")
    assert layer.weight.grad is None
    assert layer.bias is None or layer.bias.grad is None


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_delta_weight_and_merge(case, order):
    t = make_tensors(case, order, dtype=torch.float64)
    layer = layer_from_case(case, order, "torch", t)
    x = t["x"]
    expected_delta = delta_weight_reference(t["pointwise"], t["depthwise"], case.groups, order)
    torch.testing.assert_close(layer.delta_weight().detach(), expected_delta, atol=1e-14, rtol=0)
    with torch.no_grad():
        before = layer(x)
    params_before = {n: getattr(layer, n) for n in ADAPTER_NAMES}
    old_kp = layer.pointwise.detach().clone()
    weight_before = layer.weight.detach().clone()
    assert layer.merge_() is layer
    torch.testing.assert_close(layer.weight.detach(), weight_before + expected_delta, atol=1e-14, rtol=0)
    if case.bias:
        torch.testing.assert_close(layer.bias.detach(), t["bias"] + t["bias_delta"], atol=1e-14, rtol=0)
        assert torch.count_nonzero(layer.bias_delta) == 0
    assert torch.count_nonzero(layer.depthwise) == 0
    assert not torch.equal(layer.pointwise, old_kp), "merge_ must draw a fresh Kp"
    assert layer.pointwise.abs().max() <= glorot_bound(layer)
    assert not layer.weight.requires_grad
    # Reset in place: an optimizer holding the adapter parameters keeps training them.
    for name, p in params_before.items():
        assert getattr(layer, name) is p and (p is None or p.requires_grad)
    with torch.no_grad():
        after = layer(x)
    torch.testing.assert_close(after, before, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("order", ORDERS)
def test_merge_bias_delta_into_bias_free_conv(order):
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 5, 3, padding=1, bias=False, train_bias=True, order=order,
                                                dtype=torch.float64))
    x = input_for(layer)
    before = layer(x).detach()
    layer.merge_()
    assert layer.bias is not None and not layer.bias.requires_grad
    torch.testing.assert_close(layer(x).detach(), before, atol=1e-12, rtol=1e-10)
    assert set(layer.state_dict()) == {"weight", "bias", "pointwise", "depthwise", "bias_delta"}


def test_merge_twice_accumulates():
    layer = randomize_adapters_(cf.CoLoRAConv2d(4, 6, 3, padding=1, dtype=torch.float64))
    x = input_for(layer)
    first = layer(x).detach()
    layer.merge_()
    randomize_adapters_(layer, seed=9)
    expected = layer(x).detach()
    assert not torch.allclose(expected, first)
    layer.merge_()
    torch.testing.assert_close(layer(x).detach(), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("where", ["pointwise", "depthwise", "bias_delta"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_merge_non_finite_raises_and_changes_nothing(where, bad):
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 4, 3))
    with torch.no_grad():
        getattr(layer, where).view(-1)[1] = bad
    snap = snapshot(layer)
    with pytest.raises(ValueError):
        layer.merge_()
    assert_snapshot_equal(layer, snap)


def test_merge_overflowing_delta_raises_and_changes_nothing():
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 4, 3))
    with torch.no_grad():
        layer.pointwise.fill_(3e38)
        layer.depthwise[1, 1, 1] = 3e38
    snap = snapshot(layer)
    with pytest.raises(ValueError):
        layer.merge_()
    assert_snapshot_equal(layer, snap)


def test_merge_overflowing_bias_raises_and_changes_nothing():
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 4, 3, dtype=torch.float16))
    with torch.no_grad():
        layer.bias[2] = 6e4
        layer.bias_delta[2] = 6e4  # each finite in fp16, their sum is not
    snap = snapshot(layer)
    with pytest.raises(ValueError, match="overflows"):
        layer.merge_()
    assert_snapshot_equal(layer, snap)


def test_merge_non_finite_bias_delta_into_bias_free_conv_changes_nothing():
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 4, 3, bias=False, train_bias=True))
    with torch.no_grad():
        layer.bias_delta[0] = float("nan")
    snap = snapshot(layer)
    with pytest.raises(ValueError):
        layer.merge_()
    assert_snapshot_equal(layer, snap)
    assert "bias" not in dict(layer.named_parameters())


@pytest.mark.parametrize("order", ORDERS)
def test_reset_adapter(order):
    layer = randomize_adapters_(cf.CoLoRAConv2d(4, 6, 3, padding=1, order=order, dtype=torch.float64))
    weight, bias, kp = layer.weight.detach().clone(), layer.bias.detach().clone(), layer.pointwise.detach().clone()
    assert layer.reset_adapter_() is layer
    assert torch.count_nonzero(layer.depthwise) == 0 and torch.count_nonzero(layer.bias_delta) == 0
    assert not torch.equal(layer.pointwise, kp)
    assert layer.pointwise.abs().max() <= glorot_bound(layer)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)
    x = input_for(layer)
    assert torch.equal(layer(x), plain_conv_like(layer, weight, bias)(x))


# --- to_conv ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dim, args, kwargs", CONSTRUCTOR_CASES)
def test_to_conv(dim, args, kwargs, order):
    layer = randomize_adapters_(LAYERS[dim](*args, **kwargs, order=order, dtype=torch.float64))
    x = input_for(layer)
    expected = layer(x).detach()
    snap = snapshot(layer)
    conv = layer.to_conv()
    assert type(conv) is CONVS[dim]
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "_reversed_padding_repeated_twice"):
        assert getattr(conv, attr) == getattr(layer, attr), attr
    torch.testing.assert_close(conv.weight.detach(), snap["weight"] + layer.delta_weight().detach(),
                               atol=1e-14, rtol=0)
    torch.testing.assert_close(conv(x).detach(), expected, atol=1e-12, rtol=1e-10)
    assert_snapshot_equal(layer, snap)
    assert conv.weight.data_ptr() != layer.weight.data_ptr()
    assert set(conv.state_dict()) <= {"weight", "bias"}


def test_to_conv_of_bias_free_conv_with_bias_delta():
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 5, 3, bias=False, train_bias=True, dtype=torch.float64))
    x = input_for(layer)
    conv = layer.to_conv()
    assert type(conv) is nn.Conv2d and conv.bias is not None
    torch.testing.assert_close(conv(x).detach(), layer(x).detach(), atol=1e-12, rtol=1e-10)


# --- repr, errors, backend selection ---------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
def test_extra_repr(order):
    layer = cf.CoLoRAConv2d(6, 8, 3, groups=2, order=order, backend="torch")
    text = repr(layer)
    adapter = 8 * 3 + (8 if order == "pointwise_first" else 6) * 9 + 8
    assert order in text and "torch" in text and str(adapter) in text
    assert "kernel_size=(3, 3)" in text and "groups=2" in text


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_wrong_input_channels_raise(dim, backend):
    layer = LAYERS[dim](4, 6, 3, backend=backend)
    x = torch.randn((2, 3) + (7,) * dim)
    with pytest.raises(RuntimeError):
        layer(x)
    # A single input channel must not broadcast either.
    with pytest.raises(RuntimeError):
        layer(torch.randn((2, 1) + (7,) * dim))


def _ran_reference(out: torch.Tensor) -> bool:
    """The reference backend ends in an autograd `add` (base + residual); the torch backend in the op."""
    return type(out.grad_fn).__name__.startswith("AddBackward")


@pytest.mark.parametrize("env, layer_backend, expect_reference", [
    (None, "auto", False), ("reference", "auto", True), ("torch", "auto", False),
    ("reference", "torch", False), (None, "reference", True)])
def test_colora_backend_env_overrides_auto(monkeypatch, env, layer_backend, expect_reference):
    if env is None:
        monkeypatch.delenv("COLORA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("COLORA_BACKEND", env)
    layer = randomize_adapters_(cf.CoLoRAConv2d(3, 4, 3, backend=layer_backend, dtype=torch.float64))
    out = layer(input_for(layer))
    assert _ran_reference(out) == expect_reference, type(out.grad_fn).__name__


def test_colora_backend_env_unknown_raises(monkeypatch):
    monkeypatch.setenv("COLORA_BACKEND", "nonsense")
    layer = cf.CoLoRAConv2d(3, 4, 3)
    with pytest.raises(ValueError, match="nonsense"):
        layer(input_for(layer, dtype=torch.float32))
