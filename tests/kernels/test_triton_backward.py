"""The Triton backward launchers (kernels/conv_bwd_input.py, kernels/conv_bwd_adapters.py and its algorithms) against
the float64 reference, on the shared case table.

CPU runs under TRITON_INTERPRET=1 (fp32 and fp16: the interpreter's bf16 dot is broken); CUDA runs fp32 (TF32
tolerance), fp16 and bf16 when a GPU is present. Every output starts as NaN (COLORA_NAN_FILL=1), so a tile a
kernel never writes fails `assert_close`'s finiteness check. The launchers see only symmetric zero padding: cases
with another padding mode, or asymmetric/string padding, pad x here and compare against the reference run on the
padded x with padding 0.
"""
import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cases import CASE_PARAMS, CASES, ORDERS, TOLERANCE, TOLERANCE_TF32, assert_close, make_tensors, reference_output
from colora_fused._conv import f_pad_arg, ntuple, pad_amounts

pytest.importorskip("triton")
from colora_fused.kernels import _common, adapters_one_pass, conv_bwd_adapters  # noqa: E402
from colora_fused.kernels.conv_bwd_adapters import colora_conv_backward_adapters  # noqa: E402
from colora_fused.kernels.conv_bwd_input import colora_conv_backward_input  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CPU = pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1"))
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, marks=CPU.marks, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, marks=CPU.marks, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, marks=CUDA.marks, id="cuda-fp32"),
    pytest.param("cuda", torch.float16, marks=CUDA.marks, id="cuda-fp16"),
    pytest.param("cuda", torch.bfloat16, marks=CUDA.marks, id="cuda-bf16"),
]


@pytest.fixture(autouse=True)
def nan_fill(monkeypatch):
    monkeypatch.setenv("COLORA_NAN_FILL", "1")


def tolerance(device, dtype):
    return TOLERANCE_TF32 if device == "cuda" and dtype == torch.float32 else TOLERANCE[dtype]


def setup_case(case, order, dtype, device, seed=0):
    """Launcher arguments for one case, with x padded here where the launcher's symmetric zero padding can't say
    it, and the float64 reference gradients of the same (padded) problem."""
    nd = case.dim
    tensors = make_tensors(case, order, dtype=dtype, device=device, seed=seed)
    dilation = ntuple(case.dilation, nd)
    amounts = pad_amounts(case.padding, case.kernel, dilation)
    x = tensors["x"]
    if case.padding_mode == "zeros" and all(before == after for before, after in amounts):
        padding = tuple(before for before, _ in amounts)
        ref_case = case
    else:
        mode = "constant" if case.padding_mode == "zeros" else case.padding_mode
        x = F.pad(x, f_pad_arg(amounts), mode=mode)
        padding = (0,) * nd
        ref_case = dataclasses.replace(case, size=tuple(x.shape[2:]), padding=0, padding_mode="zeros")
    tensors = dict(tensors, x=x)
    out, _ = reference_output(ref_case, order, tensors)
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    if case.channels_last:
        grad_out = grad_out.to(memory_format=CHANNELS_LAST[grad_out.dim()])
    _, grads = reference_output(ref_case, order, tensors, grad_out)
    conv = dict(stride=ntuple(case.stride, nd), padding=padding, dilation=dilation, groups=case.groups, order=order)
    return tensors, grad_out, conv, grads


def run_input(tensors, grad_out, conv, channels_last, split_k=None):
    return colora_conv_backward_input(grad_out, tensors["weight"], tensors["pointwise"], tensors["depthwise"],
                                      tensors["x"].shape, channels_last, **conv, split_k=split_k)


def route_by_taps(case):
    """A case's main route in these tests: gradw for ≤ 2 taps, else cheap (each test also runs the other)."""
    return "gradw" if math.prod(case.kernel) <= 2 else "cheap"


def run_adapters(tensors, grad_out, conv, route):
    return colora_conv_backward_adapters(tensors["x"], grad_out, tensors["weight"], tensors["pointwise"],
                                         tensors["depthwise"], **conv, route=route)


def check_adapters(result, grads, dtype, tol):
    d_pointwise, d_depthwise = result
    assert_close(d_pointwise, grads["pointwise"], dtype, "d_pointwise", tol)
    assert_close(d_depthwise, grads["depthwise"], dtype, "d_depthwise", tol)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward_input(case, order, device, dtype):
    tensors, grad_out, conv, grads = setup_case(case, order, dtype, device)
    grad_x = run_input(tensors, grad_out, conv, case.channels_last)
    assert grad_x.dtype == dtype and grad_x.device.type == device
    assert_close(grad_x, grads["x"], dtype, "grad_x", tolerance(device, dtype))
    fmt = CHANNELS_LAST[grad_x.dim()] if case.channels_last else torch.contiguous_format
    assert grad_x.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward_input_split_k(case, order):
    """Split-K of the input gradient (stride-1 convs, late layers' sub-wave grids): 3 shares, partials summed;
    a strided conv (several stride phases) refuses a split."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)
    if any(s != 1 for s in conv["stride"]):
        with pytest.raises(ValueError, match="stride-1"):
            run_input(tensors, grad_out, conv, case.channels_last, split_k=3)
        return
    grad_x = run_input(tensors, grad_out, conv, case.channels_last, split_k=3)
    assert_close(grad_x, grads["x"], torch.float32, "grad_x", tolerance(device, torch.float32))
    fmt = CHANNELS_LAST[grad_x.dim()] if case.channels_last else torch.contiguous_format
    assert grad_x.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward_adapters(case, order, device, dtype):
    tensors, grad_out, conv, grads = setup_case(case, order, dtype, device)
    result = run_adapters(tensors, grad_out, conv, route_by_taps(case))
    assert [t.dtype for t in result[:2]] == [dtype, dtype]
    check_adapters(result, grads, dtype, tolerance(device, dtype))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward_adapters_other_route(case, order, device):
    """The other route for this kernel size is exact too (both are general)."""
    route = "cheap" if route_by_taps(case) == "gradw" else "gradw"
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)
    result = run_adapters(tensors, grad_out, conv, route)
    check_adapters(result, grads, torch.float32, tolerance(device, torch.float32))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_backward_adapters_two_pass(case, order, device):
    """The cheap route's two-pass form (what the one-pass kernel leaves to it: depthwise base convs, many taps) is
    exact on every case too."""
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)
    result = run_adapters(tensors, grad_out, conv, "two_pass")
    check_adapters(result, grads, torch.float32, tolerance(device, torch.float32))


def meta_case(case, order):
    """A case's launcher arguments as meta tensors, for recording launches (`_common.recording`)."""
    tensors, grad_out, conv, _ = setup_case(case, order, torch.float32, "cpu")
    meta = {k: None if v is None else v.to("meta") for k, v in tensors.items()}
    return meta, grad_out.to("meta"), conv


def _taps(case):
    return math.prod(case.kernel)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", [c for c in CASE_PARAMS if c.values[0].groups < c.values[0].c_in
                                  and _taps(c.values[0]) <= adapters_one_pass.ONE_PASS_MAX_TAPS])
def test_cheap_route_runs_one_kernel_pass(case, order):
    """On the cheap route one kernel computes dKp and dKd where the one-pass kernel serves the shape; the
    depthwise base conv goes to the two-pass form."""
    tensors, grad_out, conv = meta_case(case, order)
    with _common.recording(_common.DeviceLimits(132, 232448)) as launches:
        run_adapters(tensors, grad_out, conv, "cheap")
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == ["_adapter_grads_one_pass_kernel"]


@pytest.mark.parametrize("case_id", ["2d-k3-pad1", "1d-k3-stride2", "3d-1x3x3-channels-last"])
def test_kernels_read_operands_channels_innermost(case_id):
    """NCHW activations and weights reach the kernels' main loops channels-innermost (one staging copy each), the
    layout the pipelined path reads; the forward and the input gradient write channels-innermost too, and what
    the launchers return keeps the caller's layout."""
    from colora_fused.kernels.conv_fwd import colora_conv_forward
    case = next(c for c in CASES if c.id == case_id)
    tensors, grad_out, conv = meta_case(case, "pointwise_first")
    x, weight = tensors["x"], tensors["weight"]
    with _common.recording(_common.DeviceLimits(132, 232448)) as launches:
        out = colora_conv_forward(x, weight, None, tensors["pointwise"], tensors["depthwise"], None, **conv)
        dx = run_input(tensors, grad_out, conv, case.channels_last)
        run_adapters(tensors, grad_out, conv, "cheap")
    fwd, bwd_in, adapters = launches
    innermost = [fwd.args[0], fwd.args[1], fwd.args[6], bwd_in.args[0], bwd_in.args[1], bwd_in.args[4],
                 adapters.args[0], adapters.args[1]]
    assert all(t.stride(1) == 1 for t in innermost), [t.stride() for t in innermost]
    if not case.channels_last:
        assert x.stride(1) != 1 and out.is_contiguous() and dx.is_contiguous()
        assert fwd.args[6] is not out, "an NCHW output is written channels-innermost, then copied"


@pytest.mark.parametrize("capability,case_id,one_pass", [(90, "3d-k3-groups2", False), (90, "2d-5x5-stride2", True),
                                                         (80, "2d-5x5-stride2", False), (80, "2d-k3-pad1", True)])
def test_one_pass_serves_up_to_a_number_of_taps(capability, case_id, one_pass, caplog, monkeypatch):
    """The one-pass kernel keeps one accumulator per tap: up to 25 taps on sm_90, 9 before; more go to the
    two-pass form, the reason logged."""
    monkeypatch.setattr(conv_bwd_adapters, "_TWO_PASS_LOGGED", set())
    case = next(c for c in CASES if c.id == case_id)
    tensors, grad_out, conv = meta_case(case, "pointwise_first")
    with _common.recording(_common.DeviceLimits(132, 232448, capability)) as launches, caplog.at_level("INFO"):
        run_adapters(tensors, grad_out, conv, "cheap")
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == (["_adapter_grads_one_pass_kernel"] if one_pass
                     else ["_pointwise_grad_kernel", "_depthwise_grad_kernel"])
    assert ("one accumulator per tap" in caplog.text) == (not one_pass)


def test_depthwise_base_conv_takes_two_pass_route(caplog, monkeypatch):
    monkeypatch.setattr(conv_bwd_adapters, "_TWO_PASS_LOGGED", set())
    case = next(c for c in CASES if c.groups == c.c_in)
    tensors, grad_out, conv = meta_case(case, "pointwise_first")
    with _common.recording(_common.DeviceLimits(132, 232448)) as launches, caplog.at_level("INFO"):
        run_adapters(tensors, grad_out, conv, "cheap")
        run_adapters(tensors, grad_out, conv, "cheap")
    names = [launch.kernel.fn.__name__ for launch in launches]
    assert names == ["_pointwise_grad_kernel", "_depthwise_grad_kernel"] * 2
    assert caplog.text.count("depthwise base conv") == 1, "the reason is logged once per shape"


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
def test_fp32_parameters_with_half_activations(order, device):
    """Autocast's mix: fp16 activations and grad_out, fp32 weight and adapters; adapter gradients come back fp32."""
    case = next(c for c in CASES if c.id == "2d-channels-last-groups")
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float16, device)
    mixed = dict(tensors, **{k: tensors[k].float() for k in ("weight", "pointwise", "depthwise")})
    tol = TOLERANCE[torch.float16]
    assert_close(run_input(mixed, grad_out, conv, True), grads["x"], torch.float16, "grad_x", tol)
    result = run_adapters(mixed, grad_out, conv, route_by_taps(case))
    assert [t.dtype for t in result[:2]] == [torch.float32] * 2
    check_adapters(result, grads, torch.float16, tol)


DETERMINISM_CASES = [pytest.param(c, id=c.id) for c in CASES if c.id in ("2d-1x1-nobias", "1d-k3-stride2")]


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", DETERMINISM_CASES)
def test_adapter_gradients_are_bit_identical_run_to_run(case, order, device):
    tensors, grad_out, conv, _ = setup_case(case, order, torch.float32, device)
    for route in ("cheap", "gradw", "two_pass"):
        first = run_adapters(tensors, grad_out, conv, route)
        second = run_adapters(tensors, grad_out, conv, route)
        assert all(a is b is None or torch.equal(a, b) for a, b in zip(first, second)), route
    assert torch.equal(run_input(tensors, grad_out, conv, False), run_input(tensors, grad_out, conv, False))


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_strided_views(device):
    """Non-contiguous grad_out and x (channel slices of larger tensors) are read through their strides."""
    case = next(c for c in CASES if c.id == "2d-k3-stride2")
    order = "depthwise_first"
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)
    wide_x = torch.zeros(case.batch, 2 * case.c_in, *case.size, device=device).transpose(2, 3)
    x_view = wide_x[:, ::2].transpose(2, 3)
    x_view.copy_(tensors["x"])
    wide_g = torch.zeros(grad_out.shape[0], grad_out.shape[1] + 3, *grad_out.shape[2:], device=device)
    g_view = wide_g[:, 3:]
    g_view.copy_(grad_out)
    assert not x_view.is_contiguous() and not g_view.is_contiguous()
    tol = tolerance(device, torch.float32)
    assert_close(run_input(tensors, g_view, conv, False), grads["x"], torch.float32, "grad_x", tol)
    check_adapters(run_adapters(dict(tensors, x=x_view), g_view, conv, route_by_taps(case)), grads, torch.float32,
                   tol)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case_id", ["2d-k3-pad1", "2d-valid"])
def test_channels_last_views_with_spatial_gaps(case_id, order, device):
    """Channels-innermost views whose positions are not evenly spaced (every other row of a taller channels_last
    tensor) take the one-pass kernel's decoded addressing; dense ones its flat offsets (`position_stride`). Both
    against the float64 reference, with output sizes equal to the input's (2d-k3-pad1: flat tap offsets) and not
    (2d-valid)."""
    from colora_fused.kernels._common import position_stride
    case = next(c for c in CASES if c.id == case_id)
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)

    def gapped(t):
        tall = torch.zeros(*t.shape[:-2], 2 * t.shape[-2], t.shape[-1], device=device).to(
            memory_format=torch.channels_last)
        view = tall[..., ::2, :]
        view.copy_(t)
        return view

    x_view, g_view = gapped(tensors["x"]), gapped(grad_out)
    assert x_view.stride(1) == 1 and position_stride(x_view.unsqueeze(2)) == 0
    assert position_stride(tensors["x"].contiguous(memory_format=torch.channels_last).unsqueeze(2)) == case.c_in
    tol = tolerance(device, torch.float32)
    check_adapters(run_adapters(dict(tensors, x=x_view), g_view, conv, "cheap"), grads, torch.float32, tol)


@pytest.mark.parametrize("order", ORDERS)
def test_one_pass_flat_addressing_flags(order):
    """Dense channels-innermost operands take flat offsets (FLAT_Q; FLAT_S where stride 1 keeps the sizes), views
    with uneven positions the decoded addresses."""
    flags = {}
    for case_id in ("2d-k3-pad1", "2d-valid", "2d-channels-last-groups"):
        case = next(c for c in CASES if c.id == case_id)
        tensors, grad_out, conv = meta_case(case, order)
        with _common.recording(_common.DeviceLimits(132, 232448)) as launches:
            run_adapters(tensors, grad_out, conv, "cheap")
        flags[case_id] = (launches[0].kwargs["FLAT_Q"], launches[0].kwargs["FLAT_S"])
    assert flags == {"2d-k3-pad1": (True, True), "2d-valid": (True, False), "2d-channels-last-groups": (True, False)}
    case = next(c for c in CASES if c.id == "2d-k3-pad1")
    tensors, grad_out, conv = meta_case(case, order)
    tall = torch.empty(case.batch, case.c_in, 2 * case.size[0], case.size[1], device="meta")
    gapped = tall.to(memory_format=torch.channels_last)[:, :, ::2]
    with _common.recording(_common.DeviceLimits(132, 232448)) as launches:
        run_adapters(dict(tensors, x=gapped), grad_out, conv, "cheap")
    assert launches[0].kwargs["FLAT_Q" if order == "pointwise_first" else "FLAT_S"] is False


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("kernel,padding,stride", [((3, 3, 1), (1, 1, 0), (1, 1, 1)),
                                                   ((2, 3, 3), (1, 1, 1), (2, 1, 2))])
def test_one_pass_3d_taps(kernel, padding, stride, order, device):
    """3-d kernels of ≤ 25 taps in the one-pass kernel (depth taps, depth stride) against the float64 reference."""
    case = dataclasses.replace(next(c for c in CASES if c.id == "3d-k3-groups2"), kernel=kernel, padding=padding,
                               stride=stride)
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)
    with _common.recording(_common.DeviceLimits(132, 232448)) as launches:
        run_adapters({k: None if v is None else v.to("meta") for k, v in tensors.items()}, grad_out.to("meta"), conv,
                     "cheap")
    assert launches[0].kernel.fn.__name__ == "_adapter_grads_one_pass_kernel"
    check_adapters(run_adapters(tensors, grad_out, conv, "cheap"), grads, torch.float32,
                   tolerance(device, torch.float32))


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("order", ORDERS)
def test_one_pass_inf_input_channel_leaves_other_channels_finite(order, device):
    """An inf in one input channel (with pointwise_first it makes the 1×1 product inf there) leaves dKp of the
    other input channels finite and equal to the reference's: they never read the inf channel."""
    case = next(c for c in CASES if c.id == "2d-k3-pad1")
    tensors, grad_out, conv, grads = setup_case(case, order, torch.float32, device)
    x = tensors["x"].clone()
    x[0, 0, 2, 3] = float("inf")
    d_kp, _ = run_adapters(dict(tensors, x=x), grad_out, conv, "cheap")
    assert torch.isfinite(d_kp[:, 1:]).all()
    assert_close(d_kp[:, 1:], grads["pointwise"][:, 1:], torch.float32, "d_pointwise without the inf channel",
                 tolerance(device, torch.float32))


def bad_input_args(device="cpu", dtype=torch.float32):
    case = next(c for c in CASES if c.id == "2d-k3-pad1")
    tensors, grad_out, conv, _ = setup_case(case, "pointwise_first", torch.float32, "cpu")
    tensors = {k: (v.to(device, dtype) if v is not None else None) for k, v in tensors.items()}
    return tensors, grad_out.to(device, dtype), conv


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="needs a device the kernels run on")
class TestBadInput:
    device = "cpu" if INTERPRET else "cuda"

    @pytest.mark.parametrize("launcher", ["input", "adapters"])
    def test_float64_is_refused(self, launcher):
        tensors, grad_out, conv = bad_input_args(self.device, torch.float64)
        with pytest.raises(TypeError, match='triton backend.*float64.*backend="torch"'):
            if launcher == "input":
                run_input(tensors, grad_out, conv, False)
            else:
                run_adapters(tensors, grad_out, conv, "cheap")

    def test_cpu_tensors_without_interpreter(self, monkeypatch):
        tensors, grad_out, conv = bad_input_args("cpu")
        monkeypatch.setattr(_common, "INTERPRET", False)
        with pytest.raises(ValueError, match='triton backend.*CUDA.*backend="torch"'):
            run_input(tensors, grad_out, conv, False)
        with pytest.raises(ValueError, match='triton backend.*CUDA.*backend="torch"'):
            run_adapters(tensors, grad_out, conv, "cheap")

    def test_mismatched_devices(self):
        tensors, grad_out, conv = bad_input_args(self.device)
        with pytest.raises(ValueError, match="triton backend.*different devices"):
            run_adapters(tensors, grad_out.to("meta"), conv, "cheap")

    def test_mismatched_dtypes(self):
        tensors, grad_out, conv = bad_input_args(self.device)
        with pytest.raises(TypeError, match="triton backend.*share a dtype"):
            run_adapters(tensors, grad_out.half(), conv, "cheap")

    @pytest.mark.parametrize("change,match", [
        (dict(order="sideways"), "unknown order"),
        (dict(padding=1), "padding must be a tuple of 2 ints"),
        (dict(stride=(0, 1)), "stride must be a tuple of 2 ints >= 1"),
        (dict(groups=2), "groups=2"),
    ])
    def test_bad_hyper_parameters(self, change, match):
        tensors, grad_out, conv = bad_input_args(self.device)
        with pytest.raises(ValueError, match=f"triton backend.*{match}"):
            run_input(tensors, grad_out, dict(conv, **change), False)

    def test_route_is_the_callers(self):
        tensors, grad_out, conv = bad_input_args(self.device)
        with pytest.raises(TypeError, match="route"):
            colora_conv_backward_adapters(tensors["x"], grad_out, tensors["weight"], tensors["pointwise"],
                                          tensors["depthwise"], **conv)
        with pytest.raises(ValueError, match="triton backend.*unknown route 'fast'"):
            run_adapters(tensors, grad_out, conv, "fast")

    def test_bad_shapes(self):
        tensors, grad_out, conv = bad_input_args(self.device)
        with pytest.raises(ValueError, match="triton backend.*depthwise has shape"):
            run_adapters(dict(tensors, depthwise=tensors["depthwise"][:, :2]), grad_out, conv, "cheap")
        with pytest.raises(ValueError, match="triton backend.*grad_out has shape"):
            run_input(tensors, grad_out[..., :-1], conv, False)
        with pytest.raises(ValueError, match="triton backend.*grad_out has shape"):
            run_adapters(tensors, grad_out[:1], conv, "cheap")
