"""`functional.colora_conv` and the oracle it is checked against.

First the oracle itself: ΔK built by explicit loops from the design §1 table, merged into one plain convolution
after explicit padding, must equal `reference.colora_conv_reference` (outputs and gradients). Then the `torch`
and `reference` backends against the float64 oracle: outputs and every gradient over CASES × ORDERS.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import colora_fused as cf
from cases import CASE_PARAMS, ORDERS, Case, assert_close, make_tensors, reference_output
from colora_fused.reference import colora_conv_reference, delta_weight_reference

CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BACKENDS = ("torch", "reference")
ADAPTER_KEYS = ("pointwise", "depthwise", "bias_delta")
GRAD_KEYS = ("x",) + ADAPTER_KEYS
DTYPE_PARAMS = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]
LOW_DTYPE_PARAMS = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def loop_delta_weight(pointwise, depthwise, groups, order):
    """ΔK[o, c, *ij] element by element, straight from the design §1 table."""
    c_out, c_in_g = pointwise.shape
    kernel = tuple(depthwise.shape[1:])
    per_group = c_out // groups
    delta = torch.zeros(c_out, c_in_g, *kernel, dtype=torch.float64)
    for o, c in itertools.product(range(c_out), range(c_in_g)):
        kd_row = o if order == "pointwise_first" else (o // per_group) * c_in_g + c
        for ij in itertools.product(*(range(k) for k in kernel)):
            delta[(o, c) + ij] = pointwise[o, c].item() * depthwise[(kd_row,) + ij].item()
    return delta


def gathered_delta_weight(pointwise, depthwise, groups, order):
    """The same table as an index gather, differentiable, to check the oracle's gradients."""
    c_out, c_in_g = pointwise.shape
    ones = (1,) * (depthwise.dim() - 1)
    o = torch.arange(c_out).unsqueeze(1)
    c = torch.arange(c_in_g).unsqueeze(0)
    rows = o.expand(c_out, c_in_g) if order == "pointwise_first" else (o // (c_out // groups)) * c_in_g + c
    return pointwise.reshape(c_out, c_in_g, *ones) * depthwise[rows]


def explicit_padding(case: Case):
    """(before, after) per spatial dim, computed here from torch's documented rules, not from _conv."""
    dilation = (case.dilation,) * case.dim if isinstance(case.dilation, int) else case.dilation
    if case.padding == "valid":
        return [(0, 0)] * case.dim
    if case.padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, case.kernel)]
        return [(t // 2, t - t // 2) for t in totals]
    padding = (case.padding,) * case.dim if isinstance(case.padding, int) else case.padding
    return [(p, p) for p in padding]


def merged_conv(case: Case, x, weight, bias, delta, bias_delta):
    """One plain F.convNd with K0 + ΔK and b0 + Δb on an explicitly padded input."""
    pad_arg = [p for before_after in reversed(explicit_padding(case)) for p in before_after]
    mode = "constant" if case.padding_mode == "zeros" else case.padding_mode
    x = F.pad(x, pad_arg, mode=mode)
    if bias is not None and bias_delta is not None:
        bias = bias + bias_delta
    elif bias is None:
        bias = bias_delta
    return CONV_FNS[case.dim](x, weight + delta, bias, case.stride, 0, case.dilation, case.groups)


def grad_out_like(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)


def call(case: Case, order: str, backend: str, t):
    return cf.functional.colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"],
                                     t["bias_delta"], order=order, backend=backend, **case.conv_kwargs())


def with_grad(tensors, keys=GRAD_KEYS):
    return {k: (None if v is None else v.requires_grad_(k in keys)) for k, v in tensors.items()}


# --- the oracle -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_delta_weight_reference_matches_loop_formula(case, order):
    t = make_tensors(case, order, dtype=torch.float64)
    expected = loop_delta_weight(t["pointwise"], t["depthwise"], case.groups, order)
    actual = delta_weight_reference(t["pointwise"], t["depthwise"], case.groups, order)
    assert actual.shape == t["weight"].shape
    torch.testing.assert_close(actual, expected, atol=1e-14, rtol=0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_reference_equals_one_merged_conv(case, order):
    t = with_grad(make_tensors(case, order, dtype=torch.float64))
    delta = gathered_delta_weight(t["pointwise"], t["depthwise"], case.groups, order)
    torch.testing.assert_close(delta.detach(), loop_delta_weight(t["pointwise"], t["depthwise"], case.groups,
                                                                 order), atol=1e-14, rtol=0)
    expected = merged_conv(case, t["x"], t["weight"], t["bias"], delta, t["bias_delta"])
    actual = colora_conv_reference(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"],
                                   t["bias_delta"], order=order, **case.conv_kwargs())
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-10)

    # torch's own nn.ConvNd (its padding-mode and 'same' handling) agrees on the merged kernel too.
    module = CONV_MODULES[case.dim](case.c_in, case.c_out, case.kernel, bias=case.bias, dtype=torch.float64,
                                    **case.conv_kwargs())
    with torch.no_grad():
        module.weight.copy_(t["weight"] + delta)
        if case.bias:
            module.bias.copy_(t["bias"] + t["bias_delta"])
    torch.testing.assert_close(actual.detach(), module(t["x"].detach()), atol=1e-12, rtol=1e-10)

    grad_out = grad_out_like(actual)
    keys = [k for k in GRAD_KEYS if t[k] is not None]
    expected_grads = torch.autograd.grad(expected, [t[k] for k in keys], grad_out)
    actual_grads = torch.autograd.grad(actual, [t[k] for k in keys], grad_out)
    for key, a, e in zip(keys, actual_grads, expected_grads):
        torch.testing.assert_close(a, e, atol=1e-11, rtol=1e-9, msg=lambda m, key=key: f"grad {key}: {m}")


# --- the backends against the oracle ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_colora_conv_matches_reference(case, backend, order, dtype):
    t = with_grad(make_tensors(case, order, dtype=dtype))
    out = call(case, order, backend, t)
    assert out.dtype == dtype
    grad_out = grad_out_like(out)
    ref_out, ref_grads = reference_output(case, order, t, grad_out=grad_out)
    assert_close(out, ref_out, dtype, "out")
    out.backward(grad_out)
    for key in GRAD_KEYS:
        if t[key] is None:
            continue
        assert t[key].grad is not None, f"no gradient for {key}"
        assert t[key].grad.dtype == dtype, f"grad {key} has dtype {t[key].grad.dtype}"
        assert_close(t[key].grad, ref_grads[key], dtype, f"grad {key}")
    assert t["weight"].grad is None
    if t["bias"] is not None:
        assert t["bias"].grad is None


def _low_precision_supported(case: Case, dtype) -> bool:
    """Whether torch's own CPU ops (the reference) run this case in `dtype`."""
    t = make_tensors(case, "pointwise_first", dtype=dtype)
    try:
        colora_conv_reference(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                              **case.conv_kwargs())
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("dtype", LOW_DTYPE_PARAMS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_colora_conv_low_precision_forward(case, backend, order, dtype):
    if not _low_precision_supported(case, dtype):
        pytest.skip(f"torch's CPU convolution/padding does not support {dtype} for this case")
    t = make_tensors(case, order, dtype=dtype)
    with torch.no_grad():
        out = call(case, order, backend, t)
    assert out.dtype == dtype
    ref_out, _ = reference_output(case, order, t)
    assert_close(out, ref_out, dtype, "out")


_GC = {
    "k3": Case("k3", 2, 2, 3, (4, 5), (3, 3), padding=1, batch=1),
    "k3-stride2-groups2": Case("k3-stride2-groups2", 2, 4, 4, (5, 4), (3, 3), stride=2, padding=1, groups=2,
                               batch=1),
    "1x1-gradw-route": Case("1x1-gradw-route", 2, 3, 5, (4, 3), (1, 1), batch=1),
    "1x2-gradw-route-groups": Case("1x2-gradw-route-groups", 2, 4, 2, (3, 4), (1, 2), groups=2, bias=False,
                                   batch=1),
    "1d-reflect-dilation2": Case("1d-reflect-dilation2", 1, 3, 4, (9,), (3,), padding=2, dilation=2,
                                 padding_mode="reflect", batch=1),
    "3d-k2-stride2": Case("3d-k2-stride2", 3, 2, 3, (4, 3, 4), (2, 2, 2), stride=2, batch=1),
}
# (case, order, x requires grad): both orders where the route changes, the frozen-input path on both routes.
GRADCHECK_PARAMS = [
    pytest.param(_GC[name], order, input_grad, id=f"{name}-{order}-{'x-grad' if input_grad else 'x-frozen'}")
    for name, order, input_grad in [
        ("k3", "pointwise_first", True), ("k3", "depthwise_first", True), ("k3", "pointwise_first", False),
        ("k3-stride2-groups2", "pointwise_first", True), ("k3-stride2-groups2", "depthwise_first", True),
        ("1x1-gradw-route", "pointwise_first", True), ("1x1-gradw-route", "depthwise_first", True),
        ("1x1-gradw-route", "depthwise_first", False), ("1x2-gradw-route-groups", "depthwise_first", True),
        ("1d-reflect-dilation2", "pointwise_first", True), ("3d-k2-stride2", "depthwise_first", True)]
]


@pytest.mark.parametrize("case, order, input_grad", GRADCHECK_PARAMS)
def test_torch_backend_gradcheck(case, order, input_grad):
    t = make_tensors(case, order, dtype=torch.float64)
    t["x"].requires_grad_(input_grad)
    inputs = [t[k].requires_grad_(True) for k in ADAPTER_KEYS if t[k] is not None]
    adapter_keys = [k for k in ADAPTER_KEYS if t[k] is not None]

    def fn(x, *adapters):
        a = dict(zip(adapter_keys, adapters))
        return cf.functional.colora_conv(x, t["weight"], t["bias"], a["pointwise"], a["depthwise"],
                                         a.get("bias_delta"), order=order, backend="torch", **case.conv_kwargs())

    assert torch.autograd.gradcheck(fn, (t["x"], *inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


SUBSETS = [("x",), ("pointwise",), ("depthwise",), ("bias_delta",), ("pointwise", "depthwise"),
           ("x", "bias_delta")]
SUBSET_PARAMS = [pytest.param(case.values[0], subset, id=f"{case.id}-{'+'.join(subset)}")
                 for case in (CASE_PARAMS[1], CASE_PARAMS[5]) for subset in SUBSETS
                 if case.values[0].bias or "bias_delta" not in subset]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case, requires", SUBSET_PARAMS)
def test_only_requested_gradients(case, requires, order):
    t = with_grad(make_tensors(case, order, dtype=torch.float64), keys=requires)
    out = call(case, order, "torch", t)
    grad_out = grad_out_like(out)
    _, ref_grads = reference_output(case, order, t, grad_out=grad_out)
    out.backward(grad_out)
    for key, value in t.items():
        if value is None:
            continue
        if key in requires:
            assert_close(value.grad, ref_grads[key], torch.float64, f"grad {key}")
        else:
            assert value.grad is None, f"{key} does not require grad but got one"


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", [CASE_PARAMS[0], CASE_PARAMS[3], CASE_PARAMS[5], CASE_PARAMS[12]])
def test_unfrozen_base_gets_correct_gradients(case, order):
    """A user who unfreezes K0/b0 (full fine-tuning plus adapters) gets their true gradients."""
    t = with_grad(make_tensors(case, order, dtype=torch.float64), keys=GRAD_KEYS + ("weight", "bias"))
    out = call(case, order, "torch", t)
    grad_out = grad_out_like(out)
    _, ref_grads = reference_output(case, order, t, grad_out=grad_out)
    out.backward(grad_out)
    for key, value in t.items():
        if value is not None:
            assert_close(value.grad, ref_grads[key], torch.float64, f"grad {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_layer_input_without_grad(backend):
    case = CASE_PARAMS[0].values[0]
    t = with_grad(make_tensors(case, "pointwise_first", dtype=torch.float64), keys=ADAPTER_KEYS)
    assert not t["x"].requires_grad
    out = call(case, "pointwise_first", backend, t)
    assert out.requires_grad
    grad_out = grad_out_like(out)
    _, ref_grads = reference_output(case, "pointwise_first", t, grad_out=grad_out)
    out.backward(grad_out)
    assert t["x"].grad is None
    for key in ADAPTER_KEYS:
        assert_close(t[key].grad, ref_grads[key], torch.float64, f"grad {key}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend):
    case = CASE_PARAMS[0].values[0]
    t = make_tensors(case, "pointwise_first", dtype=torch.float64)
    batched = call(case, "pointwise_first", backend, t)
    t["x"] = t["x"][1]
    single = call(case, "pointwise_first", backend, t)
    torch.testing.assert_close(single, batched[1], atol=1e-12, rtol=1e-10)


def test_unknown_backend_or_order_raises():
    case = CASE_PARAMS[0].values[0]
    t = make_tensors(case, "pointwise_first", dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        call(case, "pointwise_first", "cudnn", t)
    with pytest.raises(ValueError, match="order"):
        call(case, "pointwise_then_depthwise", "torch", t)


@pytest.mark.parametrize("env, expected", [(None, "torch"), ("reference", "reference"), ("torch", "torch")])
def test_resolve_backend_env_override(monkeypatch, env, expected):
    x, weight = torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3)
    if env is None:
        monkeypatch.delenv("COLORA_BACKEND", raising=False)
    else:
        monkeypatch.setenv("COLORA_BACKEND", env)
    assert cf.functional.resolve_backend("auto", x, weight, 1) == expected
    # An explicit backend is never overridden.
    assert cf.functional.resolve_backend("reference", x, weight, 1) == "reference"
    assert cf.functional.resolve_backend("torch", x, weight, 1) == "torch"


def test_resolve_backend_bad_env_raises(monkeypatch):
    monkeypatch.setenv("COLORA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        cf.functional.resolve_backend("auto", torch.zeros(1, 2, 4, 4), torch.zeros(3, 2, 3, 3), 1)


def test_triton_backend_refuses_fp64_with_a_way_out():
    case = CASE_PARAMS[0].values[0]
    t = make_tensors(case, "pointwise_first", dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match="torch"):
        call(case, "pointwise_first", "triton", t)
