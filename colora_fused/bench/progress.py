"""Where a colora-bench run is: a bar on a terminal, plain lines in a log or CI, and a log file either way."""
import sys
import threading
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm

HEARTBEAT_S = 30.0


def duration(seconds: float) -> str:
    """1h02m03s, 2m03s or 3s."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """Counts units of work toward a total (which may grow) and reports the run's phase.

    On a terminal `stream` shows a tqdm bar. Anywhere else (a pipe, a log file, CI) it gets plain lines instead:
    one per `phase()`, and a heartbeat whenever `interval_s` passed without a line, each with the elapsed time,
    the units done and left and an estimate of the time left. `message()` prints a line above the bar. Every
    line and message also goes to `log_path`. With `show=False` the stream gets messages only; the log gets all.
    Use it as a context manager: the heartbeat thread stops and the log closes on exit.
    """

    def __init__(self, total: int = 0, stream: Optional[TextIO] = None, log_path: Optional[str] = None,
                 show: bool = True, interval_s: float = HEARTBEAT_S, unit: str = "step",
                 clock: Callable[[], float] = time.monotonic):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done, self.unit, self.interval_s, self.clock = total, 0, unit, interval_s, clock
        self.description = "starting"
        terminal = show and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._lines = show and not terminal
        self._bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True) if terminal else None
        self._log = open(log_path, "w", encoding="utf-8") if log_path else None
        self._lock = threading.Lock()
        self._start = self._last_line = clock()
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="colora-bench-progress", daemon=True)
        self._heartbeat.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def add_total(self, n: int) -> None:
        with self._lock:
            self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def phase(self, text: str) -> None:
        """Start a phase: the bar's description, and a line (stream in line mode, log always)."""
        self.detail(text)
        self._line(self.status())

    def detail(self, text: str) -> None:
        """What runs now, within a phase: the bar's description and the heartbeat's text, no line of its own."""
        with self._lock:
            self.description = text
        if self._bar is not None:
            self._bar.set_description(text)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str) -> None:
        """A line for the reader (a failure, a note): on the stream (above the bar) even when hidden, and in the log."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
        self._write_log(text)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.clock() - self._start

    def status(self) -> str:
        """[elapsed] description: done/total units, left (and about how long, once a unit has finished)."""
        with self._lock:
            elapsed = self.clock() - self._start
            done, total, description = self.done, self.total, self.description
        left = max(total - done, 0)
        text = f"[{duration(elapsed)}] {description}: {done}/{total} {self.unit}s done, {left} left"
        if done and left:
            text += f", about {duration(elapsed / done * left)} to go"
        return text

    def close(self, failed: bool = False) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._heartbeat.join()
        elapsed = duration(self.clock() - self._start)
        self._line(f"[{elapsed}] {'stopped by an error' if failed else 'finished'}: {self.done}/{self.total} "
                   f"{self.unit}s done")
        if self._bar is not None:
            self._bar.close()
        if self._log is not None:
            self._log.close()

    def _line(self, text: str) -> None:
        with self._lock:
            self._last_line = self.clock()
        if self._lines:
            print(f"colora-bench: {text}", file=self.stream, flush=True)
        self._write_log(text)

    def _write_log(self, text: str) -> None:
        if self._log is not None:
            with self._lock:
                self._log.write(f"{time.strftime('%H:%M:%S')} {text}\n")
                self._log.flush()

    def _beat(self) -> None:
        # Wakes often enough to keep the gap between lines within interval_s, however long one unit takes.
        while not self._stop.wait(min(self.interval_s, 1.0)):
            with self._lock:
                due = self.clock() - self._last_line >= self.interval_s
            if due:
                self._line(self.status())
