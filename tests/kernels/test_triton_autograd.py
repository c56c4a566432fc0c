"""Training through backend="triton": the registered op wires the fused forward and backward kernels together.

The kernels' own tests check each launcher; these check what a user runs — the layer and the op with autograd,
opcheck and torch.compile — against the float64 reference, under the interpreter on CPU or on a GPU.
"""
import pytest
import torch
from torch import nn

import colora_fused as cf

from cases import CASE_PARAMS, ORDERS, TOLERANCE, TOLERANCE_TF32, assert_training_matches_reference

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = TOLERANCE_TF32 if DEVICE == "cuda" else TOLERANCE[torch.float32]


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_training_through_triton_matches_reference(case, order, backend):
    """Both Triton paths: the fused kernels, and hybrid (library convs on the merged weight, adapter gradients by
    the one-pass kernel)."""
    assert_training_matches_reference(case, order, backend, device=DEVICE, tol=TOL)


@pytest.mark.parametrize("order", ORDERS)
def test_opcheck_triton_backend(order):
    g = torch.Generator().manual_seed(0)
    kd_channels = 5 if order == "pointwise_first" else 3
    args = (torch.randn(2, 3, 6, 7, generator=g).requires_grad_(), torch.randn(5, 3, 3, 3, generator=g),
            torch.randn(5, generator=g), torch.randn(5, 3, generator=g).requires_grad_(),
            torch.randn(kd_channels, 3, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_(),
            [2, 1], [1, 1], [1, 1], 1, order, "triton")
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.colora_fused.conv.default, args)


@pytest.mark.parametrize("backend", ["triton", "hybrid"])
def test_compiled_model_on_triton_backend_matches_eager(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1)).to(DEVICE)
    cf.apply_colora(model, backend=backend)
    for _, layer in cf.colora_layers(model):
        with torch.no_grad():
            layer.depthwise.normal_()
    x = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    eager = model(x)
    (gx_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(model, fullgraph=True)(x)
    (gx_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx_compiled, gx_eager, atol=1e-4, rtol=1e-4)


def test_triton_backend_under_autocast_runs_in_the_autocast_dtype():
    """Layers after the first get a half-precision x and fp32 weights: autocast must cast before dispatch."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 dot is broken
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(DEVICE)
    cf.apply_colora(model, backend="triton")
    reference = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).to(DEVICE)
    reference.load_state_dict(model.state_dict(), strict=False)
    cf.apply_colora(reference, backend="reference")
    for (_, a), (_, b) in zip(cf.colora_layers(model), cf.colora_layers(reference)):
        with torch.no_grad():
            a.depthwise.normal_()
            b.pointwise.copy_(a.pointwise)
            b.depthwise.copy_(a.depthwise)
    x = torch.randn(2, 3, 9, 9, device=DEVICE)
    outs = []
    for m in (model, reference):
        with torch.autocast(DEVICE, dtype=dtype):
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y)
    assert outs[0].dtype == dtype
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=3e-2, rtol=3e-2)
    for (_, a), (_, b) in zip(cf.colora_layers(model), cf.colora_layers(reference)):
        assert a.depthwise.grad.dtype == torch.float32
        torch.testing.assert_close(a.depthwise.grad, b.depthwise.grad, atol=5e-2, rtol=5e-2)
