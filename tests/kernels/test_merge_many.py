"""The multi-layer in-place merge (`kernels.merge.merge_many_`) against the float64 reference, its launches (one per
dtype combination), its all-or-nothing checks, and `merge_colora` taking it.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (conftest), and the Triton merge path of
the layers is forced by patching `functional._merge_considers_triton`, which admits CUDA tensors only.
"""
import copy

import pytest
import torch
import triton
from torch import nn

import colora_fused as cf
from cases import CASES, TOLERANCE, assert_close, make_tensors
from colora_fused import functional
from colora_fused._conv import MergeSpec
from colora_fused.kernels import _common, merge
from colora_fused.kernels._common import TritonBackendError, TritonBackendTypeError
from colora_fused.reference import delta_weight_reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or _common.INTERPRET),
                                reason="the kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BY_ID = {c.id: c for c in CASES}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
# (case, order, Δb): conv1d/2d/3d, groups, depthwise, 1×1, rectangular and even kernels, channels_last weights,
# layers with b0 and Δb, with b0 alone (b0 kept) and with neither.
LAYERS = [
    ("2d-k3-pad1", "pointwise_first", True),
    ("2d-groups3", "depthwise_first", True),
    ("2d-depthwise", "pointwise_first", False),
    ("2d-1x1-nobias", "depthwise_first", False),
    ("2d-rect-k", "depthwise_first", True),
    ("2d-same-even-k", "pointwise_first", True),
    ("2d-channels-last", "depthwise_first", True),
    ("2d-channels-last-groups", "pointwise_first", True),
    ("1d-k3-stride2", "depthwise_first", True),
    ("1d-same-reflect", "pointwise_first", False),
    ("3d-k3-groups2", "depthwise_first", True),
    ("3d-1x3x3-channels-last", "pointwise_first", True),
]


@pytest.fixture
def launches(monkeypatch):
    """The (kernel, grid) of every merge launch from now on; the launches still run."""
    seen = []

    def recording(kernel, grid, *args, **kwargs):
        seen.append((kernel, grid))
        _common.launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(merge, "launch", recording)
    return seen


@pytest.fixture
def triton_merges(monkeypatch):
    """Layers' merges take the Triton kernels on this device too (CPU under the interpreter)."""
    monkeypatch.setattr(functional, "_merge_considers_triton", lambda weight: True)


def make_spec(case_id, order, with_delta, dtype=torch.float32, seed=0):
    case = BY_ID[case_id]
    t = make_tensors(case, order, dtype, device=DEVICE, seed=seed)
    weight = t["weight"]
    if case.channels_last:
        weight = weight.contiguous(memory_format=CHANNELS_LAST[weight.dim()])
    return MergeSpec(weight, t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"] if with_delta else None,
                     case.groups, order)


def expected_after(spec):
    """(K0 + ΔK, b0 + Δb or b0) in float64 on CPU, from the spec's tensors before the merge."""
    as64 = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    weight = as64(spec.weight) + delta_weight_reference(as64(spec.pointwise), as64(spec.depthwise), spec.groups,
                                                        spec.order)
    bias = as64(spec.bias)
    if spec.bias_delta is not None:
        bias = bias + as64(spec.bias_delta)
    return weight, bias


def assert_merged(spec, expected, name):
    weight, bias = expected
    assert_close(spec.weight, weight, spec.weight.dtype, f"{name} weight")
    if bias is not None:
        assert_close(spec.bias, bias, spec.bias.dtype, f"{name} bias")


def blocks(weight):
    """The programs a layer of this weight takes: its [BLOCK_O, BLOCK_R] blocks."""
    block_o, block_r, _ = merge.merge_config()
    return triton.cdiv(weight.shape[0], block_o) * triton.cdiv(weight[0].numel(), block_r)


def test_a_mix_of_layers_merges_in_one_launch(launches):
    specs = [make_spec(case_id, order, delta, seed=i) for i, (case_id, order, delta) in enumerate(LAYERS)]
    expected = [expected_after(s) for s in specs]
    strides = [s.weight.stride() for s in specs]
    versions = [(s.weight._version, None if s.bias is None else s.bias._version) for s in specs]
    merge.merge_many_(specs)
    assert launches == [(merge._merge_many_kernel, (sum(blocks(s.weight) for s in specs),))]
    for spec, want, stride, (w_version, b_version), (case_id, order, _) in zip(specs, expected, strides, versions,
                                                                              LAYERS):
        assert_merged(spec, want, f"{case_id} {order}")
        assert spec.weight.stride() == stride
        assert spec.weight._version > w_version
        if spec.bias_delta is not None:
            assert spec.bias._version > b_version


def test_one_launch_per_dtype_combination(launches):
    dtypes = [torch.float32, torch.float16, torch.float32, torch.bfloat16, torch.float16, torch.float32]
    specs = [make_spec(LAYERS[i][0], LAYERS[i][1], LAYERS[i][2], dtype, seed=i) for i, dtype in enumerate(dtypes)]
    # Kp in fp32 beside an fp16 weight: a dtype combination of its own.
    odd = make_spec("2d-groups3", "pointwise_first", True, torch.float16, seed=9)
    specs.append(odd._replace(pointwise=odd.pointwise.float()))
    expected = [expected_after(s) for s in specs]
    merge.merge_many_(specs)
    kernels = [kernel for kernel, _ in launches]
    assert kernels == [merge._merge_many_kernel, merge._merge_many_kernel, merge._merge_kernel, merge._merge_kernel]
    assert launches[0][1] == (sum(blocks(s.weight) for s in specs if s.weight.dtype == torch.float32),)
    for i, (spec, want) in enumerate(zip(specs, expected)):
        assert_merged(spec, want, f"layer {i} ({spec.weight.dtype})")


def test_tied_weights_merge_in_separate_launches(launches):
    first = make_spec("2d-k3-pad1", "pointwise_first", True, seed=1)
    second = make_spec("2d-k3-pad1", "depthwise_first", True, seed=2)._replace(weight=first.weight)
    other = make_spec("2d-groups3", "depthwise_first", False, seed=3)
    weight = expected_after(first)[0] + expected_after(second)[0] - first.weight.double().cpu()
    expected_other = expected_after(other)
    merge.merge_many_([first, second, other])
    assert [kernel for kernel, _ in launches] == [merge._merge_many_kernel, merge._merge_kernel]
    assert_close(first.weight, weight, torch.float32, "tied weight")
    assert_merged(other, expected_other, "untied layer")


@pytest.mark.parametrize("bad, exc, match", [
    ("depthwise-shape", TritonBackendError, "layer 2 of 3: .*depthwise has shape"),
    ("float64", TritonBackendTypeError, "layer 2 of 3: .*dtype torch.float64"),
    ("bias_delta-without-bias", TritonBackendError, "layer 2 of 3: .*bias is None"),
    ("groups", TritonBackendError, "layer 2 of 3: .*groups=4"),
])
def test_an_invalid_layer_changes_nothing(launches, bad, exc, match):
    specs = [make_spec("2d-k3-pad1", "pointwise_first", True, seed=1),
             make_spec("3d-k3-groups2", "depthwise_first", True, seed=2),
             make_spec("2d-groups3", "depthwise_first", True, seed=3)]
    last = specs[-1]
    specs[-1] = {"depthwise-shape": last._replace(depthwise=last.depthwise[:, :2]),
                 "float64": last._replace(weight=last.weight.double()),
                 "bias_delta-without-bias": last._replace(bias=None),
                 "groups": last._replace(groups=4)}[bad]
    before = [[None if t is None else t.clone() for t in spec[:5]] for spec in specs]
    with pytest.raises(exc, match=match):
        merge.merge_many_(specs)
    assert launches == []
    for spec, old in zip(specs, before):
        for t, o in zip(spec[:5], old):
            assert (t is None and o is None) or torch.equal(t, o)


def test_merge_backend(triton_merges):
    spec = make_spec("2d-k3-pad1", "pointwise_first", True)
    assert functional.merge_backend(spec) == "triton"
    assert functional.merge_backend(spec._replace(weight=spec.weight.double())) == "torch"


def test_merge_backend_takes_triton_on_cuda_only():
    spec = make_spec("2d-k3-pad1", "pointwise_first", True)
    assert functional.merge_backend(spec) == ("triton" if spec.weight.is_cuda else "torch")


class Mixed(nn.Module):
    """Convs of every dimension, with and without bias, grouped, channels_last, one in float64."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(5, 7, 3, padding=1)
        self.b = nn.Conv2d(6, 9, 3, groups=3, bias=False)
        self.c = nn.Conv1d(5, 6, 4)
        self.d = nn.Conv3d(4, 6, (1, 3, 3), groups=2)
        self.e = nn.Conv2d(5, 7, (1, 3), bias=False).to(memory_format=torch.channels_last)
        self.f = nn.Conv2d(3, 4, 1).double()


def mixed_model():
    torch.manual_seed(3)
    model = Mixed().to(DEVICE)
    cf.apply_colora(model, include=["a", "b", "c", "f"], train_bias=True)
    cf.apply_colora(model, include=["d", "e"], order="depthwise_first")
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in cf.colora_layers(model):
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    return model


def assert_same_merge(model, on_torch, names):
    """`model`'s merged weights and biases match those of its copy `on_torch`, and its adapters are reset."""
    merged, expected = model.state_dict(), on_torch.state_dict()
    for key in (f"{name}.{k}" for name in names for k in ("weight", "bias")):
        if expected.get(key) is not None:
            atol, rtol = TOLERANCE[expected[key].dtype]
            torch.testing.assert_close(merged[key], expected[key], atol=atol, rtol=rtol, msg=lambda m: f"{key}: {m}")
    for name in names:
        layer = model.get_submodule(name) if name else model
        assert torch.count_nonzero(layer.depthwise) == 0
        assert layer.bias_delta is None or torch.count_nonzero(layer.bias_delta) == 0


@pytest.mark.usefixtures("triton_merges")
def test_merge_colora_takes_one_launch_and_matches_the_torch_path(launches, monkeypatch):
    model = mixed_model()
    on_torch = copy.deepcopy(model)
    layers = cf.colora_layers(model)
    cf.merge_colora(model)
    # The float64 layer merges by torch ops; the five others, of one dtype combination, in one launch.
    grid = (sum(blocks(layer.weight) for _, layer in layers if layer.weight.dtype == torch.float32),)
    assert launches == [(merge._merge_many_kernel, grid)]
    monkeypatch.setattr(functional, "_merge_considers_triton", lambda weight: False)
    cf.merge_colora(on_torch)
    assert len(launches) == 1
    assert_same_merge(model, on_torch, [n for n, _ in layers])
    assert not model.b.bias.requires_grad and model.b.bias.shape == (9,)
    assert model.e.bias is None


@pytest.mark.usefixtures("triton_merges")
def test_layer_merge_takes_the_single_layer_kernel(launches, monkeypatch):
    layer = mixed_model().d
    on_torch = copy.deepcopy(layer)
    assert layer.merge_() is layer
    assert [kernel for kernel, _ in launches] == [merge._merge_kernel]
    monkeypatch.setattr(functional, "_merge_considers_triton", lambda weight: False)
    on_torch.merge_()
    assert_same_merge(layer, on_torch, [""])
