"""The staged GPU check (benchmarks/gpu_check.sh) in its dry run: every phase on CPU with tiny shapes, so that the
script itself never is what breaks on the GPU; and its report on synthetic results (a timed-out phase, a kernel
launch that disagrees with the reference)."""
import csv
import importlib.util
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHASES = ["env", "warmup", "tests", "kernels", "layers", "model"]


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COLORA_TRITON_AUTOTUNE")}
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_dry_run_runs_every_phase_and_writes_as_it_goes(dry_run):
    out, stdout = dry_run
    timeline = _rows(out / "timeline.csv")
    assert [r["phase"] for r in timeline] == PHASES
    assert all(r["status"] == "ok" for r in timeline), timeline
    assert "=== phase kernels" in (out / "check.log").read_text()
    assert json.loads((out / "env.json").read_text())["device"] == "cpu"
    assert " passed" in (out / "tests.log").read_text() and (out / "tests.xml").exists()
    kernels = _rows(out / "kernels.csv")
    check = _load_check()
    assert {r["family"] for r in kernels} == set(check.FAMILIES)
    assert all(r["ok"] == "True" for r in kernels), [r for r in kernels if r["ok"] != "True"]
    assert all(0 <= float(r["max_rel_err"]) < float(r["rtol"]) for r in kernels)
    for part in ("layers", "model"):
        assert (out / part / "results.csv").exists() and (out / part / "results.md").exists()
    summary = (out / "summary.md").read_text()
    assert "| kernels |" in summary and f"{len(kernels)} of {len(kernels)} launches agree" in summary


def test_report_names_a_timeout_and_a_disagreeing_launch(tmp_path):
    check = _load_check()
    with open(tmp_path / "timeline.csv", "w", encoding="utf-8") as f:
        f.write("phase,started,seconds,status,triton_cache\nenv,10:00:00,3,ok,5\nwarmup,10:00:03,120,timeout,900\n")
    row = dict(family="input_grad", shape="r50-3x3-128-s2@56", dtype="bfloat16", order="pointwise_first",
               config_index=2, configs="conv_bwd_input_kernel BLOCK_M=128 w8 s3", ok=False, max_rel_err="0.31",
               atol=0.02, rtol=0.05, ms=1.0, error="input_grad x: Tensor-likes are not close!")
    check.append_row(str(tmp_path / "kernels.csv"), row, check.KERNEL_FIELDS)
    check.append_row(str(tmp_path / "kernels.csv"), dict(row, ok=True, error="", max_rel_err="0.001"),
                     check.KERNEL_FIELDS)
    (tmp_path / "tests.log").write_text("tests/kernels/test_cuda.py::test_x PASSED\n"
                                        "tests/test_cuda.py::test_y FAILED\n")
    summary = check.phase_report(str(tmp_path))
    assert "| warmup | 120 | timeout | 900 |" in summary
    assert "1 of 2 launches agree" in summary and "BLOCK_M=128 w8 s3" in summary and "0.31" in summary
    assert "cut short (no final line): 1 passed, 1 failed" in summary
    assert "Not written" in summary  # no layers/ or model/ results
