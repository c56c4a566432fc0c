"""The segmented fused forward, input gradient and adapter gradients (a mixed batch, design §10) against the
float64 reference run sample by sample: every sample convolved with K0 + ΔK of its own adapter set (one of no
adapter among them), its input gradient through that same kernel, and each set's adapter gradients summed over its
own samples; CPU tests in the interpreter, CUDA tests where a GPU is present."""
import pytest
import torch

from cases import CASES, ORDERS, Case, TOLERANCE, TOLERANCE_TF32, assert_close, make_tensors
from colora_fused import mixed_ops
from colora_fused._conv import adapter_shapes, ntuple
from colora_fused.kernels.conv_bwd_adapters import colora_conv_backward_adapters
from colora_fused.kernels.conv_bwd_input import colora_conv_backward_input
from colora_fused.kernels.conv_fwd import colora_conv_forward
from colora_fused.kernels.segmented import segments_of
from colora_fused.reference import colora_conv_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The launcher takes symmetric zero padding (the layers apply other padding before it); these cases cover stride,
# dilation, groups, depthwise, channels_last, 1d and 3d (the stride-2 ones: dX's stride phases).
ZERO_PADDED = [c for c in CASES if c.id in ("2d-k3-dilation2", "2d-depthwise", "2d-channels-last-groups",
                                            "1d-k3-stride2", "3d-k3-groups2")]
INDEX = [2, 0, 1, 2, 0]  # sets 0 and 2 with adapters, set 1 none (the base conv)
# Samples of fewer positions than a block of the one-pass kernel (9 < 16, the interpreter's BLOCK_K): its blocks
# then span several samples, each position's batch sample read from the table (GATHER).
TINY = Case("2d-tiny-channels-last", 2, 4, 6, (3, 3), (3, 3), padding=1, channels_last=True)
# The adapter gradients' algorithm per case ("cheap": the one-pass kernel, or the two-pass form for a depthwise base
# conv or more than 25 taps), so that each kernel meets stride, dilation, groups, channels_last and 1d/3d.
ROUTE = {"2d-k3-dilation2": "cheap", "2d-depthwise": "cheap", "2d-channels-last-groups": "cheap",
         "1d-k3-stride2": "two_pass", "3d-k3-groups2": "gradw", TINY.id: "cheap"}


def _mixed_batch(case, order):
    """(x, base tensors, the sets' adapters (set 1 None), their stacked factors, index, segments, conv args)."""
    nd = case.dim
    base = make_tensors(case, order, torch.float32, DEVICE)
    x = make_tensors(case.__class__(**{**case.__dict__, "batch": len(INDEX)}), order, torch.float32, DEVICE)["x"]
    sets = [make_tensors(case, order, torch.float32, DEVICE, seed=s, rank=1 + (s == 2)) for s in (1, 2, 3)]
    adapters = [(t["pointwise"], t["depthwise"], t["bias_delta"]) for t in sets]
    adapters[1] = None
    stacked = mixed_ops.stacked_factors(adapters, base["weight"], case.groups, order)
    index = torch.tensor(INDEX, device=DEVICE)
    segments = segments_of(index, [INDEX.count(s) for s in range(len(adapters))])
    conv = dict(stride=ntuple(case.stride, nd), padding=ntuple(case.padding, nd), dilation=ntuple(case.dilation, nd))
    return x, base, adapters, stacked, index, segments, conv


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", ZERO_PADDED, ids=lambda c: c.id)
def test_each_sample_matches_the_reference_with_its_set(case, order):
    x, base, adapters, (kp, kd, db), index, segments, conv = _mixed_batch(case, order)
    out = colora_conv_forward(x, base["weight"], base["bias"], kp, kd, db, conv["stride"], conv["padding"],
                              conv["dilation"], case.groups, order, segments=segments)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    grad_x = colora_conv_backward_input(grad_out, base["weight"], kp, kd, x.shape, case.channels_last,
                                        conv["stride"], conv["padding"], conv["dilation"], case.groups, order,
                                        segments=segments)
    kp_shape, kd_shape = adapter_shapes(base["weight"].shape, case.groups, order)
    tolerance = TOLERANCE_TF32 if DEVICE == "cuda" else TOLERANCE[torch.float32]
    for n, s in enumerate(INDEX):
        factors = adapters[s] or (torch.zeros(kp_shape), torch.zeros(kd_shape), None)
        f64 = [None if t is None else t.detach().to("cpu", torch.float64) for t in
               (x[n:n + 1], base["weight"], base["bias"], *factors)]
        f64[0].requires_grad_(True)
        expected = colora_conv_reference(*f64, **conv, groups=case.groups, order=order)
        assert_close(out[n:n + 1], expected, torch.float32, f"sample {n} (set {s})", tolerance)
        (expected_dx,) = torch.autograd.grad(expected, f64[0], grad_out[n:n + 1].to("cpu", torch.float64))
        assert_close(grad_x[n:n + 1], expected_dx, torch.float32, f"dx of sample {n} (set {s})", tolerance)
    if case.channels_last:
        assert out.stride(1) == 1 and grad_x.stride(1) == 1


# Each kernel in both orders on one case at least (one-pass: dilation2; two-pass: 1d), the other cases in one order
# (the slow interpreter cases in pointwise_first; TINY's per-position path in depthwise_first, whose blocks span
# the 3×3 output positions of several samples).
_BY_ID = {c.id: c for c in ZERO_PADDED + [TINY]}
ADAPTER_CASES = [(_BY_ID[i], o) for i, orders in (
    ("2d-k3-dilation2", ORDERS), ("1d-k3-stride2", ORDERS), ("2d-depthwise", ["pointwise_first"]),
    ("2d-channels-last-groups", ["depthwise_first"]), ("3d-k3-groups2", ["pointwise_first"]),
    (TINY.id, ["depthwise_first"])) for o in orders]


@pytest.mark.parametrize("case,order", ADAPTER_CASES, ids=lambda v: getattr(v, "id", v))
def test_each_sets_adapter_gradients_sum_over_its_samples(case, order):
    """dKp and dKd of every set (the base-only set's too: its zero factors' gradients) in one segmented launch
    per kernel, against the float64 reference's gradients of that set's factors over that set's samples."""
    x, base, adapters, (kp, kd, _), index, segments, conv = _mixed_batch(case, order)
    out_shape = colora_conv_reference(x[:1].cpu(), base["weight"].cpu(), None, kp[0].cpu(), kd[0].cpu(), None,
                                      **conv, groups=case.groups, order=order).shape[1:]
    grad_out = torch.randn((len(INDEX), *out_shape), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    if case.channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    d_kp, d_kd = colora_conv_backward_adapters(x, grad_out, base["weight"], kp, kd, conv["stride"], conv["padding"],
                                               conv["dilation"], case.groups, order, route=ROUTE[case.id],
                                               segments=segments)
    assert d_kp.shape == kp.shape and d_kd.shape == kd.shape
    tolerance = TOLERANCE_TF32 if DEVICE == "cuda" else TOLERANCE[torch.float32]
    for s in range(len(adapters)):
        rows = [n for n, i in enumerate(INDEX) if i == s]
        f64 = [t.detach().to("cpu", torch.float64) for t in (x[rows], base["weight"], kp[s], kd[s])]
        kp64, kd64 = f64[2].requires_grad_(True), f64[3].requires_grad_(True)
        expected = colora_conv_reference(f64[0], f64[1], None, kp64, kd64, None, **conv, groups=case.groups,
                                         order=order)
        expected_kp, expected_kd = torch.autograd.grad(expected, (kp64, kd64),
                                                       grad_out[rows].to("cpu", torch.float64))
        assert_close(d_kp[s], expected_kp, torch.float32, f"dKp of set {s}", tolerance)
        assert_close(d_kd[s], expected_kd, torch.float32, f"dKd of set {s}", tolerance)


def test_stacked_factors_refused_when_not_per_set():
    case = CASES[0]
    t = make_tensors(case, "pointwise_first", torch.float32, DEVICE)
    segments = segments_of(torch.tensor([0, 0], device=DEVICE), [2])
    with pytest.raises(Exception, match="stacked per set"):
        colora_conv_forward(t["x"], t["weight"], None, t["pointwise"], t["depthwise"], None, (1, 1), (1, 1),
                            (1, 1), 1, "pointwise_first", segments=segments)
    conv = ((1, 1), (1, 1), (1, 1), 1, "pointwise_first")
    grad_out = torch.zeros_like(colora_conv_reference(t["x"].cpu(), t["weight"].cpu(), None, t["pointwise"].cpu(),
                                                      t["depthwise"].cpu(), None, *conv[:3])).to(DEVICE)
    with pytest.raises(Exception, match="stacked per set"):
        colora_conv_backward_input(grad_out, t["weight"], t["pointwise"], t["depthwise"], t["x"].shape, False, *conv,
                                   segments=segments)
    with pytest.raises(Exception, match="stacked per set"):
        colora_conv_backward_adapters(t["x"], grad_out, t["weight"], t["pointwise"], t["depthwise"], *conv,
                                      route="cheap", segments=segments)
