"""Test setup: Triton kernels run on CPU tensors in the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, which is why it is set here, at collection.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed_and_backend(monkeypatch):
    """Each test starts from the same seed and without a COLORA_BACKEND override from the caller's shell."""
    monkeypatch.delenv("COLORA_BACKEND", raising=False)
    torch.manual_seed(0)
