"""Rank-r CoLoRA: ΔK = Σ_{i<r} Kp[i] ⊛ Kd[i] on every backend, against the float64 reference, and through the
layer's life (shapes, reset, merge, state dicts, config)."""
import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused import functional
from colora_fused._conv import adapter_grad_route
from colora_fused.reference import colora_conv_reference, delta_weight_reference

from cases import (CASE_PARAMS, CASES, ORDERS, TOLERANCE, TRITON_DEVICE, assert_close,
                   assert_training_matches_reference, backend_device, fp32_tolerance, make_tensors, reference_output)

TOL = TOLERANCE[torch.float32]
RANK = 3
# The cases whose Triton paths run at rank r in the interpreter (CI's time): stride, groups, channels_last, 3-D.
INTERPRETER_RANK_CASES = ("2d-k3-stride2", "2d-groups3", "2d-channels-last-groups", "3d-k3-groups2")


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_reference_sums_the_rank_one_terms(case, order):
    """The oracle itself at rank r: its output is the base conv plus each term's rank-1 residual (the paper's
    formula, term by term), and its ΔK the sum of the terms' ΔK."""
    t = make_tensors(case, order, torch.float64, rank=RANK)
    kw = dict(order=order, **case.conv_kwargs())
    out = colora_conv_reference(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"], **kw)
    base = colora_conv_reference(t["x"], t["weight"], t["bias"], t["pointwise"][0], 0 * t["depthwise"][0], None, **kw)
    expected = base.clone()
    for kp, kd in zip(t["pointwise"], t["depthwise"]):
        expected += colora_conv_reference(t["x"], t["weight"], t["bias"], kp, kd, None, **kw) - base
    if t["bias_delta"] is not None:
        expected += t["bias_delta"].reshape(-1, *([1] * case.dim))
    assert_close(out, expected, torch.float64, "rank-r reference")
    groups = case.groups
    delta = delta_weight_reference(t["pointwise"], t["depthwise"], groups, order)
    terms = sum(delta_weight_reference(kp, kd, groups, order) for kp, kd in zip(t["pointwise"], t["depthwise"]))
    assert_close(delta, terms, torch.float64, "rank-r ΔK")
    assert delta.shape == t["weight"].shape


def _backends():
    params = [pytest.param("torch", id="torch"), pytest.param("reference", id="reference")]
    if functional.triton_available():
        params += [pytest.param("triton", id="triton"), pytest.param("hybrid", id="hybrid")]
    return params


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_rank_r_training_matches_reference(case, order, backend):
    """Output and every gradient at rank 3 (Triton paths in the interpreter on CPU, on CUDA on a GPU)."""
    device = backend_device(backend)
    if device == "cpu" and backend in ("triton", "hybrid") and case.id not in INTERPRETER_RANK_CASES:
        pytest.skip("the kernels' rank loop is the same in every case: the interpreter runs it on "
                    f"{', '.join(INTERPRETER_RANK_CASES)} (every case on a GPU)")
    assert_training_matches_reference(case, order, backend, rank=RANK, device=device, tol=fp32_tolerance(device))


@pytest.mark.parametrize("route", ["cheap", "gradw"])
def test_rank_r_adapter_gradients_on_both_routes(route, monkeypatch):
    """The cheap route (per term) and the gradW route (one weight gradient, reduced against each term)."""
    monkeypatch.setenv("COLORA_GRAD_ROUTE", route)
    case = CASES[0]
    for order in ORDERS:
        t = make_tensors(case, order, torch.float32, rank=RANK)
        t = {k: (None if v is None else v.requires_grad_(k in ("pointwise", "depthwise"))) for k, v in t.items()}
        out = cf.colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                             order=order, backend="torch", **case.conv_kwargs())
        grad = torch.randn_like(out)
        _, grads = reference_output(case, order, t, grad)
        out.backward(grad)
        for name in ("pointwise", "depthwise"):
            assert_close(t[name].grad, grads[name], torch.float32, f"{route} {order} {name}", TOL)


def test_route_weighs_the_rank():
    """The cheap route costs r times a rank-1 one; the weight gradient costs the same at any rank."""
    x, w, out = (8, 64, 14, 14), (64, 64, 3, 3), (8, 64, 14, 14)
    assert adapter_grad_route(x, w, out, "pointwise_first", 1) == "cheap"
    assert adapter_grad_route(x, w, out, "pointwise_first", 64) == "gradw"


@pytest.mark.parametrize("cls, conv", [(cf.CoLoRAConv1d, nn.Conv1d(4, 6, 3)), (cf.CoLoRAConv2d, nn.Conv2d(4, 6, 3)),
                                       (cf.CoLoRAConv3d, nn.Conv3d(4, 6, (1, 3, 3)))])
@pytest.mark.parametrize("order", ORDERS)
def test_layer_shapes_reset_and_parameter_count(cls, conv, order):
    one = cls.from_conv(conv, order=order)
    layer = cls.from_conv(conv, order=order, rank=RANK)
    assert layer.pointwise.shape == (RANK, *one.pointwise.shape)
    assert layer.depthwise.shape == (RANK, *one.depthwise.shape)
    assert layer.rank == RANK and one.rank == 1 and f"rank={RANK}" in repr(layer) and "rank=" not in repr(one)
    n_one = one.pointwise.numel() + one.depthwise.numel()
    assert layer.pointwise.numel() + layer.depthwise.numel() == RANK * n_one
    # Fresh adapters: Kd = 0 so ΔK = 0, and each term's Kp drawn apart (they must differ to train apart).
    assert torch.count_nonzero(layer.depthwise) == 0 and torch.count_nonzero(layer.delta_weight()) == 0
    assert not torch.equal(layer.pointwise[0], layer.pointwise[1])
    with pytest.raises(ValueError, match="rank"):
        cls.from_conv(conv, rank=0)


@pytest.mark.parametrize("triton_merge", [False, True])
def test_merge_folds_every_term_and_keeps_the_output(triton_merge, monkeypatch):
    """merge_colora at rank 3 (aten ops, or the Triton kernels, in the interpreter or on a GPU: a multi-layer
    launch and a single-layer one): the output is unchanged, K0 gains Σ ΔK_i, the adapters restart at ΔK = 0."""
    device = TRITON_DEVICE if triton_merge else "cpu"
    if triton_merge:
        pytest.importorskip("triton")
        monkeypatch.setattr(functional, "_merge_considers_triton", lambda w: True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, groups=2))
    cf.apply_colora(model, rank=RANK, order="pointwise_first", backend="torch")
    model.to(device)
    tol = fp32_tolerance(device)  # the library conv runs fp32 in TF32 on a GPU
    layers = [layer for _, layer in cf.colora_layers(model)]
    with torch.no_grad():
        for layer in layers:
            layer.depthwise.normal_()
            layer.bias_delta.normal_()
    expected_weights = [(layer.weight + delta_weight_reference(layer.pointwise.double(), layer.depthwise.double(),
                                                               layer.groups, layer.order).float()).detach()
                        for layer in layers]
    x = torch.randn(2, 3, 8, 8, device=device)
    before = model(x).detach()
    cf.merge_colora(model)
    for layer, w in zip(layers, expected_weights):
        assert_close(layer.weight, w, torch.float32, "K0 + Σ ΔK_i")
        assert torch.count_nonzero(layer.depthwise) == 0 and layer.pointwise.shape[0] == RANK
    assert_close(model(x), before, torch.float32, "output after the merge", tol)
    with torch.no_grad():
        layers[0].depthwise.normal_()
    before = model(x).detach()
    layers[0].merge_()
    assert_close(model(x), before, torch.float32, "output after a single-layer merge", tol)


def test_state_dict_and_config_carry_the_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3))
    config = cf.CoLoRAConfig(rank=2)
    assert cf.CoLoRAConfig.from_dict(config.to_dict()).rank == 2
    cf.get_colora_model(model, config)
    layer = model[0]
    with torch.no_grad():
        layer.depthwise.normal_()
    state = cf.colora_state_dict(model)
    assert state["0.pointwise"].shape == (2, 6, 3)
    other = nn.Sequential(nn.Conv2d(3, 6, 3))
    other[0].load_state_dict(model[0].state_dict(), strict=False)
    cf.get_colora_model(other, config)
    cf.load_colora_state_dict(other, state)
    x = torch.randn(1, 3, 5, 5)
    assert torch.equal(other(x), model(x))
    with pytest.raises(ValueError, match="rank"):
        cf.CoLoRAConfig(rank=0)


def test_rank_r_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a rank-2 model: the registered op carries [r, ...] adapter gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1))
    cf.apply_colora(model, backend="torch", rank=2)
    params = [p for _, layer in cf.colora_layers(model) for p in layer.adapter_parameters()]
    with torch.no_grad():
        for _, layer in cf.colora_layers(model):
            layer.depthwise.normal_()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    eager = model(x)
    expected = torch.autograd.grad(eager.square().sum(), [x, *params])
    compiled = torch.compile(model, fullgraph=True)(x)
    got = torch.autograd.grad(compiled.square().sum(), [x, *params])
    assert_close(compiled, eager.detach().double(), torch.float32, "compiled output")
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert_close(a, b.double(), torch.float32, "compiled gradient")
