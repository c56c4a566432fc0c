"""colora-finetune end to end on CPU: the digits demo, data paths, resume, export, bad input, torchrun."""
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import colora_fused as cf
from colora_fused.finetune import recipe as finetune
from colora_fused.finetune.data import load_digits_task
from colora_fused.serialization import load_merged

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the demo runs on one thread


# Every run here is the CPU demo (one thread, bit-reproducible), also on a machine with a GPU, where the recipe's
# default device would be CUDA and `auto`'s per-process timing choices would break bit-identical resumes.
CPU = ["--device", "cpu"]


def run(*argv, out):
    return finetune.run([*argv, *CPU, "--no-progress", "--out", str(out)])


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory):
    """A smallcnn pre-trained on digits 0-4 (the demo's first stage, shortened)."""
    out = tmp_path_factory.mktemp("pretrain")
    torch.set_num_threads(1)
    finetune.run(["--strategy", "full", "--pretrain-epochs", "6", "--epochs", "0", *CPU, "--no-progress", "--out",
                  str(out)])
    return str(out / "pretrain" / "model_final.safetensors")


def _random_smallcnn(folder, in_channels=1):
    torch.manual_seed(0)
    spec = finetune.build_model("smallcnn", 5, in_channels)
    path = folder / f"smallcnn_{in_channels}.pt"
    torch.save(spec.model.state_dict(), path)
    return path


# Measured (one thread; the demo's defaults: 8 epochs, batch 32, lr 3e-3, merge every 4 epochs), best-val model's test
# accuracy over seeds 0-4: full 0.972 ± 0.016, colora 0.964 ± 0.011, head 0.915 ± 0.016; per seed colora - full
# ranged over [-0.028, +0.028] and colora - head over [+0.034, +0.078]. Seed 0: 0.972 / 0.978 / 0.939.
# One test image is 0.0056. The thresholds leave margin for other platforms' float differences.
@pytest.mark.parametrize("seed", [0])
def test_digits_demo_colora_close_to_full_and_above_head(tmp_path, seed):
    results = {r["strategy"]: r for r in run("--seed", str(seed), out=tmp_path)}
    assert set(results) == {"colora", "full", "head"}
    colora, full, head = results["colora"], results["full"], results["head"]
    assert full["test_acc"] > 0.93
    assert colora["test_acc"] >= full["test_acc"] - 0.05
    assert colora["test_acc"] >= head["test_acc"] - 0.01
    assert colora["epochs"] == 8 and colora["merges"] == 2
    assert head["trained_params"] < colora["trained_params"] < full["trained_params"]
    assert colora["trained_params"] == colora["adapter_params"] + head["trained_params"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["strategy"] for r in summary] == ["colora", "full", "head"]
    for s in ("pretrain", "colora", "full", "head"):
        assert (tmp_path / s / "model_final.safetensors").exists()


def write_npz(path, classes=3, per_class=(20, 6, 6), hw=12):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in zip(("train", "val", "test"), per_class):
        labels = np.repeat(np.arange(classes), n)
        images = rng.integers(0, 60, size=(labels.size, hw, hw)).astype(np.uint8)
        for c in range(classes):  # a class-dependent bright square: learnable in a few steps
            images[labels == c, 2 * c : 2 * c + 4, 2:6] = 250
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return str(path)


def write_folder(root, classes=3, per_class=8):
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for j in range(per_class):
            img = np.full((10, 10, 3), 20 * j % 60, np.uint8)
            img[2 * c : 2 * c + 4, 2:6] = 250
            Image.fromarray(img).save(root / f"class{c}" / f"{j}.png")
    return str(root)


@pytest.mark.parametrize("source, extra", [("npz", ["--balance", "sample"]), ("npz", ["--balance", "truncate"]),
                                           ("folder", ["--image-size", "12", "--workers", "0"])])
def test_data_end_to_end_outputs_and_export(tmp_path, source, extra):
    data = write_npz(tmp_path / "d.npz") if source == "npz" else write_folder(tmp_path / "imgs")
    out = tmp_path / "out"
    (result,) = run("--data", data, "--model", "smallcnn", "--strategy", "colora", "--epochs", "2", "--batch-size", "8",
                    "--lr", "3e-3", "--class-names", "a,b,c", *extra, out=out)
    d = out / "colora"
    for name in ("history.json", "history.csv", "checkpoint.pt", "best.safetensors", "model_final.safetensors",
                 "metrics.json", "confusion_matrix.png", "roc.png"):
        assert (d / name).exists(), name
    assert (out / "summary.json").exists() and (out / "summary.csv").exists()
    history = json.loads((d / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and {"train_loss", "val_acc", "test_loss"} <= set(history[0])
    m = json.loads((d / "metrics.json").read_text())
    assert (m["test"]["classes"] == ["a", "b", "c"]
            and set(m["test"]["per_class"]) == {"recall", "precision", "specificity", "auc"})
    # the exported model is a plain network (no adapters) that reproduces the run's final test accuracy
    final, meta = load_merged(d / "model_final.safetensors")
    assert not any("pointwise" in k or "depthwise" in k for k in final)
    assert meta["version"] == cf.__version__ and meta["config"]["strategy"] == "colora" and meta["merged_layers"]
    splits = finetune.load_data(data, 12, class_names=None) if source == "npz" else finetune.load_data(data, 12)
    spec = finetune.build_model("smallcnn", 3, splits.in_channels)
    spec.model.load_state_dict(final)
    spec.model.eval()
    x, y = splits.test[list(range(len(splits.test)))] if source == "npz" else _stack(splits.test)
    with torch.no_grad():
        pred = spec.model(finetune.prepare_batch(x, spec, None, torch.device("cpu"), False)).argmax(1)
    assert (pred == y).double().mean().item() == pytest.approx(history[-1]["test_acc"])


def _stack(ds):
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def test_resume_matches_uninterrupted_run(tmp_path, digits_weights):
    common = ["--weights", digits_weights, "--strategy", "colora,head", "--merge-unit", "step", "--merge-every", "7",
              "--batch-size", "64"]
    run(*common, "--epochs", "3", out=tmp_path / "straight")
    run(*common, "--epochs", "2", out=tmp_path / "split")
    ck = torch.load(tmp_path / "split" / "colora" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["merges"] == ck["step"] // 7
    run(*common, "--epochs", "3", "--resume", out=tmp_path / "split")
    for s in ("colora", "head"):
        a = load_merged(tmp_path / "straight" / s / "model_final.safetensors")[0]
        b = load_merged(tmp_path / "split" / s / "model_final.safetensors")[0]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), s
        ha = json.loads((tmp_path / "straight" / s / "history.json").read_text())
        hb = json.loads((tmp_path / "split" / s / "history.json").read_text())

        def drop(h):
            return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in h]

        assert drop(ha) == drop(hb)


def test_checkpoint_holds_adapters_head_and_merged_weights(tmp_path, digits_weights):
    run("--weights", digits_weights, "--strategy", "colora", "--epochs", "1", "--merge-every", "0", out=tmp_path / "a")
    ck = torch.load(tmp_path / "a" / "colora" / "checkpoint.pt", weights_only=True)
    keys = set(ck["model"])
    assert any(k.endswith("pointwise") for k in keys) and any(k.startswith("head.") for k in keys)
    assert not any(k.startswith("features.") and k.endswith(".weight") for k in keys)  # adapters and head only
    run("--weights", digits_weights, "--strategy", "colora", "--epochs", "1", "--merge-every", "1", out=tmp_path / "b")
    merged = torch.load(tmp_path / "b" / "colora" / "checkpoint.pt", weights_only=True)
    assert "features.0.weight" in merged["model"]  # after a merge the update lives in the base weights


def test_rank_and_adaptive_merge_flags(tmp_path, digits_weights):
    """--rank gives every CoLoRA layer r terms; --merge-when merges only once a layer's ||dK||/||K0|| reaches
    it: never for a huge threshold, at every check for a tiny one."""
    common = ["--weights", digits_weights, "--strategy", "colora", "--epochs", "1", "--merge-unit", "step",
              "--merge-every", "5", "--batch-size", "64"]
    never = run(*common, "--rank", "2", "--merge-when", "1e9", out=tmp_path / "never")[0]
    always = run(*common, "--merge-when", "1e-9", "--merge-scope", "model", out=tmp_path / "always")[0]
    assert never["merges"] == 0 and always["merges"] == always["steps"] // 5 > 0
    ck = torch.load(tmp_path / "never" / "colora" / "checkpoint.pt", weights_only=True)
    kp = [v for k, v in ck["model"].items() if k.endswith("pointwise")]
    assert kp and all(v.dim() == 3 and v.shape[0] == 2 for v in kp)
    assert "--merge-when must be a positive number" in _error([*common, "--merge-when", "0"], tmp_path)
    assert "--rank must be >= 1" in _error([*common, "--rank", "0"], tmp_path)


def test_models_and_heads():
    vgg = finetune.build_model("vgg16", 4, 1)
    wrapped = finetune.setup_strategy(vgg, "colora")
    assert len(wrapped) == 13 and all(n.startswith("features.") for n in wrapped)
    assert vgg.model.head.reduce.in_channels == 512 and vgg.model.head.reduce.out_channels == 128
    assert vgg.model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    counts = cf.count_parameters(vgg.model)
    head = sum(p.numel() for p in vgg.model.head.parameters())
    assert counts["trainable"] == counts["adapter"] + head
    res = finetune.build_model("resnet50", 4, 1)
    assert len(finetune.setup_strategy(res, "colora")) == 53 and res.model.head.reduce.in_channels == 2048
    assert all(not p.requires_grad for n, p in res.model.named_parameters() if "bn" in n)
    tv = finetune.build_model("resnet18", 7, 3)
    assert tv.head == ["fc"] and tv.model.fc.out_features == 7
    finetune.setup_strategy(tv, "head")
    assert {n for n, p in tv.model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_torchvision_weights_loaded_and_classifier_resized(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    spec = finetune.build_model("resnet18", 3, 3, finetune.read_state_dict(str(tmp_path / "r18.pth")))
    assert torch.equal(spec.model.conv1.weight, src.conv1.weight) and spec.model.fc.out_features == 3


def _error(argv, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        finetune.main([*argv, *CPU, "--no-progress", "--out", str(out)])
    message = str(e.value.code)
    assert message.startswith("colora-finetune: error:") and "\n" not in message, message
    assert not out.exists()  # nothing trained, nothing written
    return message


def test_bad_input_fails_before_training(tmp_path):
    assert "unknown model 'nosuchnet'" in _error(["--model", "nosuchnet", "--data", write_npz(tmp_path / "d.npz")],
                                                 tmp_path)
    assert "unknown strategy lora" in _error(["--strategy", "colora,lora"], tmp_path)
    assert "does not exist" in _error(["--data", str(tmp_path / "missing.npz")], tmp_path)
    assert "does not exist" in _error(["--weights", str(tmp_path / "missing.pt")], tmp_path)
    bad = dict(np.load(write_npz(tmp_path / "d.npz")))
    bad["val_labels"] = bad["val_labels"] + 5
    np.savez(tmp_path / "bad.npz", **bad)
    assert "outside the 3 classes" in _error(["--data", str(tmp_path / "bad.npz"), "--model", "smallcnn"], tmp_path)
    del bad["test_images"]
    np.savez(tmp_path / "bad2.npz", **bad)
    assert "lacks test_images" in _error(["--data", str(tmp_path / "bad2.npz"), "--model", "smallcnn"], tmp_path)
    misfit = _random_smallcnn(tmp_path, in_channels=3)  # the demo's digits are grayscale
    assert "do not fit smallcnn" in _error(["--weights", str(misfit)], tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot read weights" in _error(["--weights", str(tmp_path / "junk.pt")], tmp_path)
    torch.save({"w": [1, 2]}, tmp_path / "nodict.pt")
    assert "no state dict" in _error(["--weights", str(tmp_path / "nodict.pt")], tmp_path)


def test_cli_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "colora_fused.finetune", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0 and "--merge-every" in r.stdout and "--dump-rank-state" not in r.stdout


def test_torchrun_two_processes_gloo_identical_weights(tmp_path, digits_weights):
    out, dump = tmp_path / "out", tmp_path / "dump"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "colora_fused.finetune", "--weights", digits_weights, "--strategy", "colora", "--epochs", "2",
           "--batch-size", "16", "--merge-unit", "step", "--merge-every", "5", "--device", "cpu", "--no-progress",
           "--out", str(out), "--dump-rank-state", str(dump)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ranks = [torch.load(dump / f"colora_rank{i}.pt", weights_only=True) for i in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    start = load_merged(digits_weights)[0]
    assert not torch.equal(ranks[0]["features.0.weight"], start["features.0.weight"])  # merged updates landed
    history = json.loads((out / "colora" / "history.json").read_text())
    steps = history[-1]["step"]
    # each rank: half the data
    assert steps == 2 * math.ceil(math.ceil(len(load_digits_task(range(5, 10)).train) / 2) / 16)
    assert history[-1]["merges"] == steps // 5
    assert r.stdout.count("[colora] epoch 2/2") == 1  # rank 0 logs alone


# --- crash safety: SIGKILL at random points, then --resume -------------------------------------------------------

ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}  # one thread: CPU runs are bit-reproducible
KILL_SEED, KILLS = 15, 4
TIMES = ("epoch_time_s", "train_time_s", "wall_time_s")


def _cli(data, out, *extra):
    return [sys.executable, "-m", "colora_fused.finetune", "--data", data, "--model", "smallcnn",
            "--strategy", "colora,head", "--epochs", "6", "--batch-size", "8", "--lr", "3e-3", "--merge-unit", "step",
            "--merge-every", "5", "--log-every", "0", *CPU, "--out", str(out), *extra]


def _launch(cmd, stdout_path, kill_at=None, delay=0.0, timeout=120):
    """Run ``cmd`` with stdout in a file (not a terminal); with ``kill_at``, SIGKILL it ``delay`` seconds after
    that line appears. Returns (exit status, seconds from the first output line to the end)."""
    with open(stdout_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
    deadline, first = time.monotonic() + timeout, None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            text = open(stdout_path).read()
            if first is None and text:
                first = time.monotonic()
            if kill_at is not None and kill_at in text:
                time.sleep(delay)
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), time.monotonic() - (first or time.monotonic())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _same(x, y):
    """Bitwise equality of nested checkpoint contents (tensors by dtype and value)."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_same, x, y))
    return x == y


def _untimed(rows):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


def _assert_same_outputs(a, b, strategies=("colora", "head")):
    for s in strategies:
        for name in ("model_final.safetensors", "best.safetensors"):
            (x, mx), (y, my) = load_merged(a / s / name), load_merged(b / s / name)
            assert _same(x, y) and mx == my, f"{s}/{name} differs"
        ca, cb = (torch.load(d / s / "checkpoint.pt", weights_only=True) for d in (a, b))
        ca["history"], cb["history"] = _untimed(ca.pop("history")), _untimed(cb.pop("history"))
        assert _same({k: v for k, v in ca.items() if k not in TIMES},
                     {k: v for k, v in cb.items() if k not in TIMES}), f"{s}/checkpoint.pt differs"
        ha, hb = (json.loads((d / s / "history.json").read_text()) for d in (a, b))
        assert _untimed(ha) == _untimed(hb)
        ma, mb = (json.loads((d / s / "metrics.json").read_text()) for d in (a, b))
        assert (ma["test"] == mb["test"] and ma["best_epoch"] == mb["best_epoch"]
                and _untimed([ma["run"]]) == _untimed([mb["run"]]))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert _untimed(sa) == _untimed(sb)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted CLI run (two strategies, six epochs, step merges), stdout redirected to a file."""
    root = tmp_path_factory.mktemp("straight")
    data = write_npz(root / "d.npz")
    rc, seconds = _launch(_cli(data, root / "out"), root / "stdout.txt")
    stdout = (root / "stdout.txt").read_text()
    assert rc == 0, stdout[-3000:]
    return data, root / "out", stdout


def test_sigkill_at_random_points_then_resume_matches_uninterrupted_run(tmp_path, straight_run):
    data, reference, stdout = straight_run
    # Kill points: seeded picks among the progress lines of the uninterrupted run, in KILLS different epochs, each
    # with a random delay after the line (up to 50 ms: into the next steps, the evaluation, or the file writes; on an
    # idle machine a head-only epoch takes less than 0.1 s, and a longer delay let a run finish before its kill).
    # Epochs at least two apart: the resumed run restarts at most one epoch back, so each line shows up again.
    rng = random.Random(KILL_SEED)
    epochs = [f"[{s}] epoch {e}/6" for s in ("colora", "head") for e in range(1, 7)][:-1]
    picks = sorted(rng.sample(range(0, len(epochs), 2), KILLS))
    attempts = []
    for k, i in enumerate(picks):
        line = f"{epochs[i]} step {rng.randint(1, 8)}/8 "
        assert line in stdout
        rc, _ = _launch(_cli(data, tmp_path / "out", "--resume"), tmp_path / f"attempt{k}.txt", kill_at=line,
                        delay=rng.uniform(0, 0.05))
        attempts.append((line, rc))
    assert [rc for _, rc in attempts] == [-signal.SIGKILL] * KILLS, attempts
    rc, _ = _launch(_cli(data, tmp_path / "out", "--resume"), tmp_path / "final.txt")
    final = (tmp_path / "final.txt").read_text()
    assert rc == 0, final[-3000:]
    resumes = [ln for k in range(1, KILLS) for ln in (tmp_path / f"attempt{k}.txt").read_text().splitlines()
               if "resumed from" in ln]
    assert any(not ln.endswith("epoch 6/6, step 48") for ln in resumes), resumes  # some resumed mid-strategy
    _assert_same_outputs(reference, tmp_path / "out")
    assert not [p for p in (tmp_path / "out").rglob("*.partial")]


def test_progress_lines_and_log_file_when_stdout_is_not_a_terminal(straight_run):
    _, out, stdout = straight_run
    lines = stdout.splitlines()
    step = re.compile(r"^\[colora\] epoch 2/6 step (\d)/8  loss \d+\.\d{4} \| \d+s elapsed, ~\d+s of training left$")
    assert [int(m.group(1)) for m in map(step.match, lines) if m] == list(range(1, 9))  # --log-every 0: every step
    for split in ("val", "test"):  # evaluation has no bar: lines there too
        assert [ln.split(" | ")[0] for ln in lines if ln.startswith(f"[head] epoch 3/6 evaluating {split}")] == \
            [f"[head] epoch 3/6 evaluating {split}: batch {i}/2" for i in (1, 2)]
    for phase in ("data: d.npz", "[colora] training epochs 1-6, 8 steps each", "[colora] writing the final model",
                  "[colora] done: test acc", "[head] training epochs 1-6", "[head] done", "outputs in"):
        assert sum(ln.startswith(phase) for ln in lines) == 1, phase
    epoch_lines = [ln for ln in lines if re.match(r"^\[(colora|head)\] epoch \d/6  train loss", ln)]
    assert len(epoch_lines) == 12 and all(re.search(r"\| \d+s elapsed, ~\d+s left$", ln) for ln in epoch_lines)
    logged = (out / "finetune.log").read_text().splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
    assert all(stamp.match(ln) for ln in logged)
    assert [stamp.sub("", ln) for ln in logged][1:] == lines  # the first logged line is the command itself


def test_progress_interval_is_honoured(tmp_path, monkeypatch, capsys):
    """Lines come at least every --log-every seconds while an epoch trains, and not more often."""
    data = write_npz(tmp_path / "d.npz")
    common = ["--data", data, "--model", "smallcnn", "--strategy", "head", "--epochs", "2", "--batch-size", "8"]
    real = finetune.prepare_batch

    def slow(*a, **k):  # steps of at least 0.05 s: an epoch of 8 steps lasts at least 0.4 s
        if torch.is_grad_enabled():
            time.sleep(0.05)
        return real(*a, **k)

    monkeypatch.setattr(finetune, "prepare_batch", slow)
    run(*common, "--log-every", "0.15", out=tmp_path / "a")
    lines = capsys.readouterr().out.splitlines()
    per_epoch = [sum(f"[head] epoch {e}/2 step" in ln for ln in lines) for e in (1, 2)]
    assert all(n >= 2 for n in per_epoch), per_epoch
    run(*common, "--log-every", "1000", out=tmp_path / "b")
    assert " step " not in capsys.readouterr().out


def test_unusable_checkpoint_is_refused_naming_file_and_reason_and_nothing_changes(tmp_path, straight_run):
    data, reference, _ = straight_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    colora_ck = out / "colora" / "checkpoint.pt"
    argv = _cli(data, out, "--resume")[3:] + ["--no-progress"]

    def refused(argv, *expected):
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        with pytest.raises(SystemExit) as e:
            finetune.main(argv)
        message = str(e.value.code)
        assert message.startswith("colora-finetune: error: cannot resume from ") and "\n" not in message, message
        for part in expected:
            assert part in message, message
        # nothing written, nothing overwritten
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    good = colora_ck.read_bytes()
    colora_ck.write_bytes(good[: len(good) // 2])  # a torn file (as a non-atomic writer killed mid-write leaves)
    refused(argv, str(colora_ck), "unreadable")
    colora_ck.write_bytes(good)
    # a checkpoint of a different model: the settings say so
    refused([a if a != "smallcnn" else "resnet18" for a in argv], str(colora_ck), "model: 'smallcnn' vs 'resnet18'")
    refused(argv[:-1] + ["--head-hidden", "32", "--no-progress"], "head_hidden: 128 vs 32")
    ck = torch.load(colora_ck, weights_only=True)
    adam = ck["optimizer"]["state"][0]
    adam["exp_avg"] = adam["exp_avg"][:1]
    torch.save(ck, colora_ck)
    refused(argv, str(colora_ck), "optimizer state does not fit this model's")
    colora_ck.write_bytes(good)
    torch.save({**torch.load(colora_ck, weights_only=True), "model": [1, 2]}, colora_ck)
    refused(argv, str(colora_ck), "malformed model")
    # same settings, weights of another shape (another architecture under the same name)
    colora_ck.write_bytes(good)
    ck = torch.load(colora_ck, weights_only=True)
    ck["model"]["head.fc2.weight"] = torch.zeros(4, 64)
    del ck["model"]["head.fc2.bias"]
    torch.save(ck, colora_ck)
    refused(argv, str(colora_ck), "do not fit this model", "1 missing (e.g. head.fc2.bias)",
            "head.fc2.weight (4, 64) vs (3, 64)")
    ck["format"] = "colora-finetune/1"
    torch.save(ck, colora_ck)
    refused(argv, "written in format 'colora-finetune/1'")


# --- non-finite training ------------------------------------------------------------------------------------------

REAL_PREPARE_BATCH = finetune.prepare_batch


def _nan_batches(monkeypatch, which):
    """Put a NaN in training batches ``which`` (1-based, counted over the run): a corrupt input."""
    seen = [0]

    def patched(*a, **k):
        x = REAL_PREPARE_BATCH(*a, **k)
        if torch.is_grad_enabled():  # training; evaluation runs under no_grad
            seen[0] += 1
            if seen[0] in which:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
        return x

    monkeypatch.setattr(finetune, "prepare_batch", patched)


NPZ_RUN = ["--model", "smallcnn", "--strategy", "colora", "--batch-size", "8", "--lr", "3e-3", "--merge-unit", "step",
           "--merge-every", "5"]


def test_nonfinite_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    data = write_npz(tmp_path / "d.npz")
    common = ["--data", data, *NPZ_RUN]
    run(*common, "--epochs", "1", out=tmp_path / "one")
    run(*common, "--epochs", "3", out=tmp_path / "clean")
    _nan_batches(monkeypatch, {8 + 3})  # 8 steps per epoch: epoch 2, its third batch
    with pytest.raises(SystemExit) as e:
        run(*common, "--epochs", "3", out=tmp_path / "nan")
    message = str(e.value.code)
    ck_path = tmp_path / "nan" / "colora" / "checkpoint.pt"
    assert ("[colora] non-finite loss at epoch 2/3, step 11 (batch 3/8 of the epoch); "
            "stopped before the update") in message
    assert f"the last good checkpoint, {ck_path} (end of epoch 1), is kept" in message
    assert "non-finite loss at epoch 2/3" in (tmp_path / "nan" / "finetune.log").read_text()
    ck, one = (torch.load(d / "colora" / "checkpoint.pt", weights_only=True)
               for d in (tmp_path / "nan", tmp_path / "one"))
    assert _same(_untimed([ck])[0] | {"history": _untimed(ck["history"])},
                 _untimed([one])[0] | {"history": _untimed(one["history"])})
    assert not (tmp_path / "nan" / "colora" / "model_final.safetensors").exists()
    monkeypatch.setattr(finetune, "prepare_batch", REAL_PREPARE_BATCH)
    run(*common, "--epochs", "3", "--resume", out=tmp_path / "nan")  # the kept checkpoint finishes the clean run
    _assert_same_outputs(tmp_path / "clean", tmp_path / "nan", strategies=("colora",))


class _InfGrad(torch.autograd.Function):
    """Identity forward, non-finite backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradient_with_finite_loss_stops(tmp_path, monkeypatch):
    import torch.nn.functional as F

    class Functional:
        calls = 0

        def __getattr__(self, name):
            return getattr(F, name)

        def cross_entropy(self, logits, y, *a, **k):
            if logits.requires_grad:
                Functional.calls += 1
                if Functional.calls == 2:
                    logits = _InfGrad.apply(logits)
            return F.cross_entropy(logits, y, *a, **k)

    monkeypatch.setattr(finetune, "F", Functional())
    with pytest.raises(SystemExit) as e:
        run("--data", write_npz(tmp_path / "d.npz"), *NPZ_RUN, "--epochs", "1", out=tmp_path / "out")
    message = str(e.value.code)
    assert "non-finite gradient of features.0.pointwise at epoch 1/1, step 2 (batch 2/8 of the epoch)" in message
    assert "no epoch had finished, so this run has no checkpoint yet" in message
    assert not (tmp_path / "out" / "colora").exists()


def test_skip_nonfinite_skips_the_update_and_counts_it(tmp_path, monkeypatch):
    data = write_npz(tmp_path / "d.npz")
    _nan_batches(monkeypatch, {3, 8 + 5})
    (result,) = run("--data", data, *NPZ_RUN, "--epochs", "2", "--skip-nonfinite", out=tmp_path / "out")
    # skipped steps count for merges
    assert result["skipped_steps"] == 2 and result["steps"] == 16 and result["merges"] == 3
    assert [r["skipped_steps"]
            for r in json.loads((tmp_path / "out" / "colora" / "history.json").read_text())] == [1, 1]
    ck = torch.load(tmp_path / "out" / "colora" / "checkpoint.pt", weights_only=True)
    spec = finetune.build_model("smallcnn", 3, 1)
    finetune.setup_strategy(spec, "colora")
    names = [n for n, p in spec.model.named_parameters() if p.requires_grad]
    assert ck["optimizer"]["state"][names.index("head.fc2.weight")]["step"].item() == 16 - 2  # Adam stepped 14 times
    final, _ = load_merged(tmp_path / "out" / "colora" / "model_final.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    _nan_batches(monkeypatch, set(range(1, 9)))
    with pytest.raises(SystemExit, match=r"every step of epoch 1/1 was non-finite and skipped"):
        run("--data", data, *NPZ_RUN, "--epochs", "1", "--skip-nonfinite", out=tmp_path / "all")


# --- --help ------------------------------------------------------------------------------------------------------

def test_help_states_each_default_once_and_explains_every_flag(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    parser = finetune.build_parser()
    text = parser.format_help()
    entries = {}
    for block in re.split(r"\n(?=  -)", text[text.index("options:") + len("options:"):].strip("\n")):
        m = re.match(r"^  (-\S.*?)(?: {2,}|\n\s+)(\S.*)$", block, re.S)  # flags, then the help beside or below
        assert m, f"an option without help: {block!r}"
        entries[m.group(1)] = " ".join(m.group(2).split())
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    assert len(entries) == len(shown)
    for flags, help_text in entries.items():
        assert help_text.count("default") <= 1, flags
        assert not re.search(r"default: (None|True|False)", help_text), flags
    by_flag = {f.split()[0].rstrip(","): h for f, h in entries.items()}
    assert "Adam weight decay" in by_flag["--weight-decay"] and "epochs or optimizer steps" in by_flag["--merge-unit"]
    assert ("pointwise_first" in by_flag["--order"] and "reference" in by_flag["--backend"]
            and "seed of" in by_flag["--seed"])
    assert "(default: the digits demo)" in by_flag["--data"] and "default" not in by_flag["--no-progress"]


def test_merge_of_a_nonfinite_delta_is_refused_and_stops(tmp_path, monkeypatch):
    real_merge = cf.merge_colora

    def poisoned(model, optimizer=None, names=None):  # an adapter gone to Inf just before the first merge
        with torch.no_grad():
            model.features[2].depthwise[0, 0, 0] = float("inf")
        base = model.features[2].weight.clone()
        try:
            return real_merge(model, optimizer, names)
        finally:
            assert torch.equal(model.features[2].weight, base)  # refused: K0 unchanged

    monkeypatch.setattr(cf.callbacks, "merge_colora", poisoned)  # what MergeSchedule calls
    with pytest.raises(SystemExit) as e:
        run("--data", write_npz(tmp_path / "d.npz"), *NPZ_RUN, "--epochs", "2", out=tmp_path / "out")
    message = str(e.value.code)
    assert ("[colora] the merge after step 5 was refused: merge_colora: layer 'features.2'" in message
            and "non-finite" in message)
    assert not (tmp_path / "out" / "colora" / "checkpoint.pt").exists()
