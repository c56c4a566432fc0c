"""The one dispatch point: backend resolution, the triton backend's refusals, and the measured `auto` choice."""
import pytest
import torch

import colora_fused as cf
from colora_fused import backends, functional
from colora_fused.functional import colora_conv, fastest_backend, resolve_backend

from cases import CASES, TRITON_DEVICE, assert_close, fp32_tolerance, make_tensors, reference_output

CASE = CASES[0]


def _args(dtype=torch.float32, device="cpu"):
    t = make_tensors(CASE, "pointwise_first", dtype, device=device)
    return t, (t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"])


def test_auto_is_torch_on_cpu(monkeypatch):
    _, args = _args()
    assert resolve_backend("auto", args[0], args[1], 1) == "torch"
    monkeypatch.setenv("COLORA_BACKEND", "reference")
    assert resolve_backend("auto", args[0], args[1], 1) == "reference"
    assert resolve_backend("torch", args[0], args[1], 1) == "torch"  # an explicit backend beats the variable


def test_env_override_reaches_the_layer_output(monkeypatch):
    t, args = _args(device=TRITON_DEVICE)
    expected, _ = reference_output(CASE, "pointwise_first", t)
    monkeypatch.setenv("COLORA_BACKEND", "triton")
    out = colora_conv(*args, **CASE.conv_kwargs())
    assert_close(out, expected, torch.float32, "triton via COLORA_BACKEND", fp32_tolerance(TRITON_DEVICE))


@pytest.mark.parametrize("bad", ["cuda", "", "Torch"])
def test_unknown_backend_is_refused(monkeypatch, bad):
    _, args = _args()
    if bad:
        with pytest.raises(ValueError, match="unknown backend"):
            colora_conv(*args, backend=bad)
    monkeypatch.setenv("COLORA_BACKEND", bad or "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        colora_conv(*args)


def test_triton_refuses_float64_with_the_way_out():
    _, args = _args(torch.float64, TRITON_DEVICE)
    with pytest.raises(ValueError, match=r"backend='triton'.*float64.*backend='torch'"):
        colora_conv(*args, backend="triton")


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    _, args = _args()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*backend='torch'"):
        colora_conv(*args, backend="triton")


@pytest.mark.parametrize("training", [False, True], ids=["forward", "training"])
def test_fastest_backend_measures_once_and_caches(monkeypatch, training):
    cf.clear_caches()
    t, _ = _args(device=TRITON_DEVICE)
    calls = []
    fake_ms = {"triton": 1.0, "torch": 2.0}

    def fake_time(fn, device, repeats=5):
        fn()  # the candidate really runs
        calls.append(len(calls))
        return fake_ms["triton" if len(calls) == 1 else "torch"]

    monkeypatch.setattr(functional, "_time_ms", fake_time)
    conv = (t["x"], t["weight"], t["pointwise"], t["depthwise"], [1, 1], [1, 1], [1, 1], 1, "pointwise_first")
    conv = conv + (training, ("triton", "torch"))
    assert fastest_backend(*conv) == "triton"
    assert fastest_backend(*conv) == "triton"
    assert len(calls) == 2  # measured once per candidate, then cached
    fake_ms.update(triton=3.0)
    cf.clear_caches()
    calls.clear()
    assert fastest_backend(*conv) == "torch"


def test_fastest_backend_weighs_hybrid_in_training_only(monkeypatch):
    """auto's three candidates: the fused kernels, hybrid (library convs, one-pass adapter gradients) and torch;
    hybrid's forward is torch's, so only a training step tells them apart."""
    pytest.importorskip("triton")
    cf.clear_caches()
    t, _ = _args(device=TRITON_DEVICE)
    timed = []
    fake_ms = {"triton": 3.0, "hybrid": 1.0, "torch": 2.0}
    names = iter(())

    def fake_time(fn, device, repeats=5):
        fn()
        name = next(names)
        timed.append(name)
        return fake_ms[name]

    monkeypatch.setattr(functional, "_time_ms", fake_time)
    conv = (t["x"], t["weight"], t["pointwise"], t["depthwise"], [1, 1], [1, 1], [1, 1], 1, "pointwise_first")
    names = iter(backends.AUTO_CANDIDATES)
    assert fastest_backend(*conv, True) == "hybrid"
    assert timed == ["triton", "hybrid", "torch"]
    timed.clear()
    names = iter(("triton", "torch"))
    assert fastest_backend(*conv, False) == "torch"
    assert timed == ["triton", "torch"]


def test_auto_leaves_thin_groups_to_the_library_conv(monkeypatch):
    """Depthwise and other thin groups: the fused kernels have no tensor-core tile there, so `auto` weighs only
    hybrid and torch (cuDNN on the merged weight); a dense conv still weighs the fused kernels too. An explicit
    backend="triton" still runs the fused kernels on a depthwise conv, exactly."""
    pytest.importorskip("triton")
    monkeypatch.setattr(functional, "_auto_considers_triton", lambda x: True)
    monkeypatch.setenv("COLORA_AUTOTUNE", "1")
    weighed = []

    def fake_fastest(*args, candidates=backends.AUTO_CANDIDATES, **kwargs):
        weighed.append(tuple(args[-1] if isinstance(args[-1], tuple) else candidates))
        return weighed[-1][0]

    monkeypatch.setattr(functional, "fastest_backend", fake_fastest)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g).to(TRITON_DEVICE)
    for c_in_g, groups, expected in ((1, 8, ("hybrid", "torch")), (8, 1, backends.AUTO_CANDIDATES)):
        weight = torch.randn(8, c_in_g, 3, 3, generator=g).to(TRITON_DEVICE)
        kp, kd = (torch.randn(8, c_in_g, generator=g).to(TRITON_DEVICE),
                  torch.randn(8, 3, 3, generator=g).to(TRITON_DEVICE))
        assert functional.chosen_backend(x, weight, None, kp, kd, None, 1, 1, 1, groups) == expected[0]
        assert weighed[-1] == expected
        out = colora_conv(x, weight, None, kp, kd, None, 1, 1, 1, groups, backend="triton")
        ref = functional.colora_conv_reference(x.double(), weight.double(), None, kp.double(), kd.double(), None,
                                               1, 1, 1, groups, "zeros", "pointwise_first")
        assert_close(out, ref, torch.float32, f"explicit triton, groups={groups}", fp32_tolerance(TRITON_DEVICE))
