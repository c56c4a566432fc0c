"""What every command-line tool of the package shares (colora-bench, colora-finetune, colora-audit, the study
scripts and the GPU check under benchmarks/): the progress report, `duration()` and `environment()`.

A tool module, not library API: `import colora_fused` does not load it.
"""
import importlib.metadata
import os
import platform
import sys
import threading
import time
from typing import Callable, Optional, TextIO

import torch

HEARTBEAT_S = 30.0


def duration(seconds: float) -> str:
    """1h02m03s, 2m03s or 3s."""
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def utc_stamp() -> str:
    """The time stamp of a log line: 2025-01-31T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Progress:
    """Where a run is: counts units of work toward a total (which may grow), reports its phases and passes on
    the tool's own messages.

    On a terminal `stream` shows a tqdm bar. Anywhere else (a pipe, a log file, CI) it gets plain lines instead:
    one per `phase()`, and a heartbeat whenever `interval_s` passed without a line, each with the elapsed time,
    the units done and left and an estimate of the time left, after `prefix`. `message()` prints a line (above
    the bar). Every line and message also goes to `log_path`, time-stamped in UTC and flushed at once, so that
    a killed run leaves what it wrote (`append`: a resumed run adds to the log). `show=False`: the stream gets
    messages only; the log gets all. `bar=False`: lines on a terminal too. `lines=False`: no phase, heartbeat or
    closing line at all, for a tool that writes its own with `message()` (colora-finetune); `interval_s=None`:
    no heartbeat. `enabled=False`: nothing anywhere (a process that is not rank 0). Use it as a context manager:
    the heartbeat thread stops and the log closes on exit.
    """

    def __init__(self, total: int = 0, stream: Optional[TextIO] = None, log_path: Optional[str] = None,
                 show: bool = True, interval_s: Optional[float] = HEARTBEAT_S, unit: str = "step",
                 clock: Callable[[], float] = time.monotonic, *, prefix: str = "", bar: bool = True,
                 lines: bool = True, append: bool = False, enabled: bool = True):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.done, self.unit, self.interval_s, self.clock = total, 0, unit, interval_s, clock
        self.prefix, self.enabled, self.description = prefix, enabled, "starting"
        terminal = enabled and show and bar and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._lines = lines and enabled
        self._shown = self._lines and show and not terminal
        self._bar = None
        if terminal:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=unit, file=self.stream, dynamic_ncols=True)
        self._log = None
        self._lock = threading.Lock()
        self._start = self._last_line = clock()
        self._stop = threading.Event()
        self._heartbeat = None
        if log_path:
            self.open_log(log_path, append)
        if self._lines and interval_s is not None and interval_s > 0:
            self._heartbeat = threading.Thread(target=self._beat, name="colora-progress", daemon=True)
            self._heartbeat.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    @property
    def has_bar(self) -> bool:
        """Whether a bar shows the progress (else the reader sees lines only)."""
        return self._bar is not None

    def open_log(self, path: str, append: bool = False) -> None:
        """Send every line from now on to `path` too (made with its folder; `append`: added to what it holds)."""
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        log = open(path, "a" if append else "w", encoding="utf-8")
        with self._lock:
            self._log = log

    def add_total(self, n: int) -> None:
        with self._lock:
            self.total += n
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def phase(self, text: str) -> None:
        """Start a phase: the bar's description, and a line (stream in line mode, log always)."""
        self.detail(text)
        if self._lines:
            self._line(self.status())

    def detail(self, text: str) -> None:
        """What runs now, within a phase: the bar's description and the heartbeat's text, no line of its own."""
        with self._lock:
            self.description = text
        if self._bar is not None:
            self._bar.set_description(text, refresh=False)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def message(self, text: str, console: bool = True) -> None:
        """A line for the reader (a result, a failure, a note): on the stream (above the bar) even when progress
        is hidden, and in the log; `console=False`: in the log only. Each line of `text` is logged on its own."""
        if not self.enabled:
            return
        with self._lock:
            self._last_line = self.clock()
        if console and self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif console:
            print(text, file=self.stream, flush=True)
        self._write_log(text)

    def elapsed(self) -> float:
        """Seconds since the start."""
        return self.clock() - self._start

    def quiet_for(self) -> float:
        """Seconds since the last line or message."""
        with self._lock:
            return self.clock() - self._last_line

    def status(self) -> str:
        """[elapsed] description: the tally."""
        with self._lock:
            description = self.description
        return f"[{duration(self.elapsed())}] {description}: {self.tally()}"

    def tally(self) -> str:
        """done/total units done, left (and about how long, once a unit has finished)."""
        with self._lock:
            elapsed = self.clock() - self._start
            done, total = self.done, self.total
        left = max(total - done, 0)
        text = f"{done}/{total} {self.unit}s done, {left} left"
        if done and left:
            text += f", about {duration(elapsed / done * left)} to go"
        return text

    def close(self, failed: bool = False) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self._lines:
            self._line(f"[{duration(self.elapsed())}] {'stopped by an error' if failed else 'finished'}: "
                       f"{self.done}/{self.total} {self.unit}s done")
        if self._bar is not None:
            self._bar.close()
        with self._lock:
            log, self._log = self._log, None
        if log is not None:
            log.close()

    def _line(self, text: str) -> None:
        with self._lock:
            self._last_line = self.clock()
        if self._shown:
            print(f"{self.prefix}{text}", file=self.stream, flush=True)
        self._write_log(text)

    def _write_log(self, text: str) -> None:
        with self._lock:
            if self._log is not None:
                stamp = utc_stamp()
                self._log.writelines(f"{stamp} {line}\n" for line in text.splitlines() or [""])
                self._log.flush()

    def _beat(self) -> None:
        # Wakes often enough to keep the gap between lines within interval_s, however long one unit takes.
        while not self._stop.wait(min(self.interval_s, 1.0)):
            with self._lock:
                due = self.clock() - self._last_line >= self.interval_s
            if due:
                self._line(self.status())


def _version(package: str) -> Optional[str]:
    """The installed version of `package`, read from its metadata (nothing imported), or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def environment(device: Optional[torch.device] = None) -> dict:
    """What a tool's results depend on beyond its options, for its env.json: Python, the packages that compute
    (torch, torchvision, triton, numpy, peft, timm; None when not installed), CUDA and cuDNN, the CPU and torch's
    threads, and with a CUDA `device` the GPU (name, capability, SMs, shared memory, memory)."""
    env = dict(python=platform.python_version(), platform=platform.platform(),
               time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), torch=torch.__version__)
    env.update((name, _version(name)) for name in ("torchvision", "triton", "numpy", "peft", "timm"))
    env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), cpu=cpu_name(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), gpu=None)
    if device is not None and torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   smem_per_block_optin=p.shared_memory_per_block_optin,
                   smem_per_sm=p.shared_memory_per_multiprocessor, memory_gib=round(p.total_memory / 2 ** 30, 1))
    return env
