"""Whole-model CoLoRA on torchvision networks: apply, train, merge, unapply, adapter state dicts, counting."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import colora_fused as cf

ADAPTER_NAMES = ("pointwise", "depthwise", "bias_delta")
INPUT_SIZE = {"resnet18": 32, "resnet50": 32, "vgg16": 32}


@pytest.fixture(scope="module")
def pristine():
    """One untouched instance per architecture (weights=None, fixed seed); tests work on deep copies."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(1)
            cache[arch] = getattr(torchvision.models, arch)(weights=None).eval()
        return copy.deepcopy(cache[arch])

    return get


def image(arch, batch=1, seed=7):
    size = INPUT_SIZE[arch]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def plain_convs(model):
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]


def colora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cf.CoLoRAConv2d)]


def adapter_tensors(model):
    return {f"{n}.{a}": getattr(m, a) for n, m in colora_modules(model) for a in ADAPTER_NAMES
            if getattr(m, a) is not None}


def randomize_adapters_(model, seed=11, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_tensors(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def clone_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close_fp32(actual, expected, name=""):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, atol=2e-5 * scale, rtol=1e-4, msg=lambda m: f"{name}: {m}")


SELECTIONS = [
    pytest.param("resnet18", dict(include=r"^layer1\..*conv\d$"),
                 lambda n, m: n.startswith("layer1.") and "downsample" not in n, id="resnet18-regex"),
    pytest.param("resnet18", dict(include=["conv1", "layer4.1.conv2", "layer2.0.downsample.0"]),
                 lambda n, m: n in ("conv1", "layer4.1.conv2", "layer2.0.downsample.0"), id="resnet18-names"),
    pytest.param("resnet18", dict(exclude=r"downsample"), lambda n, m: "downsample" not in n,
                 id="resnet18-exclude-regex"),
    pytest.param("resnet18", dict(include=r"^layer[34]\.", exclude=["layer3.0.downsample.0", "layer4.1.conv1"]),
                 lambda n, m: n.startswith(("layer3.", "layer4.")) and n not in ("layer3.0.downsample.0",
                                                                                 "layer4.1.conv1"),
                 id="resnet18-include-and-exclude"),
    pytest.param("resnet50", dict(include=lambda n, m: m.kernel_size != (1, 1)),
                 lambda n, m: m.kernel_size != (1, 1), id="resnet50-callable-kxk-only"),
    pytest.param("resnet50", dict(order="depthwise_first"), lambda n, m: True, id="resnet50-all-depthwise-first"),
    pytest.param("vgg16", dict(), lambda n, m: True, id="vgg16-all"),
    pytest.param("resnet18", dict(include="all", exclude=r"^layer4"), lambda n, m: not n.startswith("layer4"),
                 id="resnet18-all-keyword"),
]


@pytest.mark.parametrize("arch, kwargs, expect", SELECTIONS)
def test_apply_colora_selection(pristine, arch, kwargs, expect):
    model = pristine(arch)
    x = image(arch)
    with torch.no_grad():
        expected_out = model(x)
    before_modules = dict(model.named_modules())
    before_params = dict(model.named_parameters())
    before_state = clone_state(model)
    expected_names = sorted(n for n, m in plain_convs(model) if expect(n, m))
    assert expected_names, "the selection under test must match something"

    names = cf.apply_colora(model, **kwargs)

    assert sorted(names) == expected_names
    order = kwargs.get("order", "pointwise_first")
    for name, module in model.named_modules():
        old = before_modules.get(name)
        if name in expected_names:
            assert type(module) is cf.CoLoRAConv2d
            assert module.weight is old.weight, f"{name}: base weight copied instead of reused"
            assert module.bias is old.bias
            kd_channels = module.out_channels if order == "pointwise_first" else module.in_channels
            assert module.depthwise.shape == (kd_channels, *module.kernel_size)
            assert (module.bias_delta is None) == (old.bias is None)
        elif isinstance(old, nn.Conv2d):
            assert module is old, f"{name} was replaced without being selected"
    frozen = {f"{n}.{p}" for n in expected_names for p in ("weight", "bias")}
    for name, param in before_params.items():
        assert param.requires_grad == (name not in frozen), name
    for name, p in adapter_tensors(model).items():
        assert p.requires_grad, name
    after_params = dict(model.named_parameters())
    for name, param in before_params.items():
        assert after_params[name] is param, f"{name} is not the same tensor any more"
    state = model.state_dict()
    for key, value in before_state.items():
        assert torch.equal(state[key], value), f"{key} changed"
    assert set(state) - set(before_state) == set(adapter_tensors(model))
    with torch.no_grad():
        assert torch.equal(model(x), expected_out), "a freshly wrapped model must reproduce the original exactly"


@pytest.mark.parametrize("kwargs", [dict(include=r"^no_such_layer$"), dict(include=[]), dict(exclude=r"."),
                                    dict(include=lambda n, m: False), dict(include=["fc"])],
                         ids=["regex", "empty-list", "exclude-all", "callable", "non-conv-name"])
def test_apply_colora_matching_nothing_raises_and_changes_nothing(pristine, kwargs):
    model = pristine("resnet18")
    before_state = clone_state(model)
    before_modules = dict(model.named_modules())
    with pytest.raises(ValueError) as info:
        cf.apply_colora(model, **kwargs)
    message = str(info.value)
    # The caller's own argument names, the count, the first convs, then how many more.
    assert message.startswith(f"apply_colora: include={kwargs.get('include')!r}, exclude={kwargs.get('exclude')!r}")
    assert "the model's 20 convs: conv1, layer1.0.conv1, layer1.0.conv2," in message
    assert message.endswith("layer2.0.downsample.0 (12 more)"), message
    assert "layer4.1.conv2" not in message, "a long list must be cut, not printed whole"
    assert dict(model.named_modules()) == before_modules
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key])


@pytest.mark.parametrize("kwargs", [dict(order="separable"), dict(backend="cuda")], ids=["order", "backend"])
def test_apply_colora_bad_order_or_backend_changes_nothing(pristine, kwargs):
    model = pristine("resnet18")
    with pytest.raises(ValueError):
        cf.apply_colora(model, **kwargs)
    assert not colora_modules(model)
    assert all(p.requires_grad for p in model.parameters())


def test_apply_colora_wraps_a_shared_conv_once():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.ReLU(), shared)
    names = cf.apply_colora(model, exclude=["0"])
    assert sorted(names) == ["1", "3"]
    assert model[1] is model[3] and isinstance(model[1], cf.CoLoRAConv2d)
    assert model[1].weight is shared.weight
    assert cf.count_parameters(model)["adapter"] == 4 * 4 + 4 * 9 + 4


def test_training_step_changes_only_adapters_and_user_trainable(pristine):
    model = pristine("resnet18")
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    names = cf.apply_colora(model, train_bias=True)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"} | {f"{n}.{a}" for n in names for a in ADAPTER_NAMES}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = image("resnet18", batch=2), torch.tensor([3, 500])

    F.cross_entropy(model(x), y).backward()
    for name, layer in colora_modules(model):
        # With Kd = 0 the pointwise gradient is exactly zero: ∂ΔK/∂Kp = Kd.
        assert torch.count_nonzero(layer.pointwise.grad) == 0, name
        assert torch.count_nonzero(layer.depthwise.grad) > 0, name
        assert torch.count_nonzero(layer.bias_delta.grad) > 0, name
        assert layer.weight.grad is None
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()

    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), f"{name}: changed={changed}, trainable={name in trainable}"


def test_merge_colora_keeps_output_and_clears_optimizer_state(pristine):
    model = pristine("resnet18")
    for p in model.parameters():
        p.requires_grad_(False)
    model.fc.requires_grad_(True)
    cf.apply_colora(model, include=lambda n, m: m.kernel_size == (3, 3), train_bias=True)
    adapters = adapter_tensors(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    x, y = image("resnet18", batch=2), torch.tensor([1, 2])
    model.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.count_nonzero(m.depthwise) > 0 for _, m in colora_modules(model))
    fc_state = {k: v.clone() for k, v in opt.state[model.fc.weight].items()}
    old_kp = {n: m.pointwise.detach().clone() for n, m in colora_modules(model)}
    model.eval()
    with torch.no_grad():
        before = model(x)

    cf.merge_colora(model, opt)

    with torch.no_grad():
        assert_close_fp32(model(x), before, "output after merge")
    for name, layer in colora_modules(model):
        assert torch.count_nonzero(layer.depthwise) == 0 and torch.count_nonzero(layer.bias_delta) == 0
        assert not torch.equal(layer.pointwise, old_kp[name])
    for name, p in adapters.items():
        state = opt.state.get(p, {})
        assert not state or (float(state["step"]) == 0 and torch.count_nonzero(state["exp_avg"]) == 0), \
            f"stale AdamW state kept for {name}"
    for key, value in fc_state.items():
        assert torch.equal(opt.state[model.fc.weight][key], value), f"fc state {key} was touched"

    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert float(opt.state[model.fc.weight]["step"]) == 3
    for name, p in adapters.items():
        if name.endswith("depthwise"):
            assert float(opt.state[p]["step"]) == 1, f"{name}: step not reset"
            assert torch.count_nonzero(p) > 0, f"{name} did not train after the merge"


def test_merge_colora_non_finite_changes_nothing(pristine):
    model = pristine("resnet18")
    cf.apply_colora(model)
    randomize_adapters_(model)
    layers = colora_modules(model)
    with torch.no_grad():
        layers[-1][1].depthwise[0, 0, 0] = float("inf")
    before = clone_state(model)
    with pytest.raises(ValueError):
        cf.merge_colora(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_unapply_colora(pristine, arch):
    model = pristine(arch)
    n_convs = len(plain_convs(model))
    names = cf.apply_colora(model)
    randomize_adapters_(model)
    x = image(arch)
    with torch.no_grad():
        expected = model(x)
    assert sorted(cf.unapply_colora(model)) == sorted(names)
    assert not colora_modules(model)
    assert len(plain_convs(model)) == n_convs
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in names)
    assert not any(k.endswith(ADAPTER_NAMES) for k in model.state_dict())
    with torch.no_grad():
        assert_close_fp32(model(x), expected, "output after unapply")


@pytest.mark.parametrize("arch", ["resnet18", "vgg16"])
def test_colora_state_dict_holds_only_adapters(pristine, arch):
    model = pristine(arch)
    names = cf.apply_colora(model, order="depthwise_first")
    randomize_adapters_(model)
    sd = cf.colora_state_dict(model, include_trainable=False, include_norm_stats=False)
    has_bias = arch == "vgg16"
    expected = {f"{n}.{a}" for n in names for a in ADAPTER_NAMES if a != "bias_delta" or has_bias}
    assert set(sd) == expected
    for key, value in sd.items():
        assert torch.equal(value, model.state_dict()[key])


def test_load_colora_state_dict_round_trip(pristine, tmp_path):
    source, target = pristine("vgg16"), pristine("vgg16")
    cf.apply_colora(source)
    cf.apply_colora(target)
    randomize_adapters_(source, seed=1)
    randomize_adapters_(target, seed=2)
    path = tmp_path / "adapters.pt"
    torch.save(cf.colora_state_dict(source), path)
    cf.load_colora_state_dict(target, torch.load(path, weights_only=True))
    for key, value in cf.colora_state_dict(source).items():
        assert torch.equal(cf.colora_state_dict(target)[key], value), key
    x = image("vgg16")
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


@pytest.mark.parametrize("problem", ["missing", "unexpected", "mis-shaped", "not-a-tensor"])
def test_load_colora_state_dict_mismatch_changes_nothing(pristine, problem):
    source, target = pristine("resnet18"), pristine("resnet18")
    cf.apply_colora(source)
    cf.apply_colora(target)
    randomize_adapters_(source, seed=1)
    randomize_adapters_(target, seed=2)
    sd = dict(cf.colora_state_dict(source))
    keys = list(sd)
    bad_key = keys[-1]
    if problem == "missing":
        del sd[bad_key]
    elif problem == "unexpected":
        bad_key = "layer9.0.conv1.pointwise"
        sd[bad_key] = torch.zeros(3, 3)
    elif problem == "not-a-tensor":
        sd[bad_key] = sd[bad_key].tolist()
    else:
        sd[bad_key] = torch.zeros(sd[bad_key].shape[0] + 1, *sd[bad_key].shape[1:])
    before = {k: v.detach().clone() for k, v in cf.colora_state_dict(target).items()}
    assert not torch.equal(before[keys[0]], sd[keys[0]]), "the first key must be detectable if it loaded"
    with pytest.raises(ValueError, match=bad_key.replace(".", r"\.")):
        cf.load_colora_state_dict(target, sd)
    after = cf.colora_state_dict(target)
    assert torch.equal(after[keys[0]], before[keys[0]]), "a partial load happened"
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_plain_checkpoint_loads_into_wrapped_model(pristine, tmp_path):
    original = pristine("resnet18")
    path = tmp_path / "resnet18.pt"
    torch.save(original.state_dict(), path)
    torch.manual_seed(123)
    model = torchvision.models.resnet18(weights=None).eval()
    cf.apply_colora(model)
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == sorted(cf.colora_state_dict(model, include_trainable=False,
                                                                      include_norm_stats=False))
    assert result.unexpected_keys == []
    x = image("resnet18")
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


def _adapter_size(c_in, c_out, k, bias, order="pointwise_first"):
    kd_channels = c_out if order == "pointwise_first" else c_in
    return c_out * c_in + kd_channels * k * k + (c_out if bias else 0)


# resnet18's 3×3 convs (c_in, c_out), written out by hand; none has a bias.
RESNET18_3X3 = ([(64, 64)] * 4 + [(64, 128)] + [(128, 128)] * 3 + [(128, 256)] + [(256, 256)] * 3
                + [(256, 512)] + [(512, 512)] * 3)
VGG16_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256), (256, 512),
               (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]


@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
def test_count_parameters_resnet18(pristine, order):
    model = pristine("resnet18")
    assert cf.count_parameters(model) == {"total": 11_689_512, "trainable": 11_689_512, "adapter": 0}
    cf.apply_colora(model, include=lambda n, m: m.kernel_size == (3, 3), order=order)
    adapter = sum(_adapter_size(ci, co, 3, False, order) for ci, co in RESNET18_3X3)
    frozen = sum(co * ci * 9 for ci, co in RESNET18_3X3)
    assert cf.count_parameters(model) == {"total": 11_689_512 + adapter, "trainable": 11_689_512 - frozen + adapter,
                                          "adapter": adapter}


def test_count_parameters_vgg16_frozen_backbone(pristine):
    model = pristine("vgg16")
    total = sum(co * ci * 9 + co for ci, co in VGG16_CONVS) + (25088 * 4096 + 4096) + (4096 * 4096 + 4096) \
        + (4096 * 1000 + 1000)
    assert total == 138_357_544
    for p in model.parameters():
        p.requires_grad_(False)
    cf.apply_colora(model)
    adapter = sum(_adapter_size(ci, co, 3, True) for ci, co in VGG16_CONVS)
    assert cf.count_parameters(model) == {"total": total + adapter, "trainable": adapter, "adapter": adapter}


def test_apply_colora_twice_names_the_colora_layers_and_changes_nothing(pristine):
    model = pristine("resnet18")
    cf.apply_colora(model, include=r"^layer1\.")
    modules = dict(model.named_modules())
    with pytest.raises(ValueError, match=r"apply_colora: the selection holds 4 CoLoRA layers already: "
                                         r"layer1\.0\.conv1, layer1\.0\.conv2, layer1\.1\.conv1, layer1\.1\.conv2;"):
        cf.apply_colora(model)
    assert dict(model.named_modules()) == modules
    with pytest.raises(ValueError, match=r"the selection holds 1 CoLoRA layer already: layer1\.1\.conv2;"):
        cf.apply_colora(model, include=["layer2.0.conv1", "layer1.1.conv2"])
    assert dict(model.named_modules()) == modules
    assert cf.apply_colora(model, include=r"^layer2\.0\.conv") == ["layer2.0.conv1", "layer2.0.conv2"]


@pytest.mark.parametrize("call", [cf.merge_colora, cf.unapply_colora, cf.merge_and_unload],
                         ids=["merge_colora", "unapply_colora", "merge_and_unload"])
def test_model_without_colora_layers_is_an_error(pristine, call):
    model = pristine("vgg16")
    with pytest.raises(ValueError, match=f"{call.__name__}: the model has no CoLoRA layer"):
        call(model)


def test_merge_colora_with_an_optimizer_not_holding_the_adapters_changes_nothing(pristine):
    model = pristine("resnet18")
    cf.apply_colora(model, include=r"^layer4\.")
    randomize_adapters_(model)
    opt = torch.optim.Adam(model.fc.parameters(), lr=1e-3)
    F.cross_entropy(model(image("resnet18")), torch.tensor([1])).backward()
    opt.step()
    before_state = clone_state(model)
    before_opt = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"does not hold the trainable adapter tensors layer4\.0\.conv1\.pointwise"):
        cf.merge_colora(model, opt)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_state[key]), f"{key} changed"
    after_opt = opt.state_dict()
    assert after_opt["param_groups"] == before_opt["param_groups"]
    for index, state in before_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(after_opt["state"][index][key], value)


def _loaded_pair(pristine):
    source, target = pristine("vgg16"), pristine("vgg16")
    cf.apply_colora(source, include=r"^features\.(0|2)$")
    cf.apply_colora(target, include=r"^features\.(0|2)$")
    randomize_adapters_(source, seed=1)
    randomize_adapters_(target, seed=2)
    return dict(cf.colora_state_dict(source)), target


HOSTILE = {
    "float64": (lambda sd, k: sd.__setitem__(k, sd[k].double()), "wrong dtype: {key}: torch.float64 vs torch.float32"),
    "nan": (lambda sd, k: sd[k].view(-1)[3].fill_(float("nan")), "non-finite values: {key}"),
    "inf": (lambda sd, k: sd[k].view(-1)[0].fill_(float("-inf")), "non-finite values: {key}"),
    "meta": (lambda sd, k: sd.__setitem__(k, sd[k].to("meta")), "meta tensors without data: {key}"),
    "extra-nested-key": (lambda sd, k: sd.__setitem__(k + ".extra", torch.zeros(2)), "unexpected: {key}.extra"),
    "nested-dict": (lambda sd, k: sd.__setitem__("optimizer", {"state": {}, "lr": 0.1}), "nested dicts .*: optimizer"),
}


@pytest.mark.parametrize("problem", list(HOSTILE))
def test_load_colora_state_dict_hostile_values_change_nothing(pristine, problem):
    sd, target = _loaded_pair(pristine)
    spoil, message = HOSTILE[problem]
    key = "features.2.depthwise"
    sd = {k: v.clone() for k, v in sd.items()}
    spoil(sd, key)
    before = {k: v.clone() for k, v in cf.colora_state_dict(target).items()}
    with pytest.raises(ValueError, match=message.format(key=key).replace(".", r"\.").replace(r"\.*", ".*")):
        cf.load_colora_state_dict(target, sd)
    for k, v in cf.colora_state_dict(target).items():
        assert torch.equal(v, before[k]), f"{k} was loaded"


def test_load_colora_state_dict_of_a_whole_checkpoint_is_refused(pristine):
    sd, target = _loaded_pair(pristine)
    before = {k: v.clone() for k, v in cf.colora_state_dict(target).items()}
    with pytest.raises(ValueError, match=r"(?s)nested dicts .*: adapters\n.*missing: .*features\.0\.bias_delta"):
        cf.load_colora_state_dict(target, {"adapters": sd, "epoch": torch.tensor(3)})
    for k, v in cf.colora_state_dict(target).items():
        assert torch.equal(v, before[k])


def test_load_colora_state_dict_takes_non_contiguous_tensors(pristine):
    sd, target = _loaded_pair(pristine)
    sd = {k: v.t().contiguous().t() if v.dim() == 2 else v for k, v in sd.items()}
    assert not sd["features.0.pointwise"].is_contiguous()
    cf.load_colora_state_dict(target, sd)
    for k, v in cf.colora_state_dict(target).items():
        assert torch.equal(v, sd[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_colora_state_dict_moves_cpu_tensors_to_the_model(pristine):
    sd, target = _loaded_pair(pristine)
    target.cuda()
    cf.load_colora_state_dict(target, sd)
    for k, v in cf.colora_state_dict(target).items():
        assert v.is_cuda and torch.equal(v.cpu(), sd[k]), k
