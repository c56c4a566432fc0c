"""The kernels' autotuner: Triton's, except that a config the compiler rejects is pruned, not fatal.

Triton's autotuner skips a config whose launch runs out of shared memory or registers, but any other compile error
(an MLIR pass failing, as triton 3.6's TritonGPUCoalesceAsyncCopy did on the strided input gradient at
num_stages >= 2) propagates and fails the launch, although the other configs compile. Here each config is
compiled before it is timed; one that does not compile gets an infinite time and one log line (once per kernel
and config), so the launch runs the fastest config that does compile. Only when none compiles does the launch
raise, with the compiler's error (`backend="auto"` then falls back to torch).
"""
import contextlib
import logging
import threading
from typing import Iterator, Set, Tuple

from triton.runtime.autotuner import Autotuner

logger = logging.getLogger(__name__)

_REPORTED: Set[Tuple[str, str]] = set()
_PIN = threading.local()


@contextlib.contextmanager
def pinned_config(index: int) -> Iterator[None]:
    """Within the block every autotuned launch runs the `index`-th of the configs its prune keeps (modulo their
    number), untimed and uncached (`best_config` tells which): how the GPU check compares each config production
    may launch against the reference."""
    previous = getattr(_PIN, "index", None)
    _PIN.index = index
    try:
        yield
    finally:
        _PIN.index = previous


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


class PruningAutotuner(Autotuner):
    """An Autotuner whose benchmark compiles each config first and prunes one the compiler rejects
    (`pinned_config` picks one instead)."""

    def run(self, *args, **kwargs):
        index = getattr(_PIN, "index", None)
        if index is None:
            return super().run(*args, **kwargs)
        self.nargs = dict(zip(self.arg_names, args))
        configs = self.prune_configs(kwargs)
        self.best_config = config = configs[index % len(configs)]
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        try:
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    def _bench(self, *args, config, **meta):
        current = dict(meta, **config.all_kwargs())
        try:
            self.fn.run(*args, **{**current, "warmup": True})  # compile only (nothing launches)
        except Exception as exc:  # noqa: BLE001 - any compiler failure of one config prunes that config
            key = (self.base_fn.__name__, str(config))
            if key not in _REPORTED:
                _REPORTED.add(key)
                logger.warning("colora_fused: %s does not compile with %s (pruned): %s", self.base_fn.__name__,
                               config, _last_line(exc))
            return [float("inf")] * 3
        return super()._bench(*args, config=config, **meta)


def autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None):
    """`triton.autotune` with `PruningAutotuner` (same arguments, the ones the kernels use)."""

    def decorator(fn):
        return PruningAutotuner(fn, fn.arg_names, configs, key, reset_to_zero, restore_value,
                                prune_configs_by=prune_configs_by)

    return decorator
