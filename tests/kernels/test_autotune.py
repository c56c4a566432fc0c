"""The kernels' autotuner (kernels/_autotune.py): a config the compiler rejects is pruned with one log line, and
the launch runs a config that compiles; when none compiles, the launch raises the compiler's error."""
import logging

import pytest
import triton

from colora_fused.kernels import _autotune


class FakeKernel:
    """Stands in for a JITFunction: `run(..., warmup=True)` compiles, `warmup=False` launches. BLOCK=3 makes the
    compiler fail the way triton 3.6 failed the strided input gradient (an MLIR pass)."""

    arg_names = ["x"]

    def __init__(self, failing=(3,)):
        self.failing, self.launched, self.compiled = set(failing), [], []

    @staticmethod
    def fn(x):  # the Python function under the JITFunction (the autotuner names the kernel after it)
        return x

    def run(self, *args, grid, warmup, **kwargs):
        block = kwargs["BLOCK"]
        if block in self.failing:
            raise RuntimeError("PassManager::run failed")
        if warmup:
            self.compiled.append(block)
        else:
            self.launched.append(block)


def _tuner(kernel, blocks, times):
    def do_bench(call, quantiles):
        call()
        return [times[kernel.launched[-1]]] * 3

    configs = [triton.Config({"BLOCK": b}) for b in blocks]
    return _autotune.PruningAutotuner(kernel, kernel.arg_names, configs, ["x"], None, None, do_bench=do_bench)


def test_a_config_that_does_not_compile_is_pruned_with_one_log_line(caplog, monkeypatch):
    monkeypatch.setattr(_autotune, "_REPORTED", set())
    kernel = FakeKernel(failing=(3,))
    tuner = _tuner(kernel, [3, 4, 8], {4: 2.0, 8: 1.0})
    with caplog.at_level(logging.WARNING, logger=_autotune.__name__):
        tuner.run(7, grid=(1,), warmup=False)
        tuner.run(9, grid=(1,), warmup=False)  # another key: benchmarked again, the failure not logged again
    assert kernel.launched[-1] == 8 and 3 not in kernel.launched  # the fastest config that compiles
    assert sorted(set(kernel.compiled)) == [4, 8]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not compile" in lines[0] and "BLOCK: 3" in lines[0]
    assert "PassManager::run failed" in lines[0]


def test_when_no_config_compiles_the_launch_raises_the_compiler_error(monkeypatch):
    monkeypatch.setattr(_autotune, "_REPORTED", set())
    kernel = FakeKernel(failing=(3, 4))
    tuner = _tuner(kernel, [3, 4], {})
    with pytest.raises(RuntimeError, match="PassManager::run failed"):
        tuner.run(7, grid=(1,), warmup=False)
    assert kernel.launched == []


def test_pinned_config_runs_each_kept_config_in_turn_and_caches_nothing(monkeypatch):
    kernel = FakeKernel(failing=())
    tuner = _tuner(kernel, [4, 8, 16], {4: 3.0, 8: 1.0, 16: 2.0})
    for index in range(4):
        with _autotune.pinned_config(index):
            tuner.run(7, grid=(1,), warmup=False)
        assert kernel.launched[-1] == [4, 8, 16][index % 3]
    assert tuner.cache == {}
    tuner.run(7, grid=(1,), warmup=False)  # unpinned: timed again, the fastest
    assert kernel.launched[-1] == 8
