"""What the package says about the versions it runs on: the triton-3.6 interpreter's numpy limit, read at the
launch (readable instead of a TypeError deep in the interpreter)."""
import numpy
import pytest
import triton

from colora_fused.kernels import _common


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.4.1", False), ("3.8.0", "2.4.6", False),
    ("3.6.0+git1234", "2.5.0rc1", True)])
def test_old_interpreter_with_new_numpy_is_refused_with_the_fix(monkeypatch, triton_version, numpy_version,
                                                                 refused):
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    problem = _common.interpreter_problem()
    assert (problem is not None) == refused
    if refused:
        assert "numpy < 2.4" in problem and numpy_version in problem
