"""serialization: atomic writes (also under SIGKILL), and save_merged / load_merged against the float64 formula."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused import serialization
from colora_fused.serialization import atomic_write, load_merged, merged_state_dict, save_merged

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def net(dtype=torch.float64):
    """Convs of every kind save_merged must fold: grouped with bias, bias-free (gains a bias from Δb), 1d, 3d.
    Input [N, 3, 9, 7]."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, (3, 1), stride=2, bias=False), nn.Flatten(2),
        nn.Conv1d(5, 4, 2, dilation=2), nn.Unflatten(2, (1, 2, 7)), nn.Conv3d(4, 2, 1),
    ).to(dtype)


def trained(order, dtype=torch.float64):
    model = net(dtype)
    cf.apply_colora(model, include=["0", "3", "5"], order=order, train_bias=True, backend="reference")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # adapters away from their zero initialisation
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        model[1].running_mean.uniform_(-1, 1, generator=g)
    return model


def expected_delta(layer):
    """ΔK[o, c, *k] from the paper's formulas (design §1), written out with an einsum in float64."""
    kp, kd = layer.pointwise.double(), layer.depthwise.double()
    if layer.order == "pointwise_first":
        return torch.einsum("oc,o...->oc...", kp, kd)
    per_group = layer.in_channels // layer.groups
    rows = torch.arange(layer.out_channels) // (layer.out_channels // layer.groups) * per_group
    kd_oc = kd[rows[:, None] + torch.arange(per_group)[None, :]]  # Kd[g(o)·C_in/groups + c]
    return kp[(slice(None), slice(None)) + (None,) * (kd.dim() - 1)] * kd_oc


class Config:
    def to_dict(self):
        return {"target_modules": ["0", "3"], "order": "pointwise_first"}


@pytest.mark.parametrize("order", ["pointwise_first", "depthwise_first"])
def test_save_merged_matches_formula_and_leaves_model_alone(tmp_path, order):
    model = trained(order)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "m.safetensors"
    save_merged(model, str(path), config=Config())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model[3].bias is None  # the model was not merged in place

    sd, meta = load_merged(str(path))
    assert meta == {"version": cf.__version__, "config": Config().to_dict(), "merged_layers": ["0", "3", "5"]}
    assert not any(k.endswith(("pointwise", "depthwise", "bias_delta")) for k in sd)
    for name in ("0", "3", "5"):
        layer = model.get_submodule(name)
        torch.testing.assert_close(sd[f"{name}.weight"], layer.weight + expected_delta(layer), rtol=0, atol=1e-12)
        base_bias = layer.bias if layer.bias is not None else 0
        torch.testing.assert_close(sd[f"{name}.bias"], base_bias + layer.bias_delta, rtol=0, atol=0)
    assert torch.equal(sd["7.weight"], before["7.weight"])
    assert torch.equal(sd["1.running_mean"], before["1.running_mean"])

    plain = net()  # the original architecture, bias-free conv given a bias, loads the file strictly
    plain[3] = nn.Conv2d(6, 5, (3, 1), stride=2, dtype=torch.float64)
    plain.load_state_dict(sd)
    model.eval(), plain.eval()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-10, atol=1e-10)


def test_merged_state_dict_keeps_key_order_and_shared_tensors_save():
    model = trained("pointwise_first", torch.float32)
    sd = merged_state_dict(model)
    plain = net(torch.float32)
    plain[3] = nn.Conv2d(6, 5, (3, 1), stride=2)
    assert list(sd) == list(plain.state_dict())
    tied = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1))
    tied[1].weight = tied[0].weight  # shared storage, which safetensors refuses unless copied
    sd, _ = load_merged(_save(tied))
    assert torch.equal(sd["0.weight"], sd["1.weight"])


def _save(model, config=None):
    import tempfile

    path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    save_merged(model, path, config)
    return path


def test_config_forms_and_bad_files(tmp_path):
    model = trained("pointwise_first", torch.float32)
    assert load_merged(_save(model, {"a": 1}))[1]["config"] == {"a": 1}
    with pytest.raises(TypeError, match="to_dict"):
        save_merged(model, str(tmp_path / "x.safetensors"), config=object())
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(ValueError, match="does not exist"):
        load_merged(str(tmp_path / "missing.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"junk\.safetensors as safetensors"):
        load_merged(str(tmp_path / "junk.safetensors"))
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"))  # written by something else
    sd, meta = load_merged(str(tmp_path / "other.safetensors"))
    assert meta is None and torch.equal(sd["w"], torch.ones(2))


def test_atomic_write_fsyncs_file_and_folder_and_keeps_old_file_on_error(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(serialization.os, "fsync",
                        lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))

    def fails(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(str(path), fails)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    atomic_write(str(path), lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.bin"]
    assert synced[-2:] == [str(path) + ".partial", str(tmp_path)]  # the data, then the rename


def test_sigkill_inside_atomic_write_leaves_the_old_file(tmp_path):
    """A process killed (SIGKILL, no cleanup) halfway through writing leaves the previous file whole."""
    path = tmp_path / "ck.bin"
    path.write_bytes(b"epoch 1" * 1000)
    code = textwrap.dedent(f"""
        import os, signal
        from colora_fused.serialization import atomic_write
        def write(f):
            f.write(b"epoch 2" * 500)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(path)!r}, write)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == -signal.SIGKILL
    assert path.read_bytes() == b"epoch 1" * 1000
    assert (tmp_path / "ck.bin.partial").exists()  # never read; the next write replaces it
    atomic_write(str(path), lambda f: f.write(json.dumps({"epoch": 2}).encode()))
    assert json.loads(path.read_bytes()) == {"epoch": 2} and sorted(os.listdir(tmp_path)) == ["ck.bin"]


def test_collab_json_is_written_atomically(tmp_path, monkeypatch):
    """collab.run writes collab.json through atomic_write, as every other output."""
    import types

    import numpy as np

    from colora_fused.finetune import collab

    written = []
    monkeypatch.setattr(collab, "atomic_write", lambda path, write: (written.append(path), atomic_write(path, write)))
    monkeypatch.setattr(collab, "run_strategy", lambda strategy, *a: {"strategy": strategy, "task_acc": [1.0],
                                                                      "mean_acc": 1.0, "trained_params": 7})
    splits = types.SimpleNamespace(train=types.SimpleNamespace(labels=np.repeat(np.arange(3), 4)), num_classes=3,
                                   class_names=["a", "b", "c"])
    args = types.SimpleNamespace(tasks=2, task_samples=2, seed=0, task_batches="mixed", out=str(tmp_path))
    collab.run(args, splits, None, "cpu", None, types.SimpleNamespace(message=lambda line: None))
    assert written == [str(tmp_path / "collab.json")] and os.listdir(tmp_path) == ["collab.json"]
    saved = json.loads((tmp_path / "collab.json").read_text())
    assert saved["tasks"] == [[0, 1], [1, 2]] and [r["strategy"] for r in saved["results"]] == list(collab.STRATEGIES)
