"""colora-bench end to end on CPU at toy sizes: the files it writes parse and hold real, finite measurements;
layer mode; bad input ends in one error line; a method running out of memory is reported, not fatal."""
import csv
import io
import json
import math
import sys
import time
import types

import pytest
import torch
from torch import nn

import colora_fused
from colora_fused.bench import cli as bench, model_mode as bench_model, report as bench_report
from colora_fused.bench.common import Progress
from colora_fused.bench.stats import MIN_ROUNDS
from colora_fused.toolbox import duration

# The memory measurement's two steps per method already warm it up. On CPU (also where a GPU is present): these
# tests check the CPU defaults (steps per round) and torch as auto's path there.
TINY = ["--device", "cpu", "--model", "resnet18", "--image-size", "32", "--batch", "2", "--warmup", "0",
        "--rounds", "2", "--no-progress"]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def positive(value: str) -> float:
    number = float(value)
    assert math.isfinite(number) and number > 0, value
    return number


def table_rows(markdown: str, first_cell: str):
    """The cells of every Markdown table row whose first cell is `first_cell`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_model_mode_writes_results(tmp_path):
    methods = ["full", "head", "colora-torch", "colora-eager-kxk"]
    bench.main(TINY + ["--methods", ",".join(methods), "--out", str(tmp_path)])

    columns, rows = read_csv(tmp_path / "results.csv")
    assert tuple(columns) == bench_report.MODEL_COLUMNS
    assert [r["method"] for r in rows] == methods
    by_method = {r["method"]: r for r in rows}
    for r in rows:
        assert r["status"] == "ok", r
        p20, median, p80 = (positive(r[k]) for k in ("step_ms_p20", "step_ms", "step_ms_p80"))
        assert p20 <= median <= p80
        assert int(r["steps"]) == 2 and int(r["rounds"]) == 2
        assert positive(r["images_per_s"]) == pytest.approx(2 / (median / 1e3))
        low, speedup, high = (positive(r[f"speedup_vs_full{k}"]) for k in ("_low", "", "_high"))
        assert low <= speedup <= high
        # Two rounds are too few for a verdict: it says so, and how many rounds a verdict needs at least.
        assert r["verdict"] == ("reference" if r["method"] == "full" else "too few rounds"), r
        assert (r["rounds_to_settle"] == "") == (r["method"] == "full")
        positive(r["peak_mem_mib"])
        positive(r["mem_vs_full"])
        assert int(r["trainable_params"]) <= int(r["total_params"])
    assert float(by_method["full"]["speedup_vs_full"]) == pytest.approx(1.0)
    trainable = {m: int(r["trainable_params"]) for m, r in by_method.items()}
    assert trainable["full"] == int(by_method["full"]["total_params"])
    assert trainable["head"] == 512 * 1000 + 1000  # resnet18's fc
    assert trainable["head"] < trainable["colora-eager-kxk"] < trainable["colora-torch"] < trainable["full"]
    # A fresh full fine-tuning copy holds weights, gradients and two AdamW moments; head-only holds one set.
    assert float(by_method["head"]["peak_mem_mib"]) < float(by_method["full"]["peak_mem_mib"])

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "| method | trainable params | step ms |" in markdown
    for method in methods:
        (cells,) = table_rows(markdown, method)
        assert float(cells[2]) == pytest.approx(float(by_method[method]["step_ms"]), abs=0.06)
        assert cells[7] == by_method[method]["verdict"]
    assert f"- colora-torch: {float(by_method['colora-torch']['speedup_vs_full']):.2f}× (95% interval " in markdown
    assert markdown.count("too few rounds for a verdict (at least 6)") == 3
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    env = json.loads((tmp_path / "env.json").read_text(encoding="utf-8"))
    assert env["torch"] == torch.__version__ and env["batch"] == 2 and env["image_size"] == 32
    assert env["mode"] == "model" and env["methods"] == methods and env["command"].startswith("colora-bench ")


def test_layer_mode_writes_results(tmp_path, capsys):
    methods = ["conv", "full", "colora-torch"]
    argv = [a for a in TINY if a != "--no-progress"]
    bench.main(argv + ["--layers", "--methods", ",".join(methods), "--image-size", "16", "--rounds", "1",
                       "--sample-ms", "2", "--out", str(tmp_path)])

    err = capsys.readouterr().err

    columns, rows = read_csv(tmp_path / "results.csv")
    assert tuple(columns) == bench_report.LAYER_COLUMNS
    layers = {r["layer"] for r in rows} - {"all convs"}
    assert "64→64 3×3 s1 @4×4" in layers and "3→64 7×7 s2 @16×16" in layers
    assert len(rows) == (len(layers) + 1) * len(methods) * 2

    # stderr is no terminal here: progress comes as lines, one per phase, and all of them in progress.log.
    lines = [line for line in err.splitlines() if line.startswith("colora-bench: [")]
    logged = (tmp_path / "progress.log").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 1)[1] for line in logged] == [line[len("colora-bench: "):] for line in lines]
    n = len(layers)
    shapes = [line for line in lines if ": building 3 layers" in line]
    assert len(shapes) == n and f"shape 1/{n} 3→64 7×7 s2 @16×16" in shapes[0]
    total = n * len(methods) * 2 * 1 * 1  # shapes × methods × modes × rounds × steps per round (no warm-up)
    assert f"0/{total} steps done, {total} left" in shapes[0]
    assert any(f"shape {n}/{n} " in line and " step: round 1/1: " in line for line in lines)
    assert all("about" in line and "to go" in line for line in shapes[1:]), "an estimate once a step is done"
    assert lines[-1].endswith(f"finished: {total}/{total} steps done")
    for r in rows:
        assert r["status"] == "ok", r
        for key in ("ms", "gflop", "tflops", "ratio_vs_conv", "speedup_vs_full"):
            positive(r[key])
        assert r["peak_fraction"] == ""  # no peak for a CPU
        paths = ("torch",)  # off CUDA auto takes torch
        assert r["auto_path"] in paths if r["layer"] != "all convs" else r["auto_path"] == "", r
    stem = {(r["method"], r["mode"]): r for r in rows if r["layer"] == "3→64 7×7 s2 @16×16"}
    forward_gflop = 2 * 2 * 8 * 8 * 64 * 3 * 49 / 1e9
    assert float(stem["full", "forward"]["gflop"]) == pytest.approx(forward_gflop)
    assert float(stem["full", "step"]["gflop"]) == pytest.approx(3 * forward_gflop)
    assert float(stem["colora-torch", "step"]["gflop"]) == pytest.approx((2 + 2 / 49) * forward_gflop)
    assert float(stem["conv", "forward"]["ratio_vs_conv"]) == pytest.approx(1.0)
    for r in rows:  # one round: intervals around each ratio, no verdict
        assert int(r["rounds"]) == 1
        for key in ("ratio_vs_conv", "speedup_vs_full"):
            assert float(r[f"{key}_low"]) <= float(r[key]) <= float(r[f"{key}_high"])
        assert r["verdict"] == ("reference" if r["method"] == "full" else "too few rounds")

    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "## resnet18: forward" in markdown and "## resnet18: step" in markdown
    assert len(table_rows(markdown, "all convs")) == 2
    assert "| layer | count | auto | conv | full | colora-torch |" in markdown
    (forward, step) = table_rows(markdown, "all convs")
    assert "· ≈" in step[5] and "×)" in step[5]  # one round: not outside the noise; the interval in brackets
    assert "All convs, training step, speed-up over full fine-tuning:" in markdown
    assert all(cells[2] in paths for cells in table_rows(markdown, "3→64 7×7 s2 @16×16"))
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "env.json").read_text(encoding="utf-8"))["mode"] == "layers"


def test_out_of_memory_is_reported(tmp_path, monkeypatch):
    build = bench_model.build_method_model

    def build_or_oom(base, head, method, cfg, share_frozen):
        if method == "colora-torch":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return build(base, head, method, cfg, share_frozen)

    monkeypatch.setattr(bench_model, "build_method_model", build_or_oom)
    # SqueezeNet: small, and its classifier is a conv, which the adapter methods must leave alone.
    bench.main(["--model", "squeezenet1_1", "--image-size", "32", "--batch", "2", "--warmup", "0", "--rounds", "1",
                "--methods", "full,colora-torch,head", "--no-progress", "--out", str(tmp_path)])
    _, rows = read_csv(tmp_path / "results.csv")
    status = {r["method"]: r["status"] for r in rows}
    assert status == {"full": "ok", "colora-torch": "OOM", "head": "ok"}
    (cells,) = table_rows((tmp_path / "results.md").read_text(encoding="utf-8"), "colora-torch")
    assert cells[-1] == "OOM"


BAD_INPUT = [
    (["--model", "nosuchnet"], ["unknown model 'nosuchnet'", "resnet50", "vgg16"]),
    (["--methods", "full,bogus"], ["unknown method 'bogus'", "colora-torch", "peft-lora"]),
    (["--layers", "--methods", "head"], ["unknown method 'head' in layer mode", "conv"]),
    (["--device", "tpu"], ["unknown device 'tpu'", "cpu"]),
]


@pytest.mark.parametrize("argv, expected", BAD_INPUT, ids=["model", "method", "layer-method", "device"])
def test_bad_input_is_one_error_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colora-bench: error: ") and "\n" not in err and "Traceback" not in err
    for text in expected:
        assert text in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("argv, expected", [
    (["--device", "cuda"], ["--device cuda: no CUDA device", "auto, cpu"]),
    (["--methods", "colora-triton"], ["colora-triton cannot run here", "needs a CUDA device", "colora-torch"]),
], ids=["device-cuda", "triton"])
def test_missing_cuda_is_one_error_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(text in err for text in expected)


def test_missing_peft_is_an_error_when_asked_for_and_skipped_otherwise(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(SystemExit):
        bench.main(["--methods", "full,peft-lora"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "peft-lora cannot run here" in err and "pip install peft" in err

    cfg = bench.parse_config(["--no-progress"])
    assert "peft-lora" not in cfg.methods and "pip install peft" in cfg.skipped["peft-lora"]
    assert "skipping peft-lora" in capsys.readouterr().err


def test_defaults_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = bench.parse_config([])
    assert cfg.device.type == "cpu" and cfg.models == ["resnet50", "vgg16"]
    assert (cfg.batch, cfg.image_size, cfg.dtype) == (bench.DEFAULTS["cpu"]["batch"],
                                                      bench.DEFAULTS["cpu"]["image_size"], "fp32")
    assert cfg.out.startswith("bench-results/cpu-") and "colora-triton" in cfg.skipped
    assert cfg.max_seconds == bench.DEFAULTS["cpu"]["max_seconds"] > 0 and cfg.rounds >= MIN_ROUNDS
    assert bench.parse_config(["--layers"]).rounds >= MIN_ROUNDS
    assert bench.parse_config(["--max-seconds", "0"]).max_seconds == 0
    assert bench.parse_config(["--layers"]).out.endswith("/layers")
    compiled = bench.parse_config(["--methods", "full,colora-torch", "--compile"]).methods
    assert compiled == ["full", "colora-torch", "full+compile", "colora-torch+compile"]


def test_lora_rank_matches_colora_parameter_count():
    pytest.importorskip("peft")
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 256, 1, bias=False),
                          nn.Conv2d(256, 256, 3, padding=1, groups=32, bias=False))
    convs = dict(model.named_children())
    colora = sum(bench_model.colora_adapter_count(c) for c in convs.values())
    assert colora == (64 * 64 + 64 * 9 + 64) + (256 * 64 + 256) + (256 * 8 + 256 * 9)
    ranks = bench_model.matched_lora_ranks(convs)
    assert ranks["0"] == ranks["1"] and ranks["2"] % 32 == 0

    def lora(r, grouped_rank):  # A: C_in·prod(k) per rank; B: C_out/groups per rank
        return r * (64 * 9 + 64) + r * (64 + 256) + grouped_rank * (256 * 9 + 256 // 32)

    bench_model.inject_lora(model, ranks)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora(ranks["0"], ranks["2"])
    assert model(torch.randn(1, 64, 5, 5)).shape == (1, 256, 5, 5)
    best = min(abs(lora(r, max(32, round(r / 32) * 32)) - colora) for r in range(1, 1000))
    assert abs(lora(ranks["0"], ranks["2"]) - colora) == best


def test_progress_lines_heartbeat_and_log(tmp_path):
    stream = io.StringIO()  # no terminal: lines, not a bar
    with Progress(total=4, stream=stream, log_path=str(tmp_path / "progress.log"), interval_s=0.05) as progress:
        progress.phase("warm-up")
        progress.advance()
        time.sleep(0.6)  # one slow step: the heartbeat keeps lines coming meanwhile
        progress.message("colora-bench: a note")
        progress.advance(3)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "colora-bench: [0s] warm-up: 0/4 steps done, 4 left"
    beats = [line for line in lines if "warm-up: 1/4 steps done, 3 left, about" in line]
    assert len(beats) >= 2, lines
    assert "colora-bench: a note" in lines
    assert lines[-1] == "colora-bench: [1s] finished: 4/4 steps done"
    logged = (tmp_path / "progress.log").read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 1)[1] for line in logged] == [line.replace("colora-bench: [", "[", 1) for line in lines]

    hidden = io.StringIO()
    with Progress(total=1, stream=hidden, show=False) as progress:
        progress.phase("quiet")
        progress.message("colora-bench: a failure is still shown")
    assert hidden.getvalue() == "colora-bench: a failure is still shown\n"
    assert [duration(s) for s in (3, 123, 3723)] == ["3s", "2m03s", "1h02m03s"]


def test_help_explains_every_flag_and_gives_each_default_once():
    parser = bench.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: True)" not in text and "(default: False)" not in text
    for action in parser._actions:
        if "-h" in action.option_strings:
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert action.help.count("default") <= 1, action.help
        takes_default = (action.default is not None and action.default is not False
                         or action.dest in (*bench.DEFAULTS["cpu"], "models", "methods", "out", "sample_ms"))
        assert takes_default == ("(default: " in action.help), action.help


def test_audit_flag_runs_the_audit(monkeypatch, capsys):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv=None: calls.append(argv) or (3 if "--fail" in argv else [{}]))
    monkeypatch.setattr(colora_fused, "audit", fake, raising=False)
    monkeypatch.setitem(sys.modules, "colora_fused.audit", fake)
    bench.main(["--audit", "--", "--arch", "sm_90"])  # returning its results, not a status: success
    assert calls == [["--arch", "sm_90"]]
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--audit", "--", "--fail"])
    assert exit_info.value.code == 3

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--model", "resnet18", "--", "--arch", "sm_90"])
    assert exit_info.value.code == 2
    assert "are for --audit, which was not given" in capsys.readouterr().err

    monkeypatch.delattr(colora_fused, "audit")
    monkeypatch.setitem(sys.modules, "colora_fused.audit", None)  # makes the import fail, as without audit.py
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--audit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "colora-bench: error: --audit needs colora_fused.audit, which this installation does not have"
