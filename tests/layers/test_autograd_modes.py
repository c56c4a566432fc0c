"""Every autograd mode through `colora_conv` against the reference backend (issue 15, item 1).

Second order by `gradgradcheck` in float64 on the torch backend (the op's backward under create_graph=True);
torch.func vjp, jvp, vmap and a Hessian-vector product, and forward-mode AD with dual tensors, compared with the
same call on backend="reference" (plain autograd through the literal eq. 16-19). The triton backend's second
order runs under the interpreter in float32 at a tiny shape.
"""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jvp, vjp, vmap

import colora_fused as cf
from cases import Case, TOLERANCE, assert_close, make_tensors

ADAPTERS = ("pointwise", "depthwise", "bias_delta")

# Tiny shapes: gradgradcheck differentiates the backward numerically, once per input element.
GG_CASES = [
    pytest.param(Case("2d-k3-pad1", 2, 2, 3, (4, 5), (3, 3), padding=1, batch=1), "pointwise_first", True,
                 id="2d-k3-pw-bias"),
    pytest.param(Case("2d-stride2-groups2", 2, 4, 4, (5, 4), (3, 3), stride=2, padding=1, groups=2, bias=False,
                      batch=1), "depthwise_first", False, id="2d-stride2-groups2-dw-nobias"),
    pytest.param(Case("2d-dilation2", 2, 2, 2, (6, 5), (3, 3), padding=2, dilation=2, batch=1), "depthwise_first",
                 True, id="2d-dilation2-dw-bias"),
    pytest.param(Case("2d-1x1-gradw", 2, 3, 2, (3, 3), (1, 1), batch=2), "pointwise_first", True,
                 id="2d-1x1-pw-bias"),
    pytest.param(Case("1d-reflect", 1, 2, 3, (7,), (3,), padding=2, dilation=2, padding_mode="reflect", batch=1),
                 "depthwise_first", True, id="1d-reflect-dilation2-dw-bias"),
    pytest.param(Case("3d-k2-stride2", 3, 2, 2, (3, 4, 3), (2, 2, 2), stride=2, bias=False, batch=1),
                 "pointwise_first", False, id="3d-k2-stride2-pw-nobias"),
]


def _inputs(case, order, with_bias_delta, dtype=torch.float64, device="cpu"):
    t = make_tensors(case, order, dtype, device=device)
    if not with_bias_delta:
        t["bias_delta"] = None
    return t


def _fn(case, order, t, backend, names):
    """f(*tensors named by `names`) = colora_conv with the other tensors of `t` fixed."""
    def f(*values):
        a = {**t, **dict(zip(names, values))}
        return cf.colora_conv(a["x"], a["weight"], a["bias"], a["pointwise"], a["depthwise"], a["bias_delta"],
                              order=order, backend=backend, **case.conv_kwargs())
    return f


def _names(t, with_weight=False):
    return ["x", *(["weight"] if with_weight else []), *(k for k in ADAPTERS if t[k] is not None)]


@pytest.mark.parametrize("case, order, with_bias_delta", GG_CASES)
def test_gradgradcheck_torch_backend(case, order, with_bias_delta):
    t = _inputs(case, order, with_bias_delta)
    names = _names(t, with_weight=case.id == "2d-k3-pad1")  # once with an unfrozen base weight
    inputs = tuple(t[k].requires_grad_(True) for k in names)
    assert torch.autograd.gradgradcheck(_fn(case, order, t, "torch", names), inputs, eps=1e-6, atol=1e-6,
                                        rtol=1e-4)


def _assert_all_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, torch.float64, f"{what}[{i}]")


CASE, ORDER = GG_CASES[1].values[0], "depthwise_first"
CASE_PW = GG_CASES[0].values[0]


@pytest.mark.parametrize("case, order", [(CASE_PW, "pointwise_first"), (CASE, ORDER)], ids=["pw", "dw-groups"])
def test_func_vjp_jvp_match_reference(case, order):
    t = _inputs(case, order, True)
    names = _names(t)
    primals = tuple(t[k] for k in names)
    g = torch.Generator().manual_seed(7)
    tangents = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in primals)
    results = {}
    for backend in ("torch", "reference"):
        f = _fn(case, order, t, backend, names)
        out, pullback = vjp(f, *primals)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(8), dtype=out.dtype)
        _, tangent_out = jvp(f, primals, tangents)
        results[backend] = (out, pullback(cotangent), tangent_out)
    (out, cots, tan), (ref_out, ref_cots, ref_tan) = results["torch"], results["reference"]
    assert_close(out, ref_out, torch.float64, "out")
    _assert_all_close(cots, ref_cots, "vjp")
    assert tan.abs().max() > 0  # a zero tangent was the bug
    assert_close(tan, ref_tan, torch.float64, "jvp")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_hessian_vector_products_agree(backend):
    """Forward-over-reverse (torch.func) and reverse-over-reverse (create_graph) HVPs of a non-quadratic loss."""
    t = _inputs(CASE_PW, "pointwise_first", True)
    names = _names(t)
    primals = tuple(t[k] for k in names)
    g = torch.Generator().manual_seed(9)
    vs = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in primals)

    def loss(*values):
        return torch.tanh(_fn(CASE_PW, "pointwise_first", t, backend, names)(*values)).square().sum()

    _, hvp_fwd = jvp(grad(loss, argnums=tuple(range(len(primals)))), primals, vs)
    _, hvp_rev = torch.autograd.functional.hvp(loss, primals, vs)
    _assert_all_close(hvp_fwd, hvp_rev, f"{backend} hvp forward-over-reverse vs reverse-over-reverse")
    if backend == "torch":
        expected = torch.autograd.functional.hvp(
            lambda *v: torch.tanh(_fn(CASE_PW, "pointwise_first", t, "reference", names)(*v)).square().sum(),
            primals, vs)[1]
        _assert_all_close(hvp_rev, expected, "hvp vs reference")


def test_forward_ad_dual_tensors_match_reference():
    t = _inputs(CASE, ORDER, True)
    g = torch.Generator().manual_seed(3)
    tangents = {k: torch.randn(t[k].shape, generator=g, dtype=t[k].dtype) for k in ("x", "pointwise", "depthwise")}
    tangent_out = {}
    for backend in ("torch", "reference"):
        with fwAD.dual_level():
            duals = {**t, **{k: fwAD.make_dual(t[k], v) for k, v in tangents.items()}}
            out = _fn(CASE, ORDER, duals, backend, [])()
            tangent_out[backend] = fwAD.unpack_dual(out).tangent
    assert tangent_out["torch"] is not None and tangent_out["torch"].abs().max() > 0
    assert_close(tangent_out["torch"], tangent_out["reference"], torch.float64, "forward-AD tangent")


def test_vmap_per_sample_adapter_gradients():
    """Per-sample gradients (vmap over grad), as differential-privacy training computes them."""
    t = _inputs(CASE_PW, "pointwise_first", True)
    t["x"] = torch.randn(3, CASE_PW.c_in, *CASE_PW.size, dtype=torch.float64)

    def per_sample(backend):
        def loss(kp, kd, x):
            a = {**t, "pointwise": kp, "depthwise": kd, "x": x.unsqueeze(0)}
            return _fn(CASE_PW, "pointwise_first", a, backend, [])().square().sum()
        return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0))(t["pointwise"], t["depthwise"], t["x"])

    _assert_all_close(per_sample("torch"), per_sample("reference"), "per-sample grads")


def test_gradient_penalty_through_a_layer():
    """WGAN-GP/R1 style: the gradient of ‖∂out/∂x‖² with respect to the adapters, against the reference."""
    grads = {}
    for backend in ("torch", "reference"):
        torch.manual_seed(0)
        layer = cf.CoLoRAConv2d(3, 4, 3, padding=1, backend=backend, dtype=torch.float64)
        with torch.no_grad():
            layer.depthwise.normal_()
        x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
        (gx,) = torch.autograd.grad(torch.sin(layer(x)).sum(), x, create_graph=True)
        gx.square().sum().backward()
        grads[backend] = [p.grad for p in layer.adapter_parameters()]
    assert all(g is not None and g.abs().max() > 0 for g in grads["torch"])
    _assert_all_close(grads["torch"], grads["reference"], "gradient-penalty grads")


@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
def test_triton_second_order_in_the_interpreter(order):
    """gradgradcheck-style in float32 (triton refuses float64): the gradient of a gradient penalty, triton vs
    the float64 reference."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = Case("tiny", 2, 2, 3, (4, 4), (3, 3), padding=1, batch=1)
    results = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        t = _inputs(case, order, True, dtype, device)
        names = _names(t)
        for k in names:
            t[k].requires_grad_(True)
        out = _fn(case, order, t, backend, [])()
        first = torch.autograd.grad(torch.sin(out).sum(), [t[k] for k in names], create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        results[backend] = torch.autograd.grad(penalty, [t[k] for k in names])
    tol = (1e-3, 1e-2) if device == "cuda" else TOLERANCE[torch.float32]
    for i, (a, e) in enumerate(zip(results["triton"], results["reference"])):
        assert_close(a, e, torch.float32, f"second-order grad [{i}]", tol)


def test_chosen_backend_names_the_path():
    layer = cf.CoLoRAConv2d(3, 4, 3, padding=1, backend="torch")
    x = torch.randn(1, 3, 5, 5)
    seen = []

    def f(inp):
        seen.append(layer.chosen_backend(inp))
        return layer(inp).sum()

    grad(f)(x)
    assert seen == ["composite"]
    assert layer.chosen_backend(x) == "torch"
    layer.backend = "reference"
    assert layer.chosen_backend(x) == "reference"


def test_the_raw_op_refuses_forward_ad():
    """Only a direct call of the registered op can meet a dual tensor; it raises instead of a zero tangent."""
    t = _inputs(CASE_PW, "pointwise_first", True)
    with fwAD.dual_level():
        x = fwAD.make_dual(t["x"], torch.ones_like(t["x"]))
        with pytest.raises(RuntimeError, match="no forward-mode AD rule"):
            torch.ops.colora_fused.conv(x, t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                                        [1, 1], [1, 1], [1, 1], 1, "pointwise_first", "torch")
