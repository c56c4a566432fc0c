"""colora-bench's verdicts: is a method's speed-up over a reference outside the noise of the interleaved rounds?

A round times every method once, back to back in a rotating order, so the rounds pair the methods: whatever
slowed the machine during round i slowed them all. A method's speed-up is therefore taken per round — the
reference's time in round i over the method's time in round i — and summarised by the median over rounds. Its
interval is a percentile bootstrap of that median: resample the rounds with replacement, take each resample's
median, keep the middle `CONFIDENCE` of them. The generator has a fixed seed, so the same timings always give
the same interval. The verdict: "faster" when the whole interval lies above 1, "slower" when below, "within the
noise" when it includes 1, and "too few rounds" under `MIN_ROUNDS`.

On synthetic noise the 95% percentile bootstrap of a median over 6 to 20 rounds calls 6–10% of equal pairs
faster or slower, not 5%: it errs a little on the narrow side at these sizes (tests/tools/test_bench_verdicts.py
checks it stays under 12%). Extra rounds on a busy machine (`extra_rounds`) are decided by one look at the
planned rounds, which adds a little more to that; the decision is never revisited as the extra rounds come in.

Everything here is a pure function of its arguments; the benchmark modes feed it their timings.
"""
import dataclasses
import math
import statistics
from typing import List, Optional, Sequence, Tuple

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
# The fewest rounds at which even a unanimous result is significant at 95%: with 5 rounds all on one side of 1
# the chance of that by luck alone is 2·2⁻⁵ = 6%; with 6 it is 3%.
MIN_ROUNDS = 6
# Beyond this many rounds (16 times a CPU run's 6) a "within the noise" is reported as too close to 1 to settle
# in practice.
PRACTICAL_ROUNDS = 100
FASTER, SLOWER, NOISE, TOO_FEW, REFERENCE = "faster", "slower", "within the noise", "too few rounds", "reference"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One method against the reference, from paired rounds."""

    speedup: float  # median over rounds of reference time / method time (> 1: the method is faster)
    low: float  # the CONFIDENCE bootstrap interval of that median
    high: float
    rounds: int
    verdict: str  # FASTER, SLOWER, NOISE or TOO_FEW
    rounds_to_settle: Optional[int]  # unsettled: about how many rounds would settle it (None: the median is 1)

    @property
    def settled(self) -> bool:
        return self.verdict in (FASTER, SLOWER)

    def words(self, reference: str) -> str:
        """The verdict as a clause for results.md: "1.55× (95% interval 1.41–1.70×, 6 rounds): faster than
        <reference>"."""
        text = (f"{self.speedup:.2f}× ({CONFIDENCE:.0%} interval {self.low:.2f}–{self.high:.2f}×, "
                f"{self.rounds} rounds): ")
        if self.settled:
            return text + f"{self.verdict} than {reference}"
        if self.verdict == TOO_FEW:
            text += f"too few rounds for a verdict (at least {MIN_ROUNDS})"
        else:
            text += NOISE
        if self.rounds_to_settle is None or self.rounds_to_settle > PRACTICAL_ROUNDS:
            return text + "; too close to 1 to settle in a practical number of rounds"
        return text + f"; about {self.rounds_to_settle} rounds might settle it (--rounds {self.rounds_to_settle})"


def round_means(rounds: Sequence[Sequence[float]]) -> List[float]:
    """Per round, the mean of its timed steps."""
    return [statistics.fmean(steps) for steps in rounds]


def paired_speedups(reference: Sequence[float], method: Sequence[float]) -> List[float]:
    """Per round, the reference's time over the method's."""
    if len(reference) != len(method):
        raise ValueError(f"paired rounds differ in number: {len(reference)} and {len(method)}")
    return [r / m for r, m in zip(reference, method)]


def bootstrap_interval(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = SEED) -> Tuple[float, float]:
    """The percentile bootstrap interval of the median of `values`, resampled with a generator seeded `seed`.

    numpy, not torch: single-threaded, so that it neither waits for nor disturbs torch's thread pool between
    timed rounds on a busy machine."""
    x = np.asarray(values, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    medians = np.median(x[picks], axis=1)  # the mean of the middle two for an even count
    tail = (1 - confidence) / 2
    low, high = np.quantile(medians, [tail, 1 - tail])
    return float(low), float(high)


def rounds_to_settle(speedup: float, low: float, high: float, rounds: int) -> Optional[int]:
    """About how many rounds would put the interval clear of 1, if the median stayed where it is and the
    interval narrowed as 1/√rounds (in log space); None when the median is 1 and no number would."""
    distance = abs(math.log(speedup))
    if distance < 1e-12:
        return None
    near = low if speedup > 1 else high  # the bound on 1's side
    width = abs(math.log(speedup) - math.log(near))
    return max(rounds + 1, MIN_ROUNDS, math.ceil(rounds * (width / distance) ** 2))


def compare(reference: Sequence[float], method: Sequence[float], confidence: float = CONFIDENCE,
            resamples: int = RESAMPLES, seed: int = SEED) -> Verdict:
    """The verdict on `method` against `reference` from their per-round times (paired by index)."""
    speedups = paired_speedups(reference, method)
    if not speedups:
        raise ValueError("no rounds to compare")
    speedup = statistics.median(speedups)
    low, high = bootstrap_interval(speedups, confidence, resamples, seed)
    if len(speedups) < MIN_ROUNDS:
        verdict = TOO_FEW
    else:
        verdict = FASTER if low > 1 else SLOWER if high < 1 else NOISE
    settle = None if verdict in (FASTER, SLOWER) else rounds_to_settle(speedup, low, high, len(speedups))
    return Verdict(speedup, low, high, len(speedups), verdict, settle)


def busy(load: Optional[float], cores: int) -> bool:
    """More runnable threads than cores, on the 1-minute load average (which counts this run's own threads)."""
    return load is not None and load > cores


def extra_rounds(verdicts: Sequence[Verdict], load: Optional[float], cores: int, rounds_done: int, round_s: float,
                 seconds_left: Optional[float], max_rounds: int) -> Tuple[int, str]:
    """How many rounds to add after the planned ones, and why, in a sentence ("" when there is nothing to say).

    Only a busy machine gets more rounds, and only while some verdict is within the noise: as many as those
    verdicts ask for (`rounds_to_settle`), at most `max_rounds` in all and as many as fit in `seconds_left` at
    `round_s` seconds a round (None: extra rounds are off). A run planned with fewer rounds than a verdict
    needs is a quick look and stays one. Asked once, after the planned rounds: the rounds added do not depend
    on how the later ones come out.
    """
    if not busy(load, cores) or not verdicts:
        return 0, ""
    why = f"load average {load:.1f} on {cores} cores after {rounds_done} rounds, above the core count"
    if rounds_done < MIN_ROUNDS:
        return 0, f"{why}; fewer rounds were asked for than a verdict needs ({MIN_ROUNDS}), so none are added"
    unsettled = [v for v in verdicts if not v.settled]
    if not unsettled:
        return 0, f"{why}, but every verdict is already outside the noise: no extra rounds"
    unsettled_text = f"{len(unsettled)} of {len(verdicts)} verdicts not outside the noise"
    if seconds_left is None:
        return 0, f"{why}, {unsettled_text}; extra rounds are off (--max-seconds 0)"
    capped = any(v.rounds_to_settle is None or v.rounds_to_settle > max_rounds for v in unsettled)
    target = (max_rounds if capped else max(v.rounds_to_settle for v in unsettled)) - rounds_done
    if target <= 0:
        return 0, f"{why}, {unsettled_text}; {rounds_done} rounds already, the most allowed"
    fit = int(max(seconds_left, 0.0) // round_s) if round_s > 0 else target
    extra = max(0, min(target, fit))
    if extra == 0:
        return 0, f"{why}, {unsettled_text}; no time left for extra rounds under --max-seconds"
    text = f"{why}, {unsettled_text}: {extra} extra rounds, {rounds_done + extra} in all"
    if extra < target:
        text += f" (as many as fit in --max-seconds; {target - extra} more were wanted)"
    elif capped:
        text += f" (at most {max_rounds})"
    return extra, text
