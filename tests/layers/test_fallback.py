"""Never fail where torch works (issue 10, item 5): under `auto`, a Triton failure in the forward or the backward
logs one warning naming the shape and runs the torch path; an explicit backend="triton" raises a clear error.

The failure is forced by making the Triton launcher raise, under the interpreter on CPU (where `auto` is made to
consider Triton, as it does on CUDA).
"""
import logging

import pytest
import torch

import colora_fused as cf
from colora_fused import backends, functional, ops

from cases import CASES, assert_close, make_tensors, reference_output

pytest.importorskip("triton")
import colora_fused.kernels.conv_bwd_input as conv_bwd_input  # noqa: E402
import colora_fused.kernels.conv_fwd as conv_fwd  # noqa: E402

CASE = CASES[0]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _auto_takes_triton(monkeypatch):
    """`auto` weighs Triton here as on CUDA, takes it without timing, and forgets earlier failures (and, after
    the test, those it caused)."""
    monkeypatch.setattr(functional, "_auto_considers_triton", lambda x: True)
    monkeypatch.setenv("COLORA_AUTOTUNE", "0")
    cf.clear_caches()
    yield
    cf.clear_caches()


def _broken_launch(*args, **kwargs):
    raise RuntimeError("out of resources: shared memory, Required: 262144, Hardware limit: 232448")


def _run(backend):
    t = make_tensors(CASE, "pointwise_first", torch.float32, device=DEVICE)
    t = {k: (None if v is None else v.requires_grad_(k not in ("weight", "bias"))) for k, v in t.items()}
    out = cf.colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                         backend=backend, **CASE.conv_kwargs())
    grad = torch.randn_like(out)
    expected, grads = reference_output(CASE, "pointwise_first", t, grad)
    out.backward(grad)
    tol = (2e-3, 1e-2) if DEVICE == "cuda" else None
    assert_close(out, expected, torch.float32, "out", tol)
    for k in ("x", "pointwise", "depthwise", "bias_delta"):
        assert_close(t[k].grad, grads[k], torch.float32, f"grad {k}", tol)
    return t


def _fallback_warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and "Triton failed" in r.getMessage()]


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_auto_falls_back_to_torch_with_one_warning(monkeypatch, caplog, where):
    module = conv_fwd if where == "forward" else conv_bwd_input
    monkeypatch.setattr(module, "launch", _broken_launch)
    with caplog.at_level(logging.WARNING, logger="colora_fused"):
        t = _run("auto")
        _run("auto")
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert str(list(t["x"].shape)) in message and str(list(t["weight"].shape)) in message
    assert "out of resources" in message
    assert functional.chosen_backend(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"],
                                     t["bias_delta"], **CASE.conv_kwargs()) == "torch"


def test_auto_reports_triton_while_it_works():
    t = make_tensors(CASE, "pointwise_first", torch.float32, device=DEVICE)
    assert functional.chosen_backend(*t.values(), **CASE.conv_kwargs()) == "triton"
    assert functional.chosen_backend(*t.values(), **CASE.conv_kwargs(), backend="torch") == "torch"


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_explicit_triton_raises_a_clear_error(monkeypatch, where):
    module = conv_fwd if where == "forward" else conv_bwd_input
    monkeypatch.setattr(module, "launch", _broken_launch)
    with pytest.raises(RuntimeError, match=r"backend='triton' failed on x \[2, 5, 9, 11\].*out of resources.*"
                                           r"backend='torch'"):
        _run("triton")
    assert not ops._TRITON_FAILURES, "an explicit triton failure must not change what auto does"


def test_measured_auto_never_picks_a_failing_triton(monkeypatch, caplog):
    """Between a failing fused path and torch, measured `auto` takes torch (hybrid left out: which of it and torch
    is faster is a matter of timing, not of failure)."""
    monkeypatch.setenv("COLORA_AUTOTUNE", "1")
    monkeypatch.setattr(backends, "AUTO_CANDIDATES", ("triton", "torch"))
    monkeypatch.setattr(conv_fwd, "launch", _broken_launch)
    with caplog.at_level(logging.WARNING, logger="colora_fused"):
        _run("auto")
    assert list(functional._FASTEST.values()) == ["torch"]
    assert len(_fallback_warnings(caplog)) == 1


def test_auto_on_hybrid_falls_back_to_torch_with_one_warning(monkeypatch, caplog):
    """The hybrid path's Triton part is the one-pass adapter-gradient kernel: its failure under `auto` is one
    warning, then the torch path, whose gradients are exact."""
    import colora_fused.kernels.conv_bwd_adapters as conv_bwd_adapters
    monkeypatch.setattr(backends, "AUTO_CANDIDATES", ("hybrid", "torch"))
    monkeypatch.setattr(conv_bwd_adapters, "colora_conv_backward_adapters", _broken_launch)
    monkeypatch.setenv("COLORA_GRAD_ROUTE", "cheap")
    with caplog.at_level(logging.WARNING, logger="colora_fused"):
        t = _run("auto")
        _run("auto")
    warnings = _fallback_warnings(caplog)
    assert len(warnings) == 1 and "hybrid backend" in warnings[0].getMessage()
    assert functional.chosen_backend(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"],
                                     t["bias_delta"], **CASE.conv_kwargs()) == "torch"


def test_explicit_hybrid_raises_a_clear_error(monkeypatch):
    import colora_fused.kernels.conv_bwd_adapters as conv_bwd_adapters
    monkeypatch.setattr(conv_bwd_adapters, "colora_conv_backward_adapters", _broken_launch)
    monkeypatch.setenv("COLORA_GRAD_ROUTE", "cheap")
    with pytest.raises(RuntimeError, match=r"backend='hybrid' failed on x \[2, 5, 9, 11\].*out of resources"):
        _run("hybrid")
    assert not ops._TRITON_FAILURES
