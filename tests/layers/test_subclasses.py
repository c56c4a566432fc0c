"""Conv subclasses (`colora_fused.conv_kinds`): each supported class against its own forward — fresh adapters give
its output, random ones its computation on K0 + ΔK (output and gradients against a float64 reference built from
the class's own forward), merge and merge_and_unload keep the output — and every other computing subclass refused
by name, by from_conv and apply_colora / get_colora_model alike."""
import copy
import logging
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.video.resnet import Conv3DNoTemporal, Conv3DSimple

import colora_fused as cf
from colora_fused.reference import delta_weight_reference

from cases import ORDERS, assert_close

LAYERS = {1: cf.CoLoRAConv1d, 2: cf.CoLoRAConv2d, 3: cf.CoLoRAConv3d}


def timm_layers():
    return pytest.importorskip("timm.layers")


def scaled(cls, *args, **kwargs):
    """A timm ScaledStdConv2d(Same) with a gain other than its initial 1, so that the gain is exercised."""
    conv = cls(*args, **kwargs)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(4))
    return conv


class WithNote(nn.Conv1d):
    """A subclass that only changes the constructor (and keeps state of its own, an attribute and a buffer
    outside the state dict): torch's computation."""

    def __init__(self, channels):
        super().__init__(channels, channels + 2, 3, padding=1)
        self.note = "kept"
        self.register_buffer("calls", torch.zeros(()), persistent=False)


# (id, conv factory, input shape): odd sizes, so that TensorFlow's "SAME" pads unevenly.
SUBCLASSES = [
    pytest.param(lambda: timm_layers().Conv2dSame(5, 6, 3, stride=2), (2, 5, 9, 8), id="timm-Conv2dSame-s2"),
    pytest.param(lambda: timm_layers().Conv2dSame(5, 6, 4, dilation=2, bias=False), (2, 5, 9, 10),
                 id="timm-Conv2dSame-k4-dilated"),
    pytest.param(lambda: timm_layers().StdConv2d(5, 6, 3, bias=True), (2, 5, 7, 9), id="timm-StdConv2d"),
    pytest.param(lambda: timm_layers().StdConv2d(6, 4, 3, stride=2, groups=2), (2, 6, 9, 7),
                 id="timm-StdConv2d-groups"),
    pytest.param(lambda: timm_layers().StdConv2dSame(5, 6, 3, stride=2), (2, 5, 9, 8),
                 id="timm-StdConv2dSame-dynamic"),
    pytest.param(lambda: timm_layers().StdConv2dSame(5, 6, 3), (2, 5, 9, 8), id="timm-StdConv2dSame-static"),
    pytest.param(lambda: scaled(timm_layers().ScaledStdConv2d, 5, 6, 3, gamma=1.7), (2, 5, 7, 9),
                 id="timm-ScaledStdConv2d"),
    pytest.param(lambda: scaled(timm_layers().ScaledStdConv2dSame, 5, 6, 4, stride=2), (2, 5, 9, 8),
                 id="timm-ScaledStdConv2dSame"),
    pytest.param(lambda: Conv3DSimple(4, 6, stride=2), (2, 4, 5, 7, 6), id="tv-Conv3DSimple"),
    pytest.param(lambda: Conv3DNoTemporal(4, 6, stride=2), (2, 4, 5, 7, 6), id="tv-Conv3DNoTemporal"),
    pytest.param(lambda: WithNote(4), (2, 4, 11), id="constructor-only-Conv1d"),
]


def wrap(factory, order, rank, dtype, train_bias=True):
    """(the original conv, an untouched copy of it, its CoLoRA layer)."""
    conv = factory().to(dtype)
    original = copy.deepcopy(conv)
    layer = LAYERS[conv.weight.dim() - 2].from_conv(conv, order=order, rank=rank, train_bias=train_bias)
    return conv, original, layer


def randomize_(layer, seed=5, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def reference(original, layer, x, grad_out):
    """The class's own forward, in float64, on weight K0 + Kp ⊛ Kd and bias b0 + Δb, and the gradients of x, Kp,
    Kd, Δb by autograd."""
    conv = copy.deepcopy(original).double()
    leaves = {"x": x.detach().double().requires_grad_(True)}
    for name in ("pointwise", "depthwise", "bias_delta"):
        if getattr(layer, name) is not None:
            leaves[name] = getattr(layer, name).detach().double().requires_grad_(True)
    weight = conv.weight + delta_weight_reference(leaves["pointwise"], leaves["depthwise"], conv.groups,
                                                  layer.order)
    params = {"weight": weight}
    if "bias_delta" in leaves:
        params["bias"] = leaves["bias_delta"] if conv.bias is None else conv.bias + leaves["bias_delta"]
    out = torch.func.functional_call(conv, params, (leaves["x"],))
    out.backward(grad_out.double())
    return out.detach(), {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("factory, shape", SUBCLASSES)
def test_fresh_layer_is_its_conv(factory, shape):
    conv, original, layer = wrap(factory, "pointwise_first", 1, torch.float32)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = original(x)
        assert torch.equal(layer(x), expected)
    assert layer.base_class is type(conv) and layer.weight is conv.weight
    assert all(not p.requires_grad for p in conv.parameters()), "the base conv's parameters are frozen"
    assert set(layer.state_dict()) == set(original.state_dict()) | {"pointwise", "depthwise", "bias_delta"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("rank", [1, 2], ids=["r1", "r2"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("factory, shape", SUBCLASSES)
def test_trained_layer_matches_its_class_on_merged_weight(factory, shape, order, rank, dtype):
    conv, original, layer = wrap(factory, order, rank, dtype)
    randomize_(layer)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out = layer(x)
    grad_out = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(6))
    expected, grads = reference(original, layer, x, grad_out)
    assert_close(out, expected, dtype, "out")
    out.backward(grad_out)
    assert_close(x.grad, grads["x"], dtype, "grad x")
    for name in ("pointwise", "depthwise", "bias_delta"):
        assert_close(getattr(layer, name).grad, grads[name], dtype, f"grad {name}")
    with torch.no_grad():
        layer.backend = "reference"
        assert_close(layer(x), expected, dtype, "out, reference backend")
        layer.disable_adapters = True
        assert torch.equal(layer(x), original.to(dtype)(x)), "disabled adapters give the class's own output"


@pytest.mark.parametrize("factory, shape", SUBCLASSES)
def test_merge_and_unload_give_the_class_back(factory, shape):
    conv, original, layer = wrap(factory, "depthwise_first", 2, torch.float64)
    randomize_(layer)
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        trained = layer(x)
        plain = cf.merge_and_unload(layer)
        assert type(plain) is type(conv)
        assert set(plain.state_dict()) == set(original.state_dict()) | {"bias"}
        for name in set(vars(original)) - set(vars(nn.Conv3d(1, 1, 1))):
            assert getattr(plain, name) == getattr(original, name), name
        assert dict(plain.named_buffers()).keys() == dict(original.named_buffers()).keys()
        assert_close(plain(x), trained, torch.float64, "merge_and_unload")
        layer.merge_()
        assert torch.count_nonzero(layer.depthwise) == 0
        assert_close(layer(x), trained, torch.float64, "after merge_")
        assert torch.equal(layer.weight, plain.weight), "merge_ and merge_and_unload fold the same K0 + ΔK"


# --- refusals ------------------------------------------------------------------------------------------------

class Doubled(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class DoubledAgain(Doubled):
    """Inherits a computing forward without writing one."""


class Flipped(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.flip(-1), bias)


class StdConv2d(nn.Conv2d):
    """Named as timm's class, but not it: recognised by identity, not by name."""

    def forward(self, x):
        return super().forward(x) + 1


class RankHolder(nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank = 5


def pre_hooked():
    conv = nn.Conv2d(3, 4, 3)
    conv.register_forward_pre_hook(lambda module, args: None)
    return conv


REFUSED = [
    pytest.param(lambda: Doubled(3, 4, 3), r"test_subclasses\.Doubled overrides forward, a computation CoLoRA does "
                 r"not know \(CoLoRA supports .*timm's Conv2dSame, StdConv2d", id="forward"),
    pytest.param(lambda: DoubledAgain(3, 4, 3), r"DoubledAgain overrides forward \(in test_subclasses\.Doubled\)",
                 id="inherited-forward"),
    pytest.param(lambda: Flipped(3, 4, 3), r"Flipped overrides _conv_forward", id="conv-forward"),
    pytest.param(lambda: StdConv2d(3, 4, 3), r"test_subclasses\.StdConv2d overrides forward", id="timm-lookalike"),
    pytest.param(lambda: RankHolder(3, 4, 3), r"RankHolder holds rank, names a CoLoRA layer uses for itself",
                 id="attribute-clash"),
    pytest.param(lambda: nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)), r"is parametrized",
                 id="weight-norm"),
    pytest.param(pre_hooked, r"Conv2d has forward pre-hooks", id="forward-pre-hook"),
    pytest.param(lambda: nn.LazyConv2d(4, 3), r"lazy conv not yet initialised", id="lazy"),
]


@pytest.mark.parametrize("factory, message", REFUSED)
def test_from_conv_refuses_what_it_cannot_compute(factory, message):
    conv = factory()
    before = {n: p.requires_grad for n, p in conv.named_parameters()}
    with pytest.raises(TypeError, match=r"^CoLoRAConv2d\.from_conv: .*" + message):
        cf.CoLoRAConv2d.from_conv(conv)
    assert {n: p.requires_grad for n, p in conv.named_parameters()} == before, "a refused from_conv froze a tensor"


def test_subclass_of_a_supported_class_is_supported():
    timm = timm_layers()

    class Mine(timm.StdConv2d):
        pass

    conv = Mine(3, 4, 3, bias=True)
    layer = cf.CoLoRAConv2d.from_conv(copy.deepcopy(conv))
    assert layer.conv_kind.name == "timm StdConv2d"
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = Doubled(8, 8, 3, padding=1)
        self.flip = Flipped(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 3)

    def forward(self, x):
        return self.head(self.flip(self.odd(self.stem(x)))).mean((2, 3))


@pytest.mark.parametrize("call, message", [
    (lambda m: cf.apply_colora(m), r"^apply_colora: 2 of the 4 selected convs compute what a CoLoRA layer cannot "
     r"repeat: Doubled ×1 \(odd\): .*; Flipped ×1 \(flip\): .*CoLoRA supports .*Leave them out with exclude, or "
     r"pass unsupported='skip'"),
    (lambda m: cf.get_colora_model(m), r"^get_colora_model: 2 of the 4 selected convs .*Leave them out with "
     r"exclude_modules, or pass unsupported='skip'"),
], ids=["apply_colora", "get_colora_model"])
def test_unsupported_convs_are_refused_and_nothing_changes(call, message):
    model = Net()
    modules = dict(model.named_modules())
    with pytest.raises(TypeError, match=message):
        call(model)
    assert dict(model.named_modules()) == modules
    assert all(p.requires_grad for p in model.parameters())
    assert cf.apply_colora(model, exclude=["odd", "flip"]) == ["stem", "head"]


def test_skip_leaves_unsupported_convs_plain_and_lists_them(caplog):
    model, x = Net(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    with caplog.at_level(logging.WARNING, logger="colora_fused.model"):
        cf.get_colora_model(model, cf.CoLoRAConfig(unsupported="skip"))
    assert [n for n, _ in cf.colora_layers(model)] == ["stem", "head"]
    assert type(model.odd) is Doubled and type(model.flip) is Flipped
    assert not any(p.requires_grad for p in model.odd.parameters()), "get_colora_model freezes what it leaves plain"
    (record,) = caplog.records
    assert record.getMessage().startswith("get_colora_model: unsupported='skip' leaves 2 selected convs plain: "
                                          "Doubled ×1 (odd): ")
    assert "Flipped ×1 (flip)" in record.getMessage()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    with pytest.raises(ValueError, match=r"every selected conv is unsupported"):
        cf.apply_colora(Net(), include=["odd"], unsupported="skip")
    with pytest.raises(ValueError, match=r"apply_colora: unsupported='ignore'; choose one of \('error', 'skip'\)"):
        cf.apply_colora(Net(), unsupported="ignore")


# --- whole models ----------------------------------------------------------------------------------------------

def test_r3d_18_wraps_all_its_convs():
    """torchvision's video ResNet builds its convs as Conv3DSimple (which compute what nn.Conv3d does): all 20 are
    wrapped, and merge_and_unload gives them back as that class."""
    torch.manual_seed(0)
    base = torchvision.models.video.r3d_18(weights=None, num_classes=4).eval()
    x = torch.randn(1, 3, 4, 16, 16)
    with torch.no_grad():
        expected = base(x)
    model = copy.deepcopy(base)
    assert len(cf.apply_colora(model)) == 20
    assert sum(isinstance(m, (nn.Conv3d, nn.Conv2d)) for m in model.modules()) == 20
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    randomize_(cf.colora_layers(model)[0][1], scale=0.05)
    for _, layer in cf.colora_layers(model)[1:]:
        randomize_(layer, scale=0.02)
    with torch.no_grad():
        trained = model(x)
        assert not torch.allclose(trained, expected, atol=1e-4)
        cf.merge_and_unload(model)
        assert sum(type(m) is Conv3DSimple for m in model.modules()) == 16
        assert_close(model(x), trained, torch.float32, "merge_and_unload")

    assert len(cf.colora_layers(cf.get_colora_model(copy.deepcopy(base), cf.CoLoRAConfig(target_modules="all")))) == 20
    default = cf.get_colora_model(copy.deepcopy(base))
    assert sorted(n for n, _ in cf.colora_layers(default)) == sorted(
        n for n, m in base.named_modules() if isinstance(m, nn.Conv3d) and m.kernel_size != (1, 1, 1))


def test_package_imports_without_timm():
    code = ("import sys; sys.modules['timm'] = None\n"
            "import torch, colora_fused as cf\n"
            "layer = cf.CoLoRAConv2d.from_conv(torch.nn.Conv2d(3, 4, 3))\n"
            "assert 'timm' not in sys.modules or sys.modules['timm'] is None\n"
            "print(layer.conv_kind.name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "torch\n"
