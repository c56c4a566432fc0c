"""The PEFT-style API: CoLoRAConfig, get_colora_model's freezing (parameter by parameter on resnet18 and a
timm-style model), print_trainable_parameters, merge_and_unload, disable_colora."""
import copy
import json
import types

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import colora_fused as cf

ADAPTER_NAMES = ("pointwise", "depthwise", "bias_delta")


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    return lambda: copy.deepcopy(model)


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        return x * self.conv_expand(F.silu(self.conv_reduce(scale))).sigmoid()


class DepthwiseSeparableBlock(nn.Module):
    """timm's EfficientNet block layout (conv_dw, bn1, se, conv_pw, bn2) with a ConvNeXt-style layer scale
    `gamma`, a parameter held directly by the block rather than by a submodule."""

    def __init__(self, channels, out_channels):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.se = SqueezeExcite(channels, 4)
        self.conv_pw = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.gamma = nn.Parameter(torch.full((out_channels, 1, 1), 0.5))

    def forward(self, x):
        return self.gamma * self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))


class TimmStyleNet(nn.Module):
    """A small network named as timm names its modules: conv_stem/bn1, blocks.i.j, conv_head, classifier."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 12, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.blocks = nn.Sequential(nn.Sequential(DepthwiseSeparableBlock(12, 12), DepthwiseSeparableBlock(12, 12)),
                                    nn.Sequential(DepthwiseSeparableBlock(12, 20)))
        self.conv_head = nn.Conv2d(20, 24, 1)
        self.classifier = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv_stem(x))))
        return self.classifier(F.relu(self.conv_head(x)).mean((2, 3)))


def plain_convs(model):
    return [n for n, m in model.named_modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)]


FREEZING = [
    pytest.param("resnet18", cf.CoLoRAConfig(target_modules=lambda n, m: m.kernel_size != (1, 1)),
                 lambda n: n != "" and "downsample" not in n and n.endswith(("conv1", "conv2")), [],
                 id="resnet18-kxk-only"),
    pytest.param("resnet18", cf.CoLoRAConfig(target_modules=r"^layer[34]\.", exclude_modules=r"downsample",
                                             modules_to_save=["fc"], train_bias=True),
                 lambda n: n.startswith(("layer3.", "layer4.")) and "downsample" not in n, ["fc"],
                 id="resnet18-regex-save-fc"),
    pytest.param("resnet18", cf.CoLoRAConfig(target_modules="all", modules_to_save=["fc", "layer4.1.bn2"],
                                             order="depthwise_first"),
                 lambda n: True, ["fc", "layer4.1.bn2"], id="resnet18-all-save-fc-bn"),
    # The default: the convs whose adapter is smaller than their weight, i.e. all but the 1×1 downsamples.
    pytest.param("resnet18", cf.CoLoRAConfig(modules_to_save=["fc"]), lambda n: "downsample" not in n, ["fc"],
                 id="resnet18-default-save-fc"),
    # Only the stem: conv_dw is depthwise, conv_pw, the SE convs and conv_head are 1×1.
    pytest.param("timm", cf.CoLoRAConfig(), lambda n: n == "conv_stem", [], id="timm-default"),
    pytest.param("timm", cf.CoLoRAConfig(target_modules=r"conv_(dw|pw|stem)$", modules_to_save=["classifier"]),
                 lambda n: n.endswith(("conv_dw", "conv_pw", "conv_stem")), ["classifier"], id="timm-regex"),
    pytest.param("timm", cf.CoLoRAConfig(target_modules=["blocks.0.1.conv_dw", "conv_head"],
                                         modules_to_save=["se"]),
                 lambda n: n in ("blocks.0.1.conv_dw", "conv_head"),
                 ["blocks.0.0.se", "blocks.0.1.se", "blocks.1.0.se"], id="timm-names-save-every-se"),
]


@pytest.mark.parametrize("arch, config, wrapped, saved", FREEZING)
def test_get_colora_model_freezes_as_peft(resnet18, arch, config, wrapped, saved):
    model = resnet18() if arch == "resnet18" else TimmStyleNet().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected_out = model(x)
    before = dict(model.named_parameters())
    expected_wrapped = sorted(n for n in plain_convs(model) if wrapped(n))
    in_saved = lambda name: any(name.startswith(s + ".") for s in saved)  # noqa: E731

    assert cf.get_colora_model(model, config) is model

    assert sorted(n for n, _ in cf.colora_layers(model)) == expected_wrapped
    after = dict(model.named_parameters())
    adapters = {f"{n}.{a}" for n, layer in cf.colora_layers(model) for a in ADAPTER_NAMES
                if getattr(layer, a) is not None}
    assert set(after) == set(before) | adapters
    for name, param in after.items():
        if name in before:
            assert param is before[name], f"{name} was replaced"
        assert param.requires_grad == (name in adapters or in_saved(name)), name
    if arch == "timm":
        assert not model.blocks[0][0].gamma.requires_grad, "a parameter held outside any submodule stays frozen"
    counts = cf.count_parameters(model)
    assert counts["adapter"] == sum(after[n].numel() for n in adapters)
    assert counts["trainable"] == counts["adapter"] + sum(p.numel() for n, p in before.items() if in_saved(n))
    with torch.no_grad():
        assert torch.equal(model(x), expected_out), "a freshly wrapped model must reproduce the original"

    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        opt.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, values[name])
        # Kp's first gradient is zero (∂ΔK/∂Kp = Kd = 0), its second is not: two steps move every trainable one.
        assert changed == param.requires_grad, f"{name}: changed={changed}, requires_grad={param.requires_grad}"


@pytest.mark.parametrize("config", [cf.CoLoRAConfig(target_modules=lambda n, m: m.kernel_size != (1, 1)),
                                    cf.CoLoRAConfig()], ids=["kxk-callable", "default"])
def test_resnet18_kxk_trains_only_its_adapters(resnet18, capsys, config):
    """The issue's count: the k×k convs' adapters are 1,258,496 parameters, and nothing else trains; the default
    config picks exactly those convs."""
    model = cf.get_colora_model(resnet18(), config)
    cf.print_trainable_parameters(model)
    line = capsys.readouterr().out
    from peft import PeftModel

    # PEFT's own method, fed the same counts, must print the same line.
    PeftModel.print_trainable_parameters(types.SimpleNamespace(get_nb_trainable_parameters=lambda: (
        1_258_496, 11_689_512 + 1_258_496)))
    assert line == capsys.readouterr().out
    assert line == "trainable params: 1,258,496 || all params: 12,948,008 || trainable%: 9.7196\n"


@pytest.mark.parametrize("config, problem", [
    (cf.CoLoRAConfig(modules_to_save=["head"]), "head"),
    (cf.CoLoRAConfig(modules_to_save=["layer4"]), "layer4"),
    (cf.CoLoRAConfig(target_modules=r"^nothing$"),
     r"get_colora_model: target_modules='\^nothing\$', exclude_modules=None select no conv of the model's 20 convs: "
     r"conv1, layer1\.0\.conv1, .*, layer2\.0\.downsample\.0 \(12 more\); target_modules='all' wraps every conv"),
    (cf.CoLoRAConfig(exclude_modules=r"^(conv1|layer)"),
     r"target_modules=None \(the default: the convs whose adapter is smaller than their weight\), "
     r"exclude_modules='\^\(conv1\|layer\)' select no conv"),
    (cf.CoLoRAConfig(modules_to_save=["layer1", "layer2", "layer3", "layer4", "conv1"]),
     r"get_colora_model: modules_to_save picks 13 modules holding convs that target_modules selects: conv1, layer1, "
     r"layer1\.0\.conv1, layer1\.1\.conv1, layer2, layer2\.0\.conv1, layer2\.1\.conv1, layer3 \(5 more\); "),
], ids=["unknown-module-to-save", "module-to-save-is-wrapped", "no-target", "default-target-all-excluded",
        "many-modules-to-save-wrapped"])
def test_get_colora_model_bad_config_changes_nothing(resnet18, config, problem):
    model = resnet18()
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=problem):
        cf.get_colora_model(model, config)
    assert dict(model.named_modules()) == modules
    assert all(p.requires_grad for p in model.parameters())


CONFIGS = [
    cf.CoLoRAConfig(),
    cf.CoLoRAConfig(target_modules="all", unsupported="skip", rank=2),
    cf.CoLoRAConfig(target_modules=r"^layer[34]\.", exclude_modules=["layer4.0.downsample.0"],
                    modules_to_save=["fc"], order="depthwise_first", train_bias=True, backend="torch"),
    cf.CoLoRAConfig(target_modules=("conv1", "layer1.0.conv2"), modules_to_save="fc", train_bias=False),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["defaults", "all-skip", "regex", "names"])
def test_config_json_round_trip(resnet18, config):
    text = json.dumps(config.to_dict())
    restored = cf.CoLoRAConfig.from_dict(json.loads(text))
    assert restored == config
    a, b = cf.get_colora_model(resnet18(), config), cf.get_colora_model(resnet18(), restored)
    assert [n for n, _ in cf.colora_layers(a)] == [n for n, _ in cf.colora_layers(b)]
    assert [(n, p.requires_grad) for n, p in a.named_parameters()] == \
        [(n, p.requires_grad) for n, p in b.named_parameters()]


def test_config_refuses_what_it_cannot_hold():
    def kxk(name, module):
        return module.kernel_size != (1, 1)

    with pytest.raises(TypeError, match="target_modules is a callable .*kxk.* no JSON form"):
        cf.CoLoRAConfig(target_modules=kxk).to_dict()
    with pytest.raises(TypeError, match="exclude_modules is a callable"):
        cf.CoLoRAConfig(exclude_modules=lambda n, m: False).to_dict()
    with pytest.raises(ValueError, match="unknown keys lora_alpha, target_module"):
        cf.CoLoRAConfig.from_dict({"target_module": "conv", "lora_alpha": 8})
    with pytest.raises(ValueError, match="order"):
        cf.CoLoRAConfig(order="separable")
    with pytest.raises(ValueError, match="backend"):
        cf.CoLoRAConfig.from_dict({"backend": "cuda"})
    with pytest.raises(TypeError, match="target_modules"):
        cf.CoLoRAConfig(target_modules=3)
    with pytest.raises(TypeError, match="modules_to_save"):
        cf.CoLoRAConfig(modules_to_save=[nn.Linear])
    with pytest.raises(TypeError, match="train_bias"):
        cf.CoLoRAConfig(train_bias="yes")
    with pytest.raises(ValueError, match=r"unsupported: expected one of \('error', 'skip'\), got 'warn'"):
        cf.CoLoRAConfig.from_dict({"unsupported": "warn"})


def randomize_adapters_(model, scale=0.05):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in cf.colora_layers(model):
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_merge_and_unload(resnet18):
    model = cf.get_colora_model(resnet18(), cf.CoLoRAConfig(train_bias=True))
    names = [n for n, _ in cf.colora_layers(model)]
    randomize_adapters_(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    expected_delta = {n: layer.weight + layer.delta_weight() for n, layer in cf.colora_layers(model)}

    assert cf.merge_and_unload(model) is model

    assert not cf.colora_layers(model)
    for name in names:
        conv = model.get_submodule(name)
        assert type(conv) is nn.Conv2d
        torch.testing.assert_close(conv.weight, expected_delta[name], atol=0, rtol=0)
        assert conv.bias is not None, f"{name}: the trained Δb must survive as a bias"
    assert not any(k.endswith(ADAPTER_NAMES) for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5 * expected.abs().max().item(), rtol=1e-4)
    with pytest.raises(ValueError, match="merge_and_unload: the model has no CoLoRA layer"):
        cf.merge_and_unload(model)


def test_merge_and_unload_refuses_non_finite_and_changes_nothing(resnet18):
    model = cf.get_colora_model(resnet18())
    randomize_adapters_(model)
    name, layer = cf.colora_layers(model)[3]
    with torch.no_grad():
        layer.depthwise[0, 0, 0] = float("nan")
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        cf.merge_and_unload(model)
    assert dict(model.named_modules()) == modules


def test_merge_and_unload_lone_layer():
    conv = nn.Conv1d(4, 6, 3, padding=1)
    layer = cf.CoLoRAConv1d.from_conv(conv)
    randomize_adapters_(nn.Sequential(layer))
    x = torch.randn(2, 4, 9)
    with torch.no_grad():
        expected = layer(x)
        plain = cf.merge_and_unload(layer)
        assert type(plain) is nn.Conv1d
        torch.testing.assert_close(plain(x), expected, atol=1e-6, rtol=1e-5)


def test_disable_colora_sets_and_restores_the_flag(resnet18):
    model = cf.get_colora_model(resnet18(), cf.CoLoRAConfig(target_modules=r"^layer1\."))
    layers = [layer for _, layer in cf.colora_layers(model)]
    layers[0].disable_adapters = True  # a layer the user had switched off stays off afterwards
    with cf.disable_colora(model) as same:
        assert same is model
        assert all(layer.disable_adapters for layer in layers)
        with cf.disable_colora(model):
            assert all(layer.disable_adapters for layer in layers)
        assert all(layer.disable_adapters for layer in layers), "the inner block must restore the outer state"
    assert [layer.disable_adapters for layer in layers] == [True] + [False] * (len(layers) - 1)
    with pytest.raises(RuntimeError, match="boom"):
        with cf.disable_colora(model):
            raise RuntimeError("boom")
    assert [layer.disable_adapters for layer in layers] == [True] + [False] * (len(layers) - 1)
    with pytest.raises(ValueError, match="disable_colora: the model has no CoLoRA layer"):
        with cf.disable_colora(resnet18()):
            pass


def test_disable_colora_runs_the_base_model(resnet18):
    base = resnet18()
    model = cf.get_colora_model(resnet18(), cf.CoLoRAConfig(train_bias=True))
    randomize_adapters_(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted, expected_base = model(x), base(x)
        assert not torch.allclose(adapted, expected_base, atol=1e-3), "the adapters must change the output"
        with cf.disable_colora(model):
            assert torch.equal(model(x), expected_base)
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="inside"):
            with cf.disable_colora(model):
                raise RuntimeError("inside")
        torch.testing.assert_close(model(x), adapted, atol=0, rtol=0)
