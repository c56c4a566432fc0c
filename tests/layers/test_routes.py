"""The two routes to the adapter gradients (design §5): which one a layer takes, and that both are right."""
import pytest
import torch

import colora_fused as cf
from colora_fused._conv import adapter_grad_route

from cases import CASE_PARAMS, ORDERS, TOLERANCE_TF32, assert_close, make_tensors, reference_output

ROUTES = ("cheap", "gradw")


@pytest.mark.parametrize("x_shape, weight_shape, out_shape, order, expected", [
    pytest.param((64, 64, 56, 56), (64, 64, 3, 3), (64, 64, 56, 56), "pointwise_first", "cheap", id="resnet-3x3"),
    pytest.param((64, 512, 16, 16), (512, 512, 3, 3), (64, 512, 14, 14), "depthwise_first", "cheap", id="vgg-3x3"),
    pytest.param((64, 256, 56, 56), (64, 256, 1, 1), (64, 64, 56, 56), "pointwise_first", "gradw", id="1x1"),
    pytest.param((64, 64, 56, 56), (64, 64, 1, 2), (64, 64, 56, 55), "pointwise_first", "gradw", id="1x2"),
    pytest.param((64, 3, 230, 230), (64, 3, 7, 7), (64, 64, 112, 112), "pointwise_first", "gradw",
                 id="stem-7x7-3ch"),
    pytest.param((64, 96, 58, 58), (96, 1, 3, 3), (64, 96, 56, 56), "pointwise_first", "gradw", id="depthwise-base"),
])
def test_route_follows_the_cost_model(x_shape, weight_shape, out_shape, order, expected):
    assert adapter_grad_route(x_shape, weight_shape, out_shape, order) == expected


def test_route_override_and_its_errors(monkeypatch):
    shapes = ((8, 64, 16, 16), (64, 64, 1, 1), (8, 64, 16, 16), "pointwise_first")
    monkeypatch.setenv("COLORA_GRAD_ROUTE", "cheap")
    assert adapter_grad_route(*shapes) == "cheap"
    monkeypatch.setenv("COLORA_GRAD_ROUTE", "fast")
    with pytest.raises(ValueError, match="COLORA_GRAD_ROUTE"):
        adapter_grad_route(*shapes)


def _gradients(case, order, dtype, backend, device="cpu"):
    t = make_tensors(case, order, dtype, device=device)
    t = {k: (None if v is None else v.requires_grad_(k not in ("weight", "bias"))) for k, v in t.items()}
    out = cf.colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                         order=order, backend=backend, **case.conv_kwargs())
    grad = torch.randn_like(out)
    _, expected = reference_output(case, order, t, grad)
    out.backward(grad)
    return t, expected


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_torch_backend_both_routes(monkeypatch, case, order, route):
    monkeypatch.setenv("COLORA_GRAD_ROUTE", route)
    t, expected = _gradients(case, order, torch.float64, "torch")
    for name in ("x", "pointwise", "depthwise", "bias_delta"):
        if t[name] is not None:
            assert_close(t[name].grad, expected[name], torch.float64, f"{route} {name}")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", [c for c in CASE_PARAMS if c.id in ("2d-k3-stride2", "2d-groups3", "1d-k3-stride2",
                                                                      "3d-k3-groups2", "2d-1x1-nobias")])
def test_triton_backend_both_routes(monkeypatch, case, order, route):
    pytest.importorskip("triton")
    monkeypatch.setenv("COLORA_GRAD_ROUTE", route)
    cuda = torch.cuda.is_available()
    t, expected = _gradients(case, order, torch.float32, "triton", "cuda" if cuda else "cpu")
    for name in ("x", "pointwise", "depthwise", "bias_delta"):
        if t[name] is not None:
            assert_close(t[name].grad, expected[name], torch.float32, f"{route} {name}",
                         TOLERANCE_TF32 if cuda else None)
