"""Hostile and unusual inputs to `colora_conv` (issue 15, item 5).

Adapter tensors of the wrong dtype, device, layout or shape are refused with a clear error (F.conv2d would
refuse most of them too; before, they were promoted or moved silently). Non-contiguous tensors and zero-size
batches work as in F.conv2d, on every backend.
"""
import pytest
import torch
import torch.nn.functional as F

import colora_fused as cf
from cases import Case, assert_close, make_tensors, reference_output

CASE = Case("2d-groups2", 2, 4, 6, (6, 7), (3, 3), padding=1, groups=2)
BACKENDS = ["auto", "torch", "triton", "reference"]


def _call(t, backend="torch", order="pointwise_first", case=CASE):
    return cf.colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                          order=order, backend=backend, **case.conv_kwargs())


def _skip_without_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["weight", "bias", "pointwise", "depthwise", "bias_delta"])
def test_other_dtype_is_refused(name, backend):
    t = make_tensors(CASE, "pointwise_first", torch.float64)
    snapshot = {k: v.clone() for k, v in t.items()}
    t[name] = t[name].float()
    with pytest.raises(TypeError, match=rf"{name} has dtype torch.float32 but x has torch.float64"):
        _call(t, backend)
    assert all(torch.equal(t[k], snapshot[k]) for k in t if k != name), "a refused call changed its inputs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["pointwise", "depthwise", "bias_delta", "weight"])
def test_other_device_is_refused(name, backend):
    t = make_tensors(CASE, "pointwise_first", torch.float32)
    t[name] = t[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu"):
        _call(t, backend)


def test_sparse_adapter_is_refused():
    t = make_tensors(CASE, "pointwise_first", torch.float32)
    t["pointwise"] = t["pointwise"].to_sparse()
    with pytest.raises(TypeError, match="pointwise has layout torch.sparse_coo"):
        _call(t)


@pytest.mark.parametrize("name, shape", [("pointwise", (6, 4)), ("depthwise", (4, 3, 3)), ("depthwise", (6, 3, 2)),
                                         ("bias_delta", (1,)), ("bias", (5,))])
def test_wrong_adapter_shape_is_refused(name, shape):
    """A [1] Δb or a Kd of C_in rows would broadcast or index silently; they are refused by name."""
    t = make_tensors(CASE, "pointwise_first", torch.float32)
    t[name] = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"{name} has shape"):
        _call(t)


def test_autocast_casts_instead_of_refusing():
    """Under autocast, fp32 adapters with a bf16 input are what autocast expects (it casts them), not a mismatch."""
    t = make_tensors(CASE, "pointwise_first", torch.float32)
    t["x"] = t["x"].bfloat16()
    with pytest.raises(TypeError, match="x has torch.bfloat16"):
        _call(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(t)
    assert out.dtype == torch.bfloat16
    expected, _ = reference_output(CASE, "pointwise_first", t)
    assert_close(out.float(), expected, torch.bfloat16, "autocast out")


def _non_contiguous(t):
    """Every tensor a strided view: x every other column of a wider tensor and transposed twice over H/W,
    Kp a transposed view, Kd a slice."""
    n, c, h, w = t["x"].shape
    wide = torch.zeros(n, c, w, 2 * h, dtype=t["x"].dtype)
    wide[..., ::2] = t["x"].transpose(2, 3)
    x = wide[..., ::2].transpose(2, 3)
    kp = t["pointwise"].t().contiguous().t()
    kd = torch.cat([t["depthwise"], t["depthwise"]], dim=2)[..., :t["depthwise"].shape[2]]
    assert not (x.is_contiguous() or kp.is_contiguous() or kd.is_contiguous())
    return {**t, "x": x, "pointwise": kp, "depthwise": kd}


@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_non_contiguous_inputs(backend, order):
    _skip_without_triton(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    base = make_tensors(CASE, order, dtype)
    t = _non_contiguous(base)
    t = {k: (v.to(device).requires_grad_(k in ("x", "pointwise", "depthwise")) if v is not None else None)
         for k, v in t.items()}
    out = _call(t, backend, order)
    grad = torch.randn_like(out)
    expected, grads = reference_output(CASE, order, base, grad)
    out.backward(grad)
    tol = (2e-3, 1e-2) if device == "cuda" else None
    assert_close(out, expected, dtype, "out", tol)
    for k in ("x", "pointwise", "depthwise"):
        assert_close(t[k].grad, grads[k], dtype, f"grad {k}", tol)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_zero_size_batch(backend, dim):
    """As F.conv: an empty output of the right shape, an empty input gradient and zero adapter gradients."""
    _skip_without_triton(backend)
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    layer = {1: cf.CoLoRAConv1d, 2: cf.CoLoRAConv2d, 3: cf.CoLoRAConv3d}[dim](4, 6, 3, padding=1, groups=2,
                                                                              backend=backend, device=device)
    x = torch.randn(0, 4, *(5,) * dim, device=device, requires_grad=True)
    out = layer(x)
    expected = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dim](x, layer.weight, layer.bias, padding=1, groups=2)
    assert out.shape == expected.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.adapter_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
