"""End-to-end checks on a CUDA GPU (skipped elsewhere): layers through every backend, merge, compile, autocast.

The kernels' own CUDA tests live beside their interpreter tests; this file checks that the layers, the op and
the dispatch use them correctly on a real device.
"""
import pytest
import torch
import torchvision
from torch import nn

import colora_fused as cf
from colora_fused import backends, functional

from cases import CASE_PARAMS, ORDERS, TOLERANCE, TOLERANCE_TF32, assert_close, make_tensors, reference_output

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def _tol(dtype):
    return TOLERANCE_TF32 if dtype == torch.float32 else TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_functional_matches_reference_on_cuda(case, order, dtype, backend):
    t = make_tensors(case, order, dtype, device="cuda")
    t = {k: (None if v is None else v.requires_grad_(True)) for k, v in t.items()}
    out = cf.colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                         order=order, backend=backend, **case.conv_kwargs())
    grad = torch.randn_like(out)
    expected, grads = reference_output(case, order, t, grad)
    out.backward(grad)
    assert_close(out, expected, dtype, "out", _tol(dtype))
    for name in ("x", "pointwise", "depthwise", "bias_delta"):
        if t[name] is not None:
            assert t[name].grad.dtype == t[name].dtype
            assert_close(t[name].grad, grads[name], dtype, name, _tol(dtype))


@pytest.mark.parametrize("order", ORDERS)
def test_merge_on_cuda_keeps_the_output(order):
    layer = cf.CoLoRAConv2d(6, 10, 3, padding=1, order=order, train_bias=True, device="cuda")
    with torch.no_grad():
        layer.depthwise.normal_()
        layer.bias_delta.normal_()
    x = torch.randn(2, 6, 9, 9, device="cuda")
    before = layer(x)
    expected_weight = layer.weight + layer.delta_weight()
    layer.merge_()
    torch.testing.assert_close(layer.weight, expected_weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), before, atol=1e-3, rtol=1e-3)
    assert layer.depthwise.abs().sum() == 0


def test_auto_on_cuda_takes_a_measured_backend():
    cf.clear_caches()
    layer = cf.CoLoRAConv2d(16, 32, 3, padding=1, device="cuda")
    layer(torch.randn(4, 16, 12, 12, device="cuda", requires_grad=True)).sum().backward()
    assert set(functional._FASTEST.values()) <= set(backends.AUTO_CANDIDATES) and functional._FASTEST


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resnet_step_bf16_channels_last(backend):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).cuda().to(memory_format=torch.channels_last)
    reference = torchvision.models.resnet18(weights=None, num_classes=10).cuda().to(memory_format=torch.channels_last)
    reference.load_state_dict(model.state_dict())
    cf.apply_colora(model, backend=backend)
    cf.apply_colora(reference, backend="reference")
    for (_, a), (_, b) in zip(cf.colora_layers(model), cf.colora_layers(reference)):
        with torch.no_grad():
            a.depthwise.normal_(std=0.1)
            b.pointwise.copy_(a.pointwise)
            b.depthwise.copy_(a.depthwise)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    outs = []
    for m in (model, reference):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y.float())
    torch.testing.assert_close(outs[0], outs[1], atol=5e-2, rtol=5e-2)
    for (_, a), (_, b) in zip(cf.colora_layers(model), cf.colora_layers(reference)):
        scale = b.depthwise.grad.abs().max().clamp_min(1e-6)
        assert ((a.depthwise.grad - b.depthwise.grad).abs().max() / scale) < 0.1


def test_compile_with_triton_backend():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).cuda()
    cf.apply_colora(model, backend="triton")
    for _, layer in cf.colora_layers(model):
        with torch.no_grad():
            layer.depthwise.normal_()
    x = torch.randn(2, 8, 16, 16, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-2, rtol=1e-2)
