"""pytest plugin: run the suite on a machine without a GPU the way a GPU machine collects and runs it.

It makes `torch.cuda.is_available()` answer True before the suite's conftest runs, so the suite takes its GPU
branch: no Triton interpreter, compiled kernels, the CUDA-only tests collected. Every test that then touches a
CUDA tensor (or torch's optimizers, which look at the accelerator) fails with torch's "Found no NVIDIA driver"
error, raised or printed: that failure needs the real GPU and is expected.
Any other failure is one a GPU machine would show too, for a reason that has nothing to do with the GPU (a test
that assumes the interpreter, a CPU default, a device it never names). The session fails on those only, and the
summary lists them.

    PYTHONPATH=tests python -m pytest tests -p as_gpu_machine -q

(`.ci/run` runs it so; subprocesses a test starts see the real machine, without CUDA.)
"""
import os
from typing import List

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
os.environ.pop("TRITON_INTERPRET", None)  # a GPU machine runs compiled kernels

MISSING_DRIVER = "Found no NVIDIA driver"
_needs_gpu: List[str] = []
_other: List[str] = []


def _touched_cuda(report) -> bool:
    """Whether the failure came from touching CUDA: the driver error is the exception, or the test caught it and
    printed or logged it (a method of colora-bench reports its error and the run goes on), so that it failed
    later for lack of what the GPU would have given."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else report.longreprtext
    return MISSING_DRIVER in text or any(MISSING_DRIVER in content for _, content in report.sections)


def pytest_runtest_logreport(report):
    if report.failed:
        (_needs_gpu if _touched_cuda(report) else _other).append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    write(f"as a GPU machine: {len(_needs_gpu)} failure(s) for the missing NVIDIA driver (expected: they need "
          f"the GPU), {len(_other)} other failure(s)")
    for nodeid in _other:
        write(f"  not the driver: {nodeid}")


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 1 and _needs_gpu and not _other:
        session.exitstatus = 0
