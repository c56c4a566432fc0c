"""The shared test table: odd conv cases, per-dtype tolerances, and input construction.

Every backend and kernel test draws its shapes from CASES and its tolerances from TOLERANCE, so a new
corner case or a tolerance change is made in one place.
"""
import dataclasses
from typing import Optional, Tuple, Union

import pytest
import torch

from colora_fused.reference import colora_conv_reference

ORDERS = ("pointwise_first", "depthwise_first")

# (atol, rtol) against the float64 reference; atol is scaled by the reference's largest magnitude.
TOLERANCE = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (2e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
# GPU fp32 dots run in TF32 (10-bit mantissa): widen fp32 there.
TOLERANCE_TF32 = (2e-3, 1e-2)
# Where the Triton kernels run in the tests: on CPU tensors in the interpreter when there is no GPU (conftest sets
# TRITON_INTERPRET=1 before triton is imported), on CUDA tensors on a GPU machine (the interpreter is off there).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_device(backend: str) -> str:
    """The device a test runs `backend` on: TRITON_DEVICE for the backends that launch Triton kernels."""
    return TRITON_DEVICE if backend in ("triton", "hybrid") else "cpu"


def fp32_tolerance(device: str) -> Tuple[float, float]:
    return TOLERANCE_TF32 if device == "cuda" else TOLERANCE[torch.float32]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    dim: int
    c_in: int
    c_out: int
    size: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: Union[int, Tuple[int, ...]] = 1
    padding: Union[int, str, Tuple[int, ...]] = 0
    dilation: Union[int, Tuple[int, ...]] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    channels_last: bool = False
    batch: int = 2

    def conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups,
                    padding_mode=self.padding_mode)


CASES = [
    Case("2d-k3-pad1", 2, 5, 7, (9, 11), (3, 3), padding=1),
    Case("2d-k3-stride2", 2, 5, 6, (9, 9), (3, 3), stride=2, padding=1),
    Case("2d-k3-dilation2", 2, 3, 5, (10, 9), (3, 3), padding=2, dilation=2),
    Case("2d-groups3", 2, 6, 9, (7, 8), (3, 3), padding=1, groups=3),
    Case("2d-depthwise", 2, 6, 6, (7, 7), (3, 3), padding=1, groups=6),
    Case("2d-1x1-nobias", 2, 7, 5, (6, 5), (1, 1), bias=False),
    Case("2d-5x5-stride2", 2, 3, 4, (11, 10), (5, 5), stride=2, padding=2),
    Case("2d-rect-k", 2, 4, 5, (8, 9), (1, 3), padding=(0, 1), stride=(2, 1)),
    Case("2d-same-even-k", 2, 3, 4, (7, 8), (3, 4), padding="same"),
    Case("2d-valid", 2, 3, 4, (7, 6), (3, 3), padding="valid", bias=False),
    Case("2d-reflect", 2, 3, 5, (7, 8), (3, 3), padding=1, padding_mode="reflect"),
    Case("2d-replicate", 2, 4, 3, (6, 7), (3, 3), padding=(1, 2), padding_mode="replicate", stride=2),
    Case("2d-circular", 2, 3, 5, (6, 6), (3, 3), padding=1, padding_mode="circular", dilation=(1, 2)),
    Case("2d-channels-last", 2, 5, 7, (7, 9), (3, 3), padding=1, channels_last=True),
    Case("2d-channels-last-groups", 2, 4, 6, (8, 7), (3, 3), padding=1, groups=2, stride=2, channels_last=True),
    Case("1d-k3-stride2", 1, 5, 7, (13,), (3,), stride=2, padding=1),
    Case("1d-same-reflect", 1, 4, 6, (11,), (4,), padding="same", padding_mode="reflect", bias=False),
    Case("3d-k3-groups2", 3, 4, 6, (5, 6, 5), (3, 3, 3), padding=1, groups=2, stride=(1, 2, 2)),
    Case("3d-1x3x3-channels-last", 3, 3, 5, (4, 5, 6), (1, 3, 3), padding=(0, 1, 1), channels_last=True),
]

CASE_PARAMS = [pytest.param(c, id=c.id) for c in CASES]


def adapter_shapes(case: Case, order: str, rank: int = 1):
    c_in_g = case.c_in // case.groups
    kd_ch = case.c_out if order == "pointwise_first" else case.c_in
    lead = (rank,) if rank > 1 else ()
    return (*lead, case.c_out, c_in_g), (*lead, kd_ch, *case.kernel)


def make_tensors(case: Case, order: str, dtype=torch.float32, device="cpu", seed: int = 0,
                 zero_depthwise: bool = False, rank: int = 1):
    """Inputs of one case: x, weight, bias, pointwise, depthwise, bias_delta (bias/bias_delta may be None).

    Adapters are random (not their zero init) so that the residual really contributes to every output; `rank` > 1
    gives Kp, Kd a leading dim of r terms.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    c_in_g = case.c_in // case.groups
    fan_in = c_in_g * torch.Size(case.kernel).numel()
    kp_shape, kd_shape = adapter_shapes(case, order, rank)
    x = rnd(case.batch, case.c_in, *case.size)
    if case.channels_last:
        x = x.to(memory_format=torch.channels_last if case.dim == 2 else torch.channels_last_3d)
    weight = rnd(case.c_out, c_in_g, *case.kernel, scale=fan_in ** -0.5)
    pointwise = rnd(*kp_shape, scale=c_in_g ** -0.5)
    depthwise = rnd(*kd_shape, scale=0.0 if zero_depthwise else 0.5)
    bias = rnd(case.c_out) if case.bias else None
    bias_delta = rnd(case.c_out, scale=0.1) if case.bias else None
    return dict(x=x, weight=weight, bias=bias, pointwise=pointwise, depthwise=depthwise, bias_delta=bias_delta)


def reference_output(case: Case, order: str, tensors, grad_out: Optional[torch.Tensor] = None):
    """The float64 CPU reference output and, given `grad_out`, the gradients of every tensor input."""
    t64 = {k: (None if v is None else v.detach().to("cpu", torch.float64).requires_grad_(True))
           for k, v in tensors.items()}
    out = colora_conv_reference(t64["x"], t64["weight"], t64["bias"], t64["pointwise"], t64["depthwise"],
                                t64["bias_delta"], order=order, **case.conv_kwargs())
    if grad_out is None:
        return out.detach(), None
    out.backward(grad_out.detach().to("cpu", torch.float64))
    return out.detach(), {k: (None if v is None else v.grad) for k, v in t64.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "",
                 tol: Optional[Tuple[float, float]] = None):
    """Compare against a float64 reference with TOLERANCE[dtype]; atol scales with the reference's magnitude."""
    atol, rtol = tol or TOLERANCE[dtype]
    expected = expected.detach().to("cpu", torch.float64)
    actual = actual.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten tile?)"
    scale = max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_training_matches_reference(case: Case, order: str, backend: str, rank: int = 1, device="cpu",
                                      tol: Optional[Tuple[float, float]] = None):
    """One fp32 training call through `colora_conv` on `backend`: the output and the gradients of x, Kp, Kd and
    Δb (K0, b0 frozen) against the float64 reference."""
    from colora_fused import colora_conv

    t = make_tensors(case, order, torch.float32, device=device, rank=rank)
    t = {k: (None if v is None else v.requires_grad_(k not in ("weight", "bias"))) for k, v in t.items()}
    out = colora_conv(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"], order=order,
                      backend=backend, **case.conv_kwargs())
    grad = torch.randn_like(out)
    expected, grads = reference_output(case, order, t, grad)
    out.backward(grad)
    assert_close(out, expected, torch.float32, "out", tol)
    for name in ("x", "pointwise", "depthwise", "bias_delta"):
        if t[name] is not None:
            assert t[name].grad.shape == t[name].shape
            assert_close(t[name].grad, grads[name], torch.float32, name, tol)
