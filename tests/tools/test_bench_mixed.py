"""colora-bench --mixed: end to end on CPU at a toy size (the files, a row per phase and method, positive ratios,
verdict words); the set-loop the benchmark times computes what adapters_per_sample computes, on every route, in
the outputs and the adapter gradients; the forced route is restored; the targets are judged from the rows."""
import csv
import json
import math
import os

import pytest
import torch
from torch import nn

import colora_fused as cf
from colora_fused.bench import cli as bench, mixed_mode, report as bench_report
from colora_fused.bench.common import MIXED_METHODS, Config
from colora_fused.bench.stats import FASTER, NOISE, REFERENCE, SLOWER, TOO_FEW

TINY = ["--mixed", "2", "--device", "cpu", "--model", "resnet18", "--batch", "4", "--image-size", "32", "--rounds",
        "1", "--warmup", "0", "--no-progress"]
VERDICTS = {FASTER, SLOWER, NOISE, TOO_FEW}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def positive(value: str) -> float:
    number = float(value)
    assert math.isfinite(number) and number > 0, value
    return number


@pytest.fixture
def one_thread():
    """torch on one thread: on a shared two-core machine a two-thread parallel region waits for a thread another
    process holds, which made this toy run ten times slower (2½ minutes against 15 s); the test checks the files,
    not the speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_mixed_mode_writes_results(tmp_path, one_thread):
    pytest.importorskip("peft")
    bench.main(TINY + ["--out", str(tmp_path)])

    columns, rows = read_csv(tmp_path / "results.csv")
    assert tuple(columns) == bench_report.MIXED_COLUMNS
    assert [(r["phase"], r["method"]) for r in rows] == [(phase, m) for phase in mixed_mode.PHASES
                                                        for m in MIXED_METHODS]
    for r in rows:
        assert r["model"] == "resnet18" and r["sets"] == "2" and r["batch"] == "4", r
        if r["phase"] == "train" and r["method"] == "peft-mixed":
            assert r["status"] == "n/a: PEFT's adapter_names is inference-only" and r["ms"] == "", r
            continue
        assert r["status"] == "ok", r
        p20, median, p80 = (positive(r[k]) for k in ("ms_p20", "ms", "ms_p80"))
        assert p20 <= median <= p80 and int(r["rounds"]) == 1 and int(r["steps"]) == 1
        low, ratio, high = (positive(r[f"time_vs_single{k}"]) for k in ("_low", "", "_high"))
        assert low <= ratio <= high
        low, speedup, high = (positive(r[f"mixed_speedup{k}"]) for k in ("_low", "", "_high"))
        assert low <= speedup <= high
        positive(r["peak_mem_mib"])
        positive(r["mem_vs_single"])
        assert r["verdict"] == (REFERENCE if r["method"] == "single" else TOO_FEW), r  # one round: no verdict
        assert r["mixed_verdict"] == (REFERENCE if r["method"] == "mixed" else TOO_FEW), r
        if r["method"] in ("single", "mixed"):
            assert float(r["time_vs_single" if r["method"] == "single" else "mixed_speedup"]) == 1.0
        # The routes the untimed call took: the library's choice on CPU (segments), or the forced one.
        expected = {"mixed": "segments", "mixed-segments": "segments", "mixed-gathered": "gathered",
                    "mixed-per-set": "per_set"}.get(r["method"])
        assert r["routes"] == ("" if expected is None else f"{expected} ×17"), r
        if expected is not None and r["phase"] == "forward":
            assert float(r["max_rel_diff_vs_set_loop"]) < 1e-4, r
    by = {(r["phase"], r["method"]): r for r in rows}
    # mixed's speed-up over a method is that method's time over mixed's, so it is single's ratio over mixed's.
    single = by["forward", "single"]
    assert float(single["mixed_speedup"]) == pytest.approx(1 / float(by["forward", "mixed"]["time_vs_single"]))

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert markdown.startswith("# colora-bench (mixed mode, 2 adapter sets per batch) on ")
    assert "batch 4, 32×32, fp32" in markdown
    assert "### forward (model.eval(), torch.no_grad())" in markdown and "### training step" in markdown
    for method in MIXED_METHODS:
        assert markdown.count(f"| {method} |") == 2, method
    assert "## Targets" in markdown
    targets = [line for line in markdown.splitlines() if line.startswith("- CPU (") or line.startswith("- CUDA (")]
    assert len(targets) == 7 and all("**n/a**" in line for line in targets)  # resnet18, not the goals' resnet50
    assert "resnet50 was not run" in targets[0] and "a CUDA goal; this run is on CPU" in targets[-1]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env = json.loads((tmp_path / "env.json").read_text(encoding="utf-8"))
    assert env["mode"] == "mixed" and env["sets"] == 2 and env["batch"] == 4 and env["methods"] == list(MIXED_METHODS)
    log = (tmp_path / "progress.log").read_text(encoding="utf-8").splitlines()
    assert log[-1].endswith("finished: 52/52 steps done")  # 13 (phase, method) × (probe + 2 memory + 1 round)


def tiny_colora(sets: int):
    """A small conv net (BatchNorm, a strided and a grouped conv, a classifier) in float64 under CoLoRA with
    `sets` random adapters, in eval mode (BatchNorm's running statistics: samples independent)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).double()
    cfg = Config(device=torch.device("cpu"), dtype="fp32", batch=6, image_size=8, channels_last=False, sets=sets)
    model = mixed_mode.colora_template(base, cfg, mixed_mode.adapter_names(sets)).eval()
    assert len(cf.colora_layers(model)) == 2
    return model, cfg


@pytest.mark.parametrize("method", ["mixed", "mixed-segments", "mixed-gathered", "mixed-per-set"])
def test_set_loop_and_mixed_agree(method):
    model, cfg = tiny_colora(3)
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    names = mixed_mode.assignment(7, 3)
    assert names == ["u0", "u1", "u2", "u0", "u1", "u2", "u0"]

    def run(name):
        model.zero_grad(set_to_none=True)
        out = mixed_mode.method_forward(name, model, x, names)()
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    loop_out, loop_grads = run("set-loop")
    out, grads = run(method)
    torch.testing.assert_close(out, loop_out, rtol=1e-10, atol=1e-10)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == loop_grads.keys() == trainable and len(trainable) == 3 * (3 + 2)  # Δb in the 1st conv
    for name in grads:
        torch.testing.assert_close(grads[name], loop_grads[name], rtol=1e-10, atol=1e-10, msg=name)
    # Each sample as the set-loop's output row: that sample run alone with its adapter active.
    for i in (0, 4, 5):
        cf.set_active_adapters(model, [names[i]])
        with torch.no_grad():
            torch.testing.assert_close(model(x[i:i + 1]), loop_out[i:i + 1], rtol=1e-10, atol=1e-10)
    # The adapters differ: single (u0 for every sample) does not compute the mixed batch.
    cf.set_active_adapters(model, ["u0"])
    with torch.no_grad():
        single = mixed_mode.method_forward("single", model, x, names)()
    torch.testing.assert_close(single[0], out[0])  # sample 0 uses u0 in both
    assert not torch.allclose(single[1], out[1])


def test_forced_route_is_restored(monkeypatch):
    monkeypatch.setenv(mixed_mode.ROUTE_ENV, "per_set")
    with mixed_mode.forced_route(None):
        assert mixed_mode.ROUTE_ENV not in os.environ
    assert os.environ[mixed_mode.ROUTE_ENV] == "per_set"
    monkeypatch.delenv(mixed_mode.ROUTE_ENV)
    with pytest.raises(RuntimeError), mixed_mode.forced_route("segments"):
        assert os.environ[mixed_mode.ROUTE_ENV] == "segments"
        raise RuntimeError
    assert mixed_mode.ROUTE_ENV not in os.environ


def test_targets_are_judged_from_the_rows():
    cfg = Config(device=torch.device("cpu"), dtype="fp32", batch=32, image_size=64, channels_last=True, sets=8,
                 mode="mixed", models=["resnet50"])

    def row(method, **values):
        return dict(model="resnet50", phase="forward", method=method, status="ok", **values)

    rows = [row("single"),
            row("mixed", time_vs_single=1.2, time_vs_single_low=1.1, time_vs_single_high=1.35),
            row("set-loop", mixed_speedup=2.0, mixed_speedup_low=1.8, mixed_speedup_high=2.2, mixed_verdict=FASTER),
            row("peft-mixed", mixed_speedup=1.05, mixed_speedup_low=0.9, mixed_speedup_high=1.2, mixed_verdict=NOISE)]
    judged = mixed_mode.targets(rows, cfg)
    assert [status for _, status, _ in judged] == ["met", "met", "not met", "n/a", "n/a", "n/a", "n/a"]
    assert "the interval reaches across 1.3×" in judged[0][2]
    assert all("a CUDA goal" in evidence for _, _, evidence in judged[3:])
    cfg.batch = 16
    assert {status for _, status, _ in mixed_mode.targets(rows, cfg)} == {"n/a"}
    assert "batch 16 (the goal's: 32)" in mixed_mode.targets(rows, cfg)[0][2]


@pytest.mark.parametrize("argv, expected", [
    (["--mixed", "1"], "expected at least 2 adapter sets"),
    (["--mixed", "2", "--layers"], "--mixed and --layers are separate modes"),
    (["--mixed", "8", "--device", "cpu", "--batch", "4"], "--mixed 8 needs a batch of at least 8"),
    (["--mixed", "2", "--methods", "full"], "unknown method 'full' in mixed mode"),
], ids=["one-set", "layers", "batch", "method"])
def test_bad_mixed_input_is_one_error_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert expected in err.splitlines()[-1]


def test_mixed_defaults(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = bench.parse_config(["--mixed", "8", "--methods", "mixed,set-loop"])
    assert (cfg.mode, cfg.sets, cfg.models, cfg.batch, cfg.image_size) == ("mixed", 8, ["resnet50"], 32, 64)
    assert cfg.methods == ["single", "mixed", "set-loop"] and cfg.out.endswith("/mixed")
