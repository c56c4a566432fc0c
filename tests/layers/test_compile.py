"""torch.compile, torch.library.opcheck and autocast through the registered CoLoRA ops (CPU path, design §7)."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import colora_fused as cf
from cases import ORDERS, assert_close

OP_NAMES = ("conv", "conv_backward")


def small_cnn(dtype=torch.float32) -> nn.Module:
    """Three wrapped convs: pointwise_first 3×3, depthwise_first strided grouped reflect, 1×1 (gradW route)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 10, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(10, 6, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).to(dtype)
    cf.apply_colora(model, include=["0", "4"], train_bias=True, backend="torch")
    cf.apply_colora(model, include=["2"], order="depthwise_first", backend="torch")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("pointwise", "depthwise", "bias_delta")):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 11, 10, generator=g, dtype=torch.float64).to(dtype)


def trainable_grads(model, x, forward=None):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = (forward or model)(x)
    out.square().sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad
    return out.detach(), grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_ops_are_registered():
    for name in OP_NAMES:
        assert hasattr(torch.ops.colora_fused, name), f"torch.ops.colora_fused.{name} is not registered"


def test_no_graph_breaks():
    model = small_cnn()
    explanation = torch._dynamo.explain(model)(inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_model_matches_eager(backend):
    model = small_cnn()
    x = inputs()
    eager_out, eager_grads = trainable_grads(model, x)
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    out, grads = trainable_grads(model, x, forward=compiled)
    assert_close(out, eager_out, torch.float32, "out")
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        assert_close(grad, eager_grads[name], torch.float32, f"grad {name}")
    assert all(not p.requires_grad or p.grad is not None for p in model.parameters())


def _sample(order, dtype, bias=True, channels_last=False, dim=2, groups=1):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    c_in, c_out, k = 4, 6, 3
    size = (7, 6, 5)[:dim]
    x = rnd(2, c_in, *size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = rnd(c_out, c_in // groups, *(k,) * dim)
    pointwise = rnd(c_out, c_in // groups)
    depthwise = rnd(c_out if order == "pointwise_first" else c_in, *(k,) * dim)
    b = rnd(c_out) if bias else None
    db = rnd(c_out) if bias else None
    return x, weight, b, pointwise, depthwise, db


OPCHECK_PARAMS = [
    pytest.param(order, dtype, bias, channels_last, dim, groups,
                 id=f"{order}-{str(dtype)[6:]}-{'bias' if bias else 'nobias'}{'-cl' if channels_last else ''}"
                    f"-{dim}d-g{groups}")
    for order in ORDERS
    for dtype, bias, channels_last, dim, groups in [
        (torch.float32, True, False, 2, 1), (torch.float64, False, False, 2, 2),
        (torch.float32, True, True, 2, 2), (torch.float64, True, False, 1, 1), (torch.float32, False, False, 3, 1)]
]


@pytest.mark.parametrize("order, dtype, bias, channels_last, dim, groups", OPCHECK_PARAMS)
def test_opcheck_conv(order, dtype, bias, channels_last, dim, groups):
    x, weight, b, kp, kd, db = _sample(order, dtype, bias, channels_last, dim, groups)
    for t in (x, kp, kd, db):
        if t is not None:
            t.requires_grad_(True)
    args = (x, weight, b, kp, kd, db, [2] + [1] * (dim - 1), [1] * dim, [1] * dim, groups, order, "torch")
    torch.library.opcheck(torch.ops.colora_fused.conv.default, args)


@pytest.mark.parametrize("need_x, need_weight, need_adapters",
                         [(True, False, True), (False, False, True), (True, True, True), (True, False, False)],
                         ids=["dx", "adapters-only", "dx-dweight", "dx-only"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kernel", [3, 1], ids=["k3", "k1-gradw-route"])
def test_opcheck_conv_backward(kernel, dtype, order, need_x, need_weight, need_adapters):
    g = torch.Generator().manual_seed(1)
    c_in, c_out, groups = 4, 6, 2
    x = torch.randn(2, c_in, 7, 6, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, generator=g, dtype=dtype)
    kp = torch.randn(c_out, c_in // groups, generator=g, dtype=dtype)
    kd = torch.randn(c_out if order == "pointwise_first" else c_in, kernel, kernel, generator=g, dtype=dtype)
    pad = kernel // 2
    grad = torch.randn(2, c_out, 7, 6, generator=g, dtype=dtype)
    args = (grad, x, weight, kp, kd, [1, 1], [pad, pad], [1, 1], groups, order, "torch", need_x, need_weight,
            need_adapters)
    torch.library.opcheck(torch.ops.colora_fused.conv_backward.default, args)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_bf16(backend):
    model = small_cnn()
    for module in model.modules():
        if isinstance(module, cf.CoLoRAConv2d):
            module.backend = backend
    x = inputs()
    ref_out, ref_grads = trainable_grads(model, x)
    xg = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model[0](xg)
        assert out.dtype == torch.bfloat16
        out = model(xg)
    out.float().square().sum().backward()
    assert xg.grad.dtype == torch.float32
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32, name
            scale = ref_grads[name].abs().max().item()
            torch.testing.assert_close(p.grad, ref_grads[name], atol=0.05 * scale, rtol=0.1,
                                       msg=lambda m, name=name: f"grad {name}: {m}")
    assert_close(out.float(), ref_out, torch.bfloat16, "out")
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("order", ORDERS)
def test_autocast_bf16_single_layer_dtype(order):
    layer = cf.CoLoRAConv2d(4, 6, 3, padding=1, order=order, backend="torch")
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    F.mse_loss(out.float(), torch.zeros(out.shape)).backward()
    assert layer.pointwise.grad.dtype == torch.float32 and layer.depthwise.grad.dtype == torch.float32
    assert layer.bias_delta.grad.dtype == torch.float32
    assert layer.weight.grad is None


@pytest.mark.parametrize("order", ORDERS)
def test_opcheck_with_a_prebuilt_merged_weight(order):
    """The ops' optional `merged` (a layer's cached K0 + ΔK): schema, fake, autograd and compile consistency."""
    from colora_fused import ops
    x, weight, b, kp, kd, db = _sample(order, torch.float32)
    merged = ops.merged_weight(weight, kp, kd, 1, order)
    for t in (x, kp, kd, db):
        t.requires_grad_(True)
    args = (x, weight, b, kp, kd, db, [1, 1], [1, 1], [1, 1], 1, order, "torch", merged)
    torch.library.opcheck(torch.ops.colora_fused.conv.default, args)
    grad = torch.randn(2, 6, 7, 6)
    torch.library.opcheck(torch.ops.colora_fused.conv_backward.default,
                          (grad, x.detach(), weight, kp.detach(), kd.detach(), [1, 1], [1, 1], [1, 1], 1, order,
                           "torch", True, False, True, merged))
