"""Test setup: Triton kernels run on CPU tensors in the interpreter when no GPU is present; on a GPU they run
one fixed config each instead of autotuning every tiny test shape.

Both variables are read when triton and the kernels are first imported, which is why they are set here, at
collection.

The randomized conformance test (tests/layers/test_conformance_random.py) runs a small derandomized budget by
default; `--conformance-examples N` (or COLORA_CONFORMANCE_EXAMPLES=N) runs N random examples per property
instead, from the seed `--conformance-seed S` (or COLORA_CONFORMANCE_SEED=S), drawn at random and printed in
the header when not given.
"""
import dataclasses
import os
import random
from typing import Optional

import pytest
import torch

if torch.cuda.is_available():
    os.environ.setdefault("COLORA_TRITON_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Each test starts from the same seed and without a COLORA_BACKEND override from the caller's shell."""
    monkeypatch.delenv("COLORA_BACKEND", raising=False)
    torch.manual_seed(0)


@dataclasses.dataclass(frozen=True)
class ConformanceBudget:
    """examples: random examples per property, or None for the fixed derandomized CI budget; seed: the
    Hypothesis seed of a random run (None in CI)."""
    examples: Optional[int]
    seed: Optional[int]

    def reproduce_args(self) -> str:
        return f"--conformance-examples {self.examples} --conformance-seed {self.seed}"


_BUDGET = pytest.StashKey[ConformanceBudget]()


@pytest.fixture
def one_thread():
    """The digits demo's 8×8 convs are fastest on one thread, and one thread keeps runs bit-reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    group = parser.getgroup("colora conformance")
    group.addoption("--conformance-examples", type=int, default=None, metavar="N",
                    help="random examples per conformance property instead of the fixed CI budget "
                         "(env COLORA_CONFORMANCE_EXAMPLES)")
    group.addoption("--conformance-seed", type=int, default=None, metavar="S",
                    help="seed of a --conformance-examples run; random and printed when not given "
                         "(env COLORA_CONFORMANCE_SEED)")


def _option_or_env(config, option: str, env: str) -> Optional[int]:
    value = config.getoption(option)
    if value is None and os.environ.get(env):
        value = int(os.environ[env])
    return value


def pytest_configure(config):
    examples = _option_or_env(config, "--conformance-examples", "COLORA_CONFORMANCE_EXAMPLES")
    seed = _option_or_env(config, "--conformance-seed", "COLORA_CONFORMANCE_SEED")
    if examples is not None and seed is None:
        seed = random.SystemRandom().randrange(2 ** 32)
    config.stash[_BUDGET] = ConformanceBudget(examples, seed if examples is not None else None)


def pytest_report_header(config):
    budget = config.stash[_BUDGET]
    if budget.examples is not None:
        return (f"colora conformance: {budget.examples} random examples per property, "
                f"reproduce with {budget.reproduce_args()}")
    return None


@pytest.fixture(scope="session")
def conformance_budget(pytestconfig) -> ConformanceBudget:
    return pytestconfig.stash[_BUDGET]
