"""colora_state_dict / load_colora_state_dict / save_colora: what training changed (adapters, modules to save,
normalisation statistics) round-trips bit for bit, and a state dict that does not fit is refused, all or nothing,
with an error a person can act on."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import colora_fused as cf
from colora_fused.serialization import load_merged, save_merged
from colora_fused.state_dict import SHOWN, save_colora

from conftest import requires_cuda

CONFIG = cf.CoLoRAConfig(modules_to_save=["fc"])
NORM_STATS = ("running_mean", "running_var", "num_batches_tracked")


def wrapped(initial, config=CONFIG):
    return cf.get_colora_model(copy.deepcopy(initial), config)


@pytest.fixture(scope="module")
def initial():
    torch.manual_seed(1)
    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.fixture(scope="module")
def trained(initial):
    """resnet18 (random weights) wrapped with modules_to_save=["fc"], after 3 SGD steps on random 32x32 data."""
    model = wrapped(initial)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def outputs(model):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model.eval()(x)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was loaded"


def _via_dict(model, path):
    return cf.colora_state_dict(model)


def _via_torch_save(model, path):
    torch.save(cf.colora_state_dict(model), path + ".pt")
    return path + ".pt"


def _via_save_colora(model, path):
    save_colora(model, path + ".safetensors", CONFIG)
    return path + ".safetensors"


@pytest.mark.parametrize("save", [_via_dict, _via_torch_save, _via_save_colora], ids=["dict", "pt", "safetensors"])
def test_round_trip_restores_the_trained_model_bitwise(initial, trained, tmp_path, save):
    fresh = wrapped(initial)
    assert not torch.equal(outputs(fresh), outputs(trained))
    cf.load_colora_state_dict(fresh, save(trained, str(tmp_path / "colora")))
    assert torch.equal(outputs(fresh), outputs(trained))


@pytest.mark.parametrize("left_out", ["include_trainable", "include_norm_stats"])
def test_each_part_is_needed(initial, trained, left_out):
    """Without the classifier or without the BatchNorm statistics, the eval outputs are not restored."""
    fresh = wrapped(initial)
    cf.load_colora_state_dict(fresh, cf.colora_state_dict(trained, **{left_out: False}), **{left_out: False})
    assert not torch.equal(outputs(fresh), outputs(trained))


def test_what_the_state_dict_holds(trained):
    bns = [n for n, m in trained.named_modules() if isinstance(m, nn.BatchNorm2d)]
    adapters = {f"{n}.{k}" for n, _ in cf.colora_layers(trained) for k in ("pointwise", "depthwise")}
    stats = {f"{n}.{b}" for n in bns for b in NORM_STATS}
    sd = cf.colora_state_dict(trained)
    assert set(sd) == adapters | {"fc.weight", "fc.bias"} | stats
    assert list(sd)[:2] == ["conv1.pointwise", "conv1.depthwise"]  # the adapters first, keys as in state_dict()
    state = trained.state_dict()
    assert all(torch.equal(v, state[k]) and not v.requires_grad for k, v in sd.items())
    assert int(sd["bn1.num_batches_tracked"]) == 3
    assert set(cf.colora_state_dict(trained, include_trainable=False, include_norm_stats=False)) == adapters
    assert set(cf.colora_state_dict(trained, include_norm_stats=False)) == adapters | {"fc.weight", "fc.bias"}
    assert set(cf.colora_state_dict(trained, include_trainable=False)) == adapters | stats


def test_apply_colora_saves_what_it_left_trainable():
    """apply_colora freezes only the convs it wraps: BatchNorm's affine parameters and the head stay trainable,
    so they are saved; the frozen base weights are not."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    cf.apply_colora(model, include=["0"])
    assert set(cf.colora_state_dict(model)) == {
        "0.pointwise", "0.depthwise", "0.bias_delta", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "2.weight", "2.bias", "4.weight", "4.bias"}


class Stats(nn.Module):
    """Any module with a running_mean buffer keeps statistics; its other buffers go with them, a non-persistent
    one is not in state_dict()."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(4), persistent=False)

    def forward(self, x):
        return x


def test_norm_stats_of_any_layer_that_keeps_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.InstanceNorm2d(4, track_running_stats=True),
                          nn.InstanceNorm2d(4), nn.GroupNorm(2, 4), Stats())
    model.register_buffer("constant", torch.ones(3))  # a buffer of no normalisation layer
    cf.get_colora_model(model)
    assert set(cf.colora_state_dict(model)) == {
        "0.pointwise", "0.depthwise", "1.running_mean", "1.running_var", "1.num_batches_tracked",
        "4.running_mean", "4.count"}


def test_named_adapter_round_trip():
    torch.manual_seed(0)
    initial = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(54, 2))
    source, target = wrapped(initial, cf.CoLoRAConfig(modules_to_save=["3"])), wrapped(
        initial, cf.CoLoRAConfig(modules_to_save=["3"]))
    for model in (source, target):
        cf.add_adapter(model, "task", rank=2)
        cf.set_active_adapters(model, ["default", "task"])
    with torch.no_grad():
        source[0].adapter("task").depthwise.normal_()
        source[3].weight.normal_()
    source.train()(torch.randn(2, 3, 5, 5))
    task = cf.colora_state_dict(source, adapter="task")
    assert set(task) == {"0.colora_adapters.task.pointwise", "0.colora_adapters.task.depthwise",
                         "0.colora_adapters.task.bias_delta", "3.weight", "3.bias", "1.running_mean",
                         "1.running_var", "1.num_batches_tracked"}
    with pytest.raises(ValueError, match="adapter 'task', not 'default': pass adapter=<name>"):
        cf.load_colora_state_dict(target, task)
    cf.load_colora_state_dict(target, task, adapter="task")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source.eval()(x))


def test_save_colora_writes_safetensors_with_the_config(trained, tmp_path):
    path = tmp_path / "colora.safetensors"
    written = save_colora(trained, str(path), CONFIG)
    sd, meta = load_merged(str(path))
    assert meta == {"version": cf.__version__, "config": CONFIG.to_dict(), "adapter": "default",
                    "include_trainable": True, "include_norm_stats": True}
    assert sd.keys() == written.keys() and all(torch.equal(sd[k], written[k]) for k in sd)
    assert cf.CoLoRAConfig.from_dict(meta["config"]) == CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colora.safetensors"]  # no .partial left
    with pytest.raises(TypeError, match="save_colora: config must be a dict or have a to_dict"):
        save_colora(trained, str(tmp_path / "x.safetensors"), config=object())
    assert not (tmp_path / "x.safetensors").exists()


def test_an_unwrapped_model_gets_a_hint(initial, trained, tmp_path):
    path = str(tmp_path / "colora.safetensors")
    save_colora(trained, path, CONFIG)
    plain = copy.deepcopy(initial)
    before = snapshot(plain)
    with pytest.raises(ValueError, match=r"the model has no CoLoRA layer\. Nothing was loaded\.\n  hint: wrap it "
                       r"first with get_colora_model/apply_colora using the same config as the model saved: "
                       r"CoLoRAConfig\(modules_to_save=\['fc'\]\)"):
        cf.load_colora_state_dict(plain, path)
    with pytest.raises(ValueError, match="wrap it first"):
        cf.load_colora_state_dict(plain, cf.colora_state_dict(trained))
    assert_unchanged(plain, before)
    with pytest.raises(ValueError, match="colora_state_dict: the model has no CoLoRA layer"):
        cf.colora_state_dict(plain)


def test_paths_and_other_sources(trained, tmp_path):
    for name in ("adapters.safetensors", "adapters.pt"):
        with pytest.raises(ValueError, match=f"load_colora_state_dict: .*{name} does not exist"):
            cf.load_colora_state_dict(trained, str(tmp_path / name))
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot read .*junk\.pt with torch\.load\(weights_only=True\)"):
        cf.load_colora_state_dict(trained, tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt holds a list, not a state dict"):
        cf.load_colora_state_dict(trained, tmp_path / "list.pt")
    with pytest.raises(TypeError, match="expected a state dict .* or the path of a .safetensors or .pt file, got int"):
        cf.load_colora_state_dict(trained, 3)


def test_another_architecture_counts_first_and_loads_nothing(trained):
    """resnet18's state dict into a rank-2 resnet34: counts on the first line, SHOWN names per kind, then how
    many more, then the hint; no tensor of any kind changes."""
    target = cf.get_colora_model(torchvision.models.resnet34(weights=None, num_classes=10),
                                 cf.CoLoRAConfig(modules_to_save=["fc"], rank=2))
    before = snapshot(target)
    with pytest.raises(ValueError) as info:
        cf.load_colora_state_dict(target, cf.colora_state_dict(trained))
    lines = str(info.value).splitlines()
    n_missing = len(cf.colora_state_dict(target)) - len(cf.colora_state_dict(trained))
    n_adapters = 2 * len(cf.colora_layers(trained))  # Kp and Kd of each (no bias): every one is rank 1, not 2
    assert lines[0] == (f"load_colora_state_dict: {n_missing} missing, {n_adapters} mis-shaped keys — another "
                        "architecture or config? Nothing was loaded.")
    assert lines[1].startswith("  missing: layer1.2.conv1.pointwise, ") and lines[1].endswith(
        f" ({n_missing - SHOWN} more)") and lines[1].count(",") == SHOWN - 1
    assert lines[2].startswith("  mis-shaped: conv1.pointwise: (64, 3) vs (2, 64, 3), ")
    assert lines[2].endswith(f" ({n_adapters - SHOWN} more)")
    assert lines[3].startswith("  hint: its CoLoRA layers differ from the model's")
    assert len(lines) == 4
    assert_unchanged(target, before)


def test_a_bad_norm_statistic_loads_nothing(initial, trained):
    """All or nothing across kinds: one NaN in a running mean keeps every adapter and the head as they were."""
    fresh = wrapped(initial)
    before = snapshot(fresh)
    sd = {k: v.clone() for k, v in cf.colora_state_dict(trained).items()}
    sd["layer4.1.bn2.running_mean"][0] = float("nan")
    with pytest.raises(ValueError, match=r"1 non-finite key\. Nothing was loaded\.\n  non-finite values: "
                                         r"layer4\.1\.bn2\.running_mean$"):
        cf.load_colora_state_dict(fresh, sd)
    assert_unchanged(fresh, before)


def test_an_adapters_only_state_dict_gets_a_hint(initial, trained):
    """62 = fc's weight and bias + 3 statistics of each of resnet18's 20 BatchNorm layers."""
    fresh = wrapped(initial)
    adapters = cf.colora_state_dict(trained, include_trainable=False, include_norm_stats=False)
    with pytest.raises(ValueError, match=r"62 missing keys\. Nothing was loaded\.\n.*\n  hint: its adapters are "
                       r"complete but not the rest: .* pass include_trainable=False, include_norm_stats=False"):
        cf.load_colora_state_dict(fresh, adapters)
    cf.load_colora_state_dict(fresh, adapters, include_trainable=False, include_norm_stats=False)
    assert all(torch.equal(v, adapters[k]) for k, v in cf.colora_state_dict(fresh, include_trainable=False,
                                                                         include_norm_stats=False).items())


def test_a_head_the_model_does_not_train_gets_a_hint(initial, trained, tmp_path):
    path = str(tmp_path / "colora.safetensors")
    save_colora(trained, path, CONFIG)  # safetensors files keep their keys sorted
    without_head = wrapped(initial, cf.CoLoRAConfig())
    with pytest.raises(ValueError, match=r"2 unexpected keys\. Nothing was loaded\.\n  unexpected: fc\.bias, "
                       r"fc\.weight\n  hint: fc\.bias, fc\.weight are in the model but not trained there: build it "
                       r"with the modules_to_save of the model saved \(get_colora_model\)\n  hint: the file was saved "
                       r"from a model wrapped with CoLoRAConfig\(modules_to_save=\['fc'\]\)$"):
        cf.load_colora_state_dict(without_head, path)


def test_a_whole_checkpoint_and_a_merged_file_get_hints(initial, trained, tmp_path):
    fresh = wrapped(initial)
    n_keys = len(cf.colora_state_dict(fresh))
    with pytest.raises(ValueError, match=rf"1 nested, 1 not-a-tensor, {n_keys} missing keys\. .*\n  nested dicts .*: "
                       r"model\n(.*\n)+  hint: the state dict sits under 'model': pass checkpoint\['model'\]$"):
        cf.load_colora_state_dict(fresh, {"model": cf.colora_state_dict(trained), "epoch": 3})
    path = str(tmp_path / "merged.safetensors")
    save_merged(trained, path)
    with pytest.raises(ValueError, match=r"hint: the file is a merged plain model \(save_merged\): load it with "
                                         r"load_state_dict into the unwrapped architecture$"):
        cf.load_colora_state_dict(fresh, path)


@requires_cuda
def test_a_cpu_state_dict_loads_into_a_cuda_model(initial, trained):
    fresh = wrapped(initial).cuda()
    cf.load_colora_state_dict(fresh, cf.colora_state_dict(trained))
    for key, value in cf.colora_state_dict(fresh).items():
        assert value.is_cuda and torch.equal(value.cpu(), cf.colora_state_dict(trained)[key]), key


def _small(rank=1, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3))
    return cf.get_colora_model(model, cf.CoLoRAConfig(rank=rank))


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    return model


def test_load_adapter_puts_a_default_adapter_under_a_new_name(tmp_path):
    user = _randomised(_small(rank=2))
    path = str(tmp_path / "user.safetensors")
    save_colora(user, path)
    server = _small(rank=2)
    cf.load_adapter(server, path, name="alice")
    assert [layer.colora_adapters["alice"].pointwise.shape[0] for _, layer in cf.colora_layers(server)] == [2, 2]
    for (_, mine), (_, theirs) in zip(cf.colora_layers(server), cf.colora_layers(user)):
        for key in ("pointwise", "depthwise", "bias_delta"):
            assert torch.equal(getattr(mine.adapter("alice"), key), getattr(theirs, key))
    x = torch.randn(2, 3, 9, 9)
    cf.set_active_adapters(server, ["alice"])
    torch.testing.assert_close(server(x), user(x))
    cf.load_adapter(server, cf.colora_state_dict(_small(rank=2, seed=5)), name="alice")  # overwrites in place
    assert torch.equal(server[0].adapter("alice").depthwise, torch.zeros_like(server[0].depthwise))


def test_load_adapter_refuses_all_or_nothing():
    server = _small()
    wrong = cf.colora_state_dict(_small(rank=2))  # rank 2 saved, but the layers' first Kp decides: mismatch
    wrong["0.pointwise"] = wrong["0.pointwise"][0]  # the first layer looks rank 1, the second stays rank 2
    with pytest.raises(ValueError, match="mis-shaped"):
        cf.load_adapter(server, wrong, name="bob")
    assert all(layer.adapter_names() == ["default"] for _, layer in cf.colora_layers(server))
    two = _small()
    cf.add_adapter(two, "x")
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'x'\]"):
        cf.load_adapter(server, {**cf.colora_state_dict(two), **cf.colora_state_dict(two, "x")}, name="bob")
    with pytest.raises(ValueError, match="has no adapter 'y'"):
        cf.load_adapter(server, cf.colora_state_dict(two, "x"), name="bob", saved_adapter="y")
    cf.load_adapter(server, cf.colora_state_dict(two, "x"), name="bob")
    assert server[0].adapter_names() == ["default", "bob"]
