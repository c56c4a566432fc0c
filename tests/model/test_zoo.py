"""benchmarks/zoo_sweep.py on a few small real models, one per conv kind: every check passes, every conv is
wrapped, and the script writes its CSV and Markdown."""
import csv
import importlib.util
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_sweep():
    spec = importlib.util.spec_from_file_location("zoo_sweep", os.path.join(ROOT, "benchmarks", "zoo_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    """As the script runs: small float64 convs on a shared 2-core machine are far faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (model, input size, {conv kind: count}): torch's convs, torchvision's Conv3DSimple / Conv3DNoTemporal subclasses
# (the video ResNet at 4×16×16), timm's ScaledStdConv2d and Conv2dSame.
MODELS = [
    pytest.param("tv:r3d_18", 16, {"torch": 20}, id="tv-r3d_18"),
    pytest.param("timm:test_nfnet", 32, {"timm ScaledStdConv2d": 25, "torch": 8}, id="timm-test_nfnet"),
    pytest.param("timm:tf_mobilenetv3_small_minimal_100", 32, {"timm Conv2dSame": 5, "torch": 30},
                 id="timm-tf_mobilenetv3_small_minimal"),
]


@pytest.mark.parametrize("spec, size, kinds", MODELS)
def test_model_passes_every_check(spec, size, kinds):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    row = _load_sweep().sweep_model(spec, size)
    assert row["status"] == "ok", row
    assert row["refused"] == 0 and row["wrapped"] == row["convs"] == sum(kinds.values())
    assert row["kinds"] == "; ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
    assert row["classes_back"] and row["accounted"]
    assert 0 < row["default_wrapped"] < row["wrapped"], "the default leaves the 1×1 and depthwise convs plain"


def test_command_line_writes_csv_and_markdown(tmp_path):
    pytest.importorskip("timm")
    assert _load_sweep().main(["--models", "timm:resnet10t", "--size", "32", "--out", str(tmp_path),
                               "--threads", "1"]) == 0
    with open(tmp_path / "results.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == "timm:resnet10t" and row["status"] == "ok" and row["wrapped"] == "14"
    text = (tmp_path / "results.md").read_text()
    assert "Verdict: all checks pass" in text
    assert "| timm:resnet10t | 14 | 14 | 0 | torch 14 |" in text
