"""colora-bench's verdicts on synthetic timings: a clear win, a clear loss, noise, too few rounds; how many rounds
would settle it; when a busy machine gets extra rounds; and how the verdicts reach results.csv, results.md and
results.png."""
import csv
import math
import random

import pytest
import torch

from colora_fused.bench import cli as bench, model_mode as bench_model, report as bench_report, stats as bench_stats
from colora_fused.bench.common import Config, Progress, interleaved_times
from colora_fused.bench.stats import FASTER, MIN_ROUNDS, NOISE, SLOWER, TOO_FEW, Verdict, compare, extra_rounds

# A machine whose load swings from round to round: every method in a round is slowed alike (the rounds pair them).
LOAD = [1.0, 2.5, 1.2, 3.0, 0.9, 1.8, 1.1, 2.2, 1.4, 2.7]


def rounds(ms: float, seed: int, spread: float = 0.03, load=LOAD):
    """Per-round times of a method taking `ms` on a quiet machine: the round's load times a little jitter."""
    rng = random.Random(seed)
    return [ms * factor * math.exp(rng.gauss(0.0, spread)) for factor in load]


def test_clear_win_despite_a_swinging_load():
    full, colora = rounds(100.0, seed=1), rounds(60.0, seed=2)
    # Unpaired, the two overlap widely: the load swings 3×, the speed-up is 1.67×.
    assert max(colora) > 1.5 * min(full)
    v = compare(full, colora)
    assert v.verdict == FASTER and v.settled and v.rounds == len(LOAD) and v.rounds_to_settle is None
    assert 1.0 < v.low <= v.speedup <= v.high
    assert 1.5 < v.low and v.high < 1.85 and v.speedup == pytest.approx(100 / 60, rel=0.05)
    assert v.words("full fine-tuning").endswith("faster than full fine-tuning")


def test_clear_loss():
    v = compare(rounds(100.0, seed=3), rounds(150.0, seed=4))
    assert v.verdict == SLOWER and v.high < 1.0 and v.speedup == pytest.approx(2 / 3, rel=0.05)
    assert "slower than full" in v.words("full")


def test_noise_is_no_verdict_and_says_how_many_rounds_might_settle_it():
    rng = random.Random(5)
    full = [100.0 * math.exp(rng.gauss(0.0, 0.2)) for _ in range(8)]
    same = [104.0 * math.exp(rng.gauss(0.0, 0.2)) for _ in range(8)]
    v = compare(full, same)
    assert v.verdict == NOISE and not v.settled and v.low < 1.0 < v.high
    assert v.rounds_to_settle is not None and v.rounds_to_settle > v.rounds
    words = v.words("full")
    assert "within the noise" in words and f"--rounds {v.rounds_to_settle}" in words

    # Exactly level: no number of rounds would settle it.
    level = compare([100.0] * 8, [100.0] * 8)
    assert level.verdict == NOISE and level.rounds_to_settle is None
    assert "too close to 1 to settle" in level.words("full")


def test_too_few_rounds_for_a_verdict():
    v = compare([100.0, 101.0, 99.0], [50.0, 51.0, 49.0])
    assert v.verdict == TOO_FEW and v.speedup == pytest.approx(2.0, rel=0.02)
    assert v.rounds_to_settle == MIN_ROUNDS
    assert "too few rounds" in v.words("full")
    assert compare([100.0] * MIN_ROUNDS, [50.0] * MIN_ROUNDS).verdict == FASTER


def test_rounds_to_settle_follows_the_square_root_law():
    # ln 1.1 = 0.0953 from 1; the lower bound ln(1.1/0.95) = 0.147 below it: 6 · (0.147/0.0953)² = 14.2.
    assert bench_stats.rounds_to_settle(1.1, 0.95, 1.3, 6) == 15
    assert bench_stats.rounds_to_settle(1 / 1.1, 1 / 1.3, 1 / 0.95, 6) == 15  # a slow-down, mirrored
    assert bench_stats.rounds_to_settle(1.0, 0.9, 1.1, 6) is None
    # Hundreds of rounds are no advice worth giving: the words say so, the CSV keeps the number.
    assert "too close to 1 to settle" in Verdict(1.01, 0.9, 1.2, 6, NOISE, 469).words("full")


def test_the_interval_is_reproducible():
    full, other = rounds(100.0, seed=6, spread=0.2), rounds(95.0, seed=7, spread=0.2)
    assert compare(full, other) == compare(full, other)
    with pytest.raises(ValueError, match="differ in number"):
        compare([1.0, 2.0], [1.0])


def test_equal_methods_are_rarely_called_faster_or_slower():
    """The module docstring's figure: on equal pairs the 95% bootstrap settles 6–10%, here under 12%."""
    rng = random.Random(8)
    trials = 400
    settled = sum(compare([1.0] * 8, [math.exp(rng.gauss(0.0, 0.2)) for _ in range(8)]).settled
                  for _ in range(trials))
    assert settled / trials < 0.12


def noise(rounds_to_settle=15) -> Verdict:
    return Verdict(1.1, 0.95, 1.3, 6, NOISE, rounds_to_settle)


WIN = Verdict(1.6, 1.4, 1.8, 6, FASTER, None)


@pytest.mark.parametrize("load, verdicts, round_s, seconds_left, expected, text", [
    (1.9, [noise()], 2.0, 100.0, 0, ""),  # not busy: no extra rounds, nothing to say
    (None, [noise()], 2.0, 100.0, 0, ""),  # no load average (not Unix)
    (3.5, [WIN], 2.0, 100.0, 0, "every verdict is already outside the noise"),
    (3.5, [WIN, noise()], 2.0, 100.0, 9, "1 of 2 verdicts not outside the noise: 9 extra rounds, 15 in all"),
    (3.5, [noise(12), noise(15)], 2.0, 7.0, 3, "as many as fit in --max-seconds; 6 more were wanted"),
    (3.5, [noise()], 2.0, -5.0, 0, "no time left for extra rounds under --max-seconds"),
    (3.5, [noise()], 2.0, None, 0, "extra rounds are off (--max-seconds 0)"),
    (3.5, [noise(None)], 2.0, 100.0, 18, "18 extra rounds, 24 in all (at most 24)"),
    (3.5, [noise(100)], 2.0, 100.0, 18, "(at most 24)"),
], ids=["quiet", "no-load", "all-settled", "noise", "time-cap", "no-time", "off", "level", "round-cap"])
def test_extra_rounds_on_a_synthetic_load(load, verdicts, round_s, seconds_left, expected, text):
    extra, why = extra_rounds(verdicts, load, cores=2, rounds_done=6, round_s=round_s, seconds_left=seconds_left,
                              max_rounds=24)
    assert extra == expected
    assert text in why and (why == "") == (text == "")
    if load is not None and load > 2:
        assert why.startswith(f"load average {load:.1f} on 2 cores after 6 rounds, above the core count")


def test_a_quick_run_stays_quick_on_a_busy_machine():
    few = Verdict(1.1, 0.9, 1.3, 2, TOO_FEW, MIN_ROUNDS)
    extra, why = extra_rounds([few], 3.5, cores=2, rounds_done=2, round_s=1.0, seconds_left=100.0, max_rounds=8)
    assert extra == 0 and "fewer rounds were asked for than a verdict needs (6), so none are added" in why


def test_interleaved_times_adds_the_rounds_it_is_asked_for():
    cfg = Config(device=torch.device("cpu"), dtype="fp32", batch=1, image_size=1, channels_last=False, warmup=0,
                 rounds=3, steps_per_round=2)
    asked = []

    def more_rounds(times, round_s):
        asked.append(({name: len(r) for name, r in times.items()}, round_s))
        return 2

    def failing():
        raise RuntimeError("broken")

    status = {"a": "ok", "b": "ok", "c": "ok"}
    with Progress(total=3 * 3 * 2, show=False) as progress:
        times = interleaved_times({"a": lambda: None, "b": lambda: None, "c": failing}, cfg, status, progress,
                                  "test", str, more_rounds)
        assert progress.total == 3 * 3 * 2 + 2 * 2 * 2 and progress.done == 2 * 5 * 2
    assert set(times) == {"a", "b"} and status["c"].startswith("error: RuntimeError: broken")
    assert [len(steps) for steps in times["a"]] == [2] * 5 and len(times["b"]) == 5
    assert len(asked) == 1 and asked[0][0] == {"a": 3, "b": 3} and asked[0][1] >= 0


def synthetic_rows():
    full, colora, peft, kxk = (rounds(ms, seed) for ms, seed in ((100.0, 1), (98.0, 2), (150.0, 3), (60.0, 4)))
    rows = []
    for method, times in (("full", full), ("colora-torch", colora), ("peft-lora", peft), ("colora-torch-kxk", kxk)):
        v = compare(full, times)
        row = dict(model="resnet50", method=method, status="ok", note="", trainable_params=10, total_params=100,
                   step_ms=sorted(times)[5], step_ms_p20=min(times), step_ms_p80=max(times), rounds=v.rounds,
                   steps=v.rounds, images_per_s=80.0, peak_mem_mib=500.0, mem_vs_full=1.0, load_average=3.5,
                   rounds_note="load average 3.5 on 2 cores after 6 rounds, above the core count, 1 of 3 "
                               "verdicts not outside the noise: 4 extra rounds, 10 in all")
        if method == "full":
            row.update(speedup_vs_full=1.0, speedup_vs_full_low=1.0, speedup_vs_full_high=1.0, verdict="reference")
        else:
            row.update(speedup_vs_full=v.speedup, speedup_vs_full_low=v.low, speedup_vs_full_high=v.high,
                       verdict=v.verdict, rounds_to_settle=v.rounds_to_settle,
                       verdict_words=v.words("full fine-tuning"))
        rows.append(row)
    return rows


def test_results_state_each_verdict(tmp_path):
    cfg = Config(device=torch.device("cpu"), dtype="fp32", batch=8, image_size=64, channels_last=True,
                 models=["resnet50"], methods=["full", "colora-torch", "peft-lora", "colora-torch-kxk"], rounds=6,
                 out=str(tmp_path), load_at_start=3.9)
    markdown = bench_report.write_outputs(synthetic_rows(), cfg)

    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as f:
        by_method = {r["method"]: r for r in csv.DictReader(f)}
    assert {m: r["verdict"] for m, r in by_method.items()} == {
        "full": "reference", "colora-torch": NOISE, "peft-lora": SLOWER, "colora-torch-kxk": FASTER}
    for r in by_method.values():
        assert float(r["speedup_vs_full_low"]) <= float(r["speedup_vs_full"]) <= float(r["speedup_vs_full_high"])
        assert r["rounds"] == "10" and r["load_average"] == "3.5"
    assert int(by_method["colora-torch"]["rounds_to_settle"]) > 10 and by_method["peft-lora"]["rounds_to_settle"] == ""

    assert "**Busy machine:**" in markdown and "95% interval | verdict |" in markdown
    (line,) = [line for line in markdown.splitlines() if line.startswith("- colora-torch: ")]
    settle = by_method["colora-torch"]["rounds_to_settle"]
    assert line.startswith("- colora-torch: 1.01× (95% interval 0.")
    assert line.endswith(f"×, 10 rounds): within the noise; about {settle} rounds might settle it (--rounds {settle})")
    assert "slower than full fine-tuning" in markdown and "faster than full fine-tuning" in markdown
    assert "Load average 3.5 on 2 cores after 6 rounds, above the core count, 1 of 3 verdicts" in markdown
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text(encoding="utf-8").endswith("10 in all.\n")


def test_busy_run_adds_rounds_and_says_so(tmp_path, monkeypatch):
    """The plumbing from the load to results.md: the decision itself is test_extra_rounds_on_a_synthetic_load's."""
    asked = []

    def two_more(verdicts, load, cores, rounds_done, round_s, seconds_left, max_rounds):
        asked.append((len(verdicts), load, rounds_done, seconds_left, max_rounds))
        return 2, "load average 99.0 on 2 cores after 2 rounds, above the core count: 2 extra rounds, 4 in all"

    monkeypatch.setattr(bench_model, "load_average", lambda: 99.0)
    monkeypatch.setattr(bench_model, "extra_rounds", two_more)
    bench.main(["--device", "cpu", "--model", "squeezenet1_1", "--image-size", "32", "--batch", "2", "--warmup", "0",
                "--rounds", "2", "--methods", "full,head", "--max-seconds", "60", "--no-progress",
                "--out", str(tmp_path)])
    (verdicts, load, done, seconds_left, max_rounds), = asked
    assert (verdicts, load, done, max_rounds) == (1, 99.0, 2, 8) and 0 < seconds_left <= 60
    with open(tmp_path / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["rounds"], r["steps"], r["load_average"]) for r in rows] == [("4", "4", "99.0")] * 2
    assert rows[1]["verdict"] == TOO_FEW
    markdown = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "Load average 99.0 on 2 cores after 2 rounds, above the core count: 2 extra rounds, 4 in all." in markdown
    assert "head: " in markdown and "too few rounds for a verdict" in markdown
