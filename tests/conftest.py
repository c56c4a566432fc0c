"""Test setup: Triton kernels run on CPU tensors in the interpreter when no GPU is present; on a GPU they run
one fixed config each instead of autotuning every tiny test shape.

Both variables are read when triton and the kernels are first imported, which is why they are set here, at
collection.
"""
import os

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
