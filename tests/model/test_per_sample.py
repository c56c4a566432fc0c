"""Mixed batches (`cf.adapters_per_sample`, `cf.colora_conv_mixed`, design §10): every sample computed with its
own adapters must equal that sample run alone with those adapters active, in the output and in every adapter's
gradient (the sum over the samples that used it), on every backend and route (Triton in the interpreter)."""
import copy

import pytest
import torch
import torch._dynamo
from torch import nn

import colora_fused as cf
from cases import TOLERANCE, TRITON_DEVICE, assert_close, fp32_tolerance

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NAMES = ["a", ("a", "b"), None, "c", "a", ("c", "default")]


def mixed_model(dim=2, order="pointwise_first", groups=1, rank=1, dtype=torch.float64, device="cpu",
                backend="torch", bias=True):
    """Two wrapped convs (the second strided and zero-padded differently), adapters "default" (rank `rank`),
    "a", "b" (rank 2) and "c", every adapter tensor random so that each set gives a different output."""
    conv = CONVS[dim]
    torch.manual_seed(3)  # the base weights: the same model on every call
    model = nn.Sequential(conv(4, 6, 3, padding=1, groups=groups, bias=bias), nn.Tanh(),
                          conv(6, 4, 3, stride=2, padding=2, dilation=2, groups=groups, bias=bias))
    cf.get_colora_model(model, cf.CoLoRAConfig(target_modules="all", order=order, rank=rank, backend=backend,
                                               train_bias=True))
    cf.add_adapter(model, "a")
    cf.add_adapter(model, "b", rank=2)
    cf.add_adapter(model, "c", train_bias=False)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model.to(device=device, dtype=dtype)


def inputs(dim=2, n=len(NAMES), dtype=torch.float64, device="cpu", size=7):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 4, *(size,) * dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def close(actual, expected, tol, msg=""):
    assert_close(actual, expected, actual.dtype, msg, tol)


def adapter_grads(model):
    return {n: None if p.grad is None else p.grad.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def alone(model, x, names, weights=None):
    """Each sample run alone with its adapters active: the outputs, and the adapter gradients of
    Σ_i <out_i, weights_i> (summed over the samples by accumulation)."""
    model.zero_grad(set_to_none=True)
    outs = []
    for i, entry in enumerate(names):
        cf.set_active_adapters(model, [] if entry is None else [entry] if isinstance(entry, str) else list(entry))
        out = model(x[i:i + 1])
        if weights is not None and out.requires_grad:  # a sample of the base convs alone trains nothing
            (out * weights[i:i + 1]).sum().backward()
        outs.append(out.detach())
    cf.set_active_adapters(model, ["default"])
    return torch.cat(outs), adapter_grads(model) if weights is not None else None


def mixed(model, x, names, weights=None, forward=None):
    model.zero_grad(set_to_none=True)
    with cf.adapters_per_sample(model, names):
        out = (forward or model)(x)
    if weights is not None and out.requires_grad:
        (out * weights).sum().backward()
    return out.detach(), adapter_grads(model) if weights is not None else None


def check_against_alone(model, x, names=NAMES, tolerance=TOLERANCE[torch.float64], grads=True):
    """The mixed batch on `model` against each sample run alone with its adapters, on a copy of the model whose
    layers run the torch backend (the same function: a Triton model's mixed batch is checked without running the
    interpreter once per sample)."""
    weights = torch.randn(mixed(model, x, names)[0].shape, dtype=x.dtype, device=x.device) if grads else None
    out, got = mixed(model, x, names, weights)
    oracle = copy.deepcopy(model)
    for _, layer in cf.colora_layers(oracle):
        layer.backend = "torch"
    expected_out, expected = alone(oracle, x, names, weights)
    close(out, expected_out, tolerance)
    if grads:
        assert got.keys() == expected.keys()
        for name in expected:
            assert (got[name] is None) == (expected[name] is None), name
            if expected[name] is not None:
                close(got[name], expected[name], tolerance, name)
    return out


@pytest.mark.parametrize("route", ["segments", "gathered", "per_set"])
@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
@pytest.mark.parametrize("dim,groups", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_torch_backend_matches_each_sample_alone(monkeypatch, route, order, dim, groups):
    monkeypatch.setenv("COLORA_MIXED_ROUTE", route)
    model = mixed_model(dim, order, groups, rank=2)
    check_against_alone(model, inputs(dim))


@pytest.mark.parametrize("dim,groups,order", [(1, 1, "depthwise_first"), (2, 2, "pointwise_first"),
                                              (2, 2, "depthwise_first"), (3, 2, "pointwise_first")])
def test_segments_runs_a_balanced_batch_in_one_call_per_layer(monkeypatch, order, dim, groups):
    """Sets of (nearly) equal size: the "segments" route runs all of them in one `set_residuals` call per layer
    (padded to the largest set); the result is still each sample's own."""
    from colora_fused import mixed_ops
    calls = []
    real = mixed_ops.set_residuals
    monkeypatch.setattr(mixed_ops, "set_residuals", lambda x, *a, **k: calls.append(x.shape[:2]) or real(x, *a, **k))
    monkeypatch.setenv("COLORA_MIXED_ROUTE", "segments")
    names = ["a", "c", ("a", "b"), None, "c", "a", ("a", "b"), None, "a", "c", ("a", "b")]  # 3, 3, 3, 2 samples
    model = mixed_model(dim, order, groups, rank=2)
    check_against_alone(model, inputs(dim, n=len(names)), names)
    assert calls and all(shape == (4, 3) for shape in calls), calls  # 4 sets of 3 (padded), one call per layer


@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
def test_reference_backend_matches_each_sample_alone(order):
    model = mixed_model(2, order, groups=2, backend="reference")
    check_against_alone(model, inputs(2))


@pytest.mark.parametrize("backend,route,order", [
    ("triton", "fused", "pointwise_first"), ("triton", "fused", "depthwise_first"),
    ("hybrid", "per_set", "depthwise_first")])
def test_triton_backends_match_each_sample_alone(monkeypatch, backend, route, order):
    """Each Triton backend on its own route (the segments route is aten ops whatever the backend: the torch tests
    cover it; per_set runs the ordinary kernels, which their own tests cover, once per set)."""
    monkeypatch.setenv("COLORA_MIXED_ROUTE", route)
    model = mixed_model(2, order, groups=2, dtype=torch.float32, device=TRITON_DEVICE, backend=backend)
    x = inputs(2, dtype=torch.float32, device=TRITON_DEVICE, size=6)
    check_against_alone(model, x, tolerance=fp32_tolerance(TRITON_DEVICE))


@pytest.mark.parametrize("dim,groups,rank,size", [(1, 1, 1, 7), (3, 2, 2, 3)])
def test_fused_route_1d_3d_and_rank(monkeypatch, dim, groups, rank, size):
    """The segmented fused kernel: Conv1d and Conv3d, groups, and sets of different ranks zero-padded to one."""
    monkeypatch.setenv("COLORA_MIXED_ROUTE", "fused")
    model = mixed_model(dim, groups=groups, rank=rank, dtype=torch.float32, device=TRITON_DEVICE, backend="triton")
    x = inputs(dim, n=4, dtype=torch.float32, device=TRITON_DEVICE, size=size)
    check_against_alone(model, x, NAMES[:2] + NAMES[3:5], tolerance=fp32_tolerance(TRITON_DEVICE))


def test_fused_route_double_backward_matches_segments(monkeypatch):
    """backward(create_graph=True) through the fused route goes through the differentiable "segments" formula."""
    grads = {}
    for route in ("fused", "segments"):
        monkeypatch.setenv("COLORA_MIXED_ROUTE", route)
        model = mixed_model(2, dtype=torch.float32, device=TRITON_DEVICE, backend="triton")
        x = inputs(2, n=3, dtype=torch.float32, device=TRITON_DEVICE, size=5).requires_grad_(True)
        with cf.adapters_per_sample(model, ["a", None, ("b", "c")]):
            out = model(x)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grads[route] = torch.autograd.grad(g.square().sum(), model[0].colora_adapters["a"].pointwise)[0]
    close(grads["fused"], grads["segments"], fp32_tolerance(TRITON_DEVICE))


def test_fused_route_gradients_of_every_input_match_segments(monkeypatch):
    """The fused route's explicit backward (dx and the adapter gradients by segmented kernels, dK0 over the whole
    batch, db summed per set) against autograd through the "segments" formula, with the base weight and bias
    trainable too (functional form, depthwise_first, groups, a set of rank 2 beside rank 1 and a base-only set)."""
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.5).to(TRITON_DEVICE)

    weight, bias, x = rand(6, 2, 3, 3), rand(6), rand(5, 4, 6, 6)
    adapters = [(rand(2, 6, 2), rand(2, 4, 3, 3), rand(6)), None, (rand(6, 2), rand(4, 3, 3), None)]
    index = torch.tensor([2, 0, 1, 0, 2], device=TRITON_DEVICE)
    weights = rand(5, 6, 3, 3)  # of the output
    leaves = [weight, bias, x] + [t for a in adapters if a is not None for t in a if t is not None]
    grads = {}
    for route in ("fused", "segments"):
        monkeypatch.setenv("COLORA_MIXED_ROUTE", route)
        for t in leaves:
            t.requires_grad_(True).grad = None
        out = cf.colora_conv_mixed(x, weight, bias, adapters, index, stride=2, padding=1, groups=2,
                                   order="depthwise_first", backend="triton" if route == "fused" else "torch")
        (out * weights).sum().backward()
        grads[route] = [t.grad.clone() for t in leaves]
    for i, (got, expected) in enumerate(zip(grads["fused"], grads["segments"])):
        close(got, expected, fp32_tolerance(TRITON_DEVICE), f"leaf {i}")


def test_auto_takes_segments_on_cpu_without_measuring():
    model = mixed_model(2, dtype=torch.float32, backend="auto")
    cf.clear_caches()
    check_against_alone(model, inputs(2, dtype=torch.float32), tolerance=TOLERANCE[torch.float32])
    assert not cf.functional.ROUTE_CHOICES  # measured on CUDA only


def test_default_routes():
    model = mixed_model(2)
    layer = model[0]
    adapters = [layer.factors(["a"]), layer.factors(["b"])]
    x, index = inputs(2, n=2), torch.tensor([0, 1])
    args = (x, layer.weight, layer.bias, adapters, index, 1, 1, 1, 1, "zeros", "pointwise_first")
    assert cf.mixed.route(*args, "torch") == "segments"
    assert cf.mixed.route(*args, "reference") == "per_set"
    layer = mixed_model(2, dtype=torch.float32, device=TRITON_DEVICE)[0]
    adapters = [layer.factors(["a"]), layer.factors(["b"])]
    args = (inputs(2, n=2, dtype=torch.float32, device=TRITON_DEVICE), layer.weight, layer.bias, adapters,
            torch.tensor([0, 1]), 1, 1, 1, 1, "zeros", "pointwise_first")
    assert cf.mixed.route(*args, "hybrid") == "per_set"
    assert cf.mixed.route(*args, "triton") == "fused"
    assert cf.mixed.route(*args[:3], adapters[:1], index[:1] * 0, *args[5:], "torch") == "single"


def test_channels_last_and_unbatched():
    model = mixed_model(2).to(memory_format=torch.channels_last)
    x = inputs(2).to(memory_format=torch.channels_last)
    out = check_against_alone(model, x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    single = inputs(2, n=1)[0]
    with cf.adapters_per_sample(model, ["b"]):
        got = model(single)
    cf.set_active_adapters(model, ["b"])
    close(got, model(single), TOLERANCE[torch.float64])


def test_every_sample_base_or_one_set():
    model = mixed_model(2)
    x = inputs(2, n=3)
    check_against_alone(model, x, [None, None, None])
    check_against_alone(model, x, [("a", "b")] * 3)


def test_autocast_bfloat16():
    model = mixed_model(2, dtype=torch.float32)
    x = inputs(2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with cf.adapters_per_sample(model, NAMES):
            out = model(x)
        assert out.dtype == torch.bfloat16
        expected, _ = alone(model, x, NAMES)
    close(out.float(), expected.float(), TOLERANCE[torch.bfloat16])


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compile_has_no_graph_break_and_matches(fresh_dynamo):
    model = mixed_model(2, dtype=torch.float32)
    x = inputs(2, dtype=torch.float32)
    with cf.adapters_per_sample(model, NAMES):
        explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    weights = torch.randn(mixed(model, x, NAMES)[0].shape)
    out, got = mixed(model, x, NAMES, weights, forward=compiled)
    expected_out, expected = alone(model, x, NAMES, weights)
    close(out, expected_out, TOLERANCE[torch.float32])
    for name in expected:
        close(got[name], expected[name], TOLERANCE[torch.float32], name)
    # Another assignment over the same sets reuses the graph: the assignment is an index tensor, not a constant.
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    shuffled = [NAMES[i] for i in (5, 4, 3, 2, 1, 0)]
    out, _ = mixed(model, x, shuffled, forward=compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    close(out, alone(model, x, shuffled)[0], TOLERANCE[torch.float32])


def test_weight_standardised_conv_runs_per_set():
    timm_std = pytest.importorskip("timm.layers.std_conv")
    model = nn.Sequential(timm_std.StdConv2d(4, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3))
    cf.get_colora_model(model, cf.CoLoRAConfig(target_modules="all"))
    cf.add_adapter(model, "a")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    check_against_alone(model.double(), inputs(2, n=4), ["a", None, "default", "a"])


def test_errors_name_the_problem_and_change_nothing():
    model = mixed_model(2)
    x = inputs(2, n=3)
    with pytest.raises(ValueError, match=r"layer '0' \(CoLoRAConv2d\) got a batch of 3 samples, but 2 adapter"):
        with cf.adapters_per_sample(model, ["a", "b"]):
            model(x)
    assert all(layer._mixed_batch is None for _, layer in cf.colora_layers(model))
    with pytest.raises(ValueError, match=r"has no adapter 'zed'; it has \['default', 'a', 'b', 'c'\]"):
        with cf.adapters_per_sample(model, ["a", ("b", "zed")]):
            pass
    for bad, match in [([], "non-empty list"), ("a", "non-empty list"), ([3], "sample 0 has 3"),
                       ([("a", "a")], "names an adapter twice")]:
        with pytest.raises(ValueError, match=match):
            with cf.adapters_per_sample(model, bad):
                pass
    assert all(layer._mixed_batch is None for _, layer in cf.colora_layers(model))
    with pytest.raises(ValueError, match="no CoLoRA layer"):
        with cf.adapters_per_sample(nn.Conv2d(1, 1, 1), ["a"]):
            pass
    layer = model[0]
    with pytest.raises(ValueError, match="index must be a 1-d long tensor of the batch size 3"):
        cf.colora_conv_mixed(x, layer.weight, layer.bias, [layer.factors()], torch.zeros(2, dtype=torch.long))


def test_nesting_restores_the_outer_assignment_and_active_adapters_stay():
    model = mixed_model(2)
    x = inputs(2, n=2)
    base = alone(model, x, [None, None])[0]
    cf.set_active_adapters(model, ["b"])
    with cf.adapters_per_sample(model, ["a", "c"]):
        outer = model(x)
        with cf.adapters_per_sample(model, [None, None]):
            close(model(x), base, TOLERANCE[torch.float64])
        assert torch.equal(model(x), outer)
    assert cf.active_adapters(model) == ["b"]
    assert all(layer._mixed_batch is None for _, layer in cf.colora_layers(model))


def test_a_training_step_moves_each_adapter_by_its_samples_only():
    """SGD on a mixed batch: an adapter no sample used keeps its values, the others move."""
    model = mixed_model(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with cf.adapters_per_sample(model, ["a", None, ("a", "c"), "a"]):
        model(inputs(2, n=4)).square().sum().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            moved = not torch.equal(p, before[name])
            assert moved == (".a." in name or ".c." in name and "bias_delta" not in name), name
