"""The fused forward and merge kernels against the float64 reference.

CPU tests run the kernels under TRITON_INTERPRET=1 (conftest sets it when there is no GPU); CUDA tests run
where a GPU is present. Outputs start NaN-filled, so a tile the kernel never writes fails the comparison.
"""
import pytest
import torch
import torch.nn.functional as F

from cases import CASE_PARAMS, CASES, ORDERS, TOLERANCE, TOLERANCE_TF32, assert_close, make_tensors, \
    reference_output
from colora_fused._conv import f_pad_arg, ntuple, pad_amounts
from colora_fused.kernels import _common, conv_fwd
from colora_fused.kernels.conv_fwd import colora_conv_forward, supports_forward
from colora_fused.kernels.merge import merge_
from colora_fused.reference import delta_weight_reference

requires_interpreter = pytest.mark.skipif(not _common.INTERPRET, reason="CPU kernels need TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
BY_ID = {c.id: c for c in CASES}


def launcher_conv_args(case, x):
    """x and the launcher's conv arguments: padding modes and string padding applied with F.pad first."""
    nd = case.dim
    dilation = ntuple(case.dilation, nd)
    if case.padding_mode != "zeros" or isinstance(case.padding, str):
        mode = "constant" if case.padding_mode == "zeros" else case.padding_mode
        x = F.pad(x, f_pad_arg(pad_amounts(case.padding, case.kernel, dilation)), mode=mode)
        padding = (0,) * nd
    else:
        padding = ntuple(case.padding, nd)
    return x, dict(stride=ntuple(case.stride, nd), padding=padding, dilation=dilation, groups=case.groups)


def nan_output(shape, like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    out = torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return out.contiguous(memory_format=CHANNELS_LAST[len(shape)]) if channels_last else out


def run_forward(case, order, t, x=None, out=None, split_k=None):
    x, conv = launcher_conv_args(case, t["x"] if x is None else x)
    return colora_conv_forward(x, t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                               order=order, out=out, split_k=split_k, **conv)


def check_forward(case, order, dtype, device, tol=None, split_k=None):
    t = make_tensors(case, order, dtype, device=device)
    expected, _ = reference_output(case, order, t)
    out = nan_output(expected.shape, t["x"], case.channels_last)
    result = run_forward(case, order, t, out=out, split_k=split_k)
    assert result is out
    assert_close(out, expected, dtype, case.id, tol=tol)


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward_matches_reference(case, order, dtype):
    check_forward(case, order, dtype, "cpu")


@requires_interpreter
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward_split_k_matches_reference(case, order):
    """Split-K (the sub-wave grids of late layers): 3 shares of the K loop, partials summed, biases once."""
    check_forward(case, order, torch.float32, "cpu", split_k=3)


def test_forward_splits_only_grids_under_one_wave():
    """On the audit's H100 (132 SMs): ResNet-50's 7×7 stage (100 tiles of 128×128) gets 2 shares, the 14×14
    stage (196 tiles) none; the interpreter never splits on its own."""
    h100 = _common.DeviceLimits(132, 232448)
    meta = torch.device("meta")
    with _common.recording(h100):
        assert conv_fwd.forward_split(64 * 7 * 7, 512, 1, 512, 9, meta) == 2
        assert conv_fwd.forward_split(64 * 14 * 14, 256, 1, 256, 9, meta) == 1
        assert conv_fwd.forward_split(8 * 7 * 7, 512, 1, 512, 9, meta) == _common.MAX_SPLIT_K
        assert conv_fwd.forward_split(8 * 7 * 7, 512, 1, 64, 1, meta) == 1  # too short a K loop to share
    assert conv_fwd.forward_split(64 * 7 * 7, 512, 1, 512, 9, torch.device("cpu")) == 1


@requires_interpreter
@pytest.mark.parametrize("case_id", ["2d-k3-pad1", "2d-channels-last-groups", "1d-k3-stride2",
                                     "3d-1x3x3-channels-last"])
def test_forward_output_takes_x_layout(case_id):
    case = BY_ID[case_id]
    t = make_tensors(case, "pointwise_first")
    out = run_forward(case, "pointwise_first", t)
    if case.channels_last:
        assert out.is_contiguous(memory_format=CHANNELS_LAST[out.dim()]) and not out.is_contiguous()
    else:
        assert out.is_contiguous()
    assert_close(out, reference_output(case, "pointwise_first", t)[0], torch.float32, case_id)


@requires_interpreter
@pytest.mark.parametrize("order", ORDERS)
def test_forward_reads_input_strides(order):
    """A sliced NCHW view, a channels-last 1d view and a transposed out are used as they are, never copied."""
    case = BY_ID["2d-k3-stride2"]
    t = make_tensors(case, order)
    expected, _ = reference_output(case, order, t)
    big = torch.full((3, case.c_in + 2, case.size[0] + 1, case.size[1] + 3), float("nan"))
    big[1:, 1:-1, 1:, 2:-1] = t["x"]
    out = torch.full(expected.shape[::-1], float("nan")).permute(3, 2, 1, 0)
    run_forward(case, order, t, x=big[1:, 1:-1, 1:, 2:-1], out=out)
    assert_close(out, expected, torch.float32, "sliced x")

    case = BY_ID["1d-k3-stride2"]
    t = make_tensors(case, order)
    x_nlc = t["x"].transpose(1, 2).contiguous().transpose(1, 2)
    out = run_forward(case, order, t, x=x_nlc)
    assert out.stride(1) == 1
    assert_close(out, reference_output(case, order, t)[0], torch.float32, "1d channels last")


@requires_interpreter
@pytest.mark.parametrize("case_id", ["2d-k3-pad1", "2d-depthwise", "3d-k3-groups2"])
def test_forward_int64_offsets(case_id, monkeypatch):
    """The 64-bit indexing path (taken when a tensor spans 2^31 elements) computes the same output."""
    monkeypatch.setattr(conv_fwd, "extent", lambda t: 2 ** 31)
    check_forward(BY_ID[case_id], "depthwise_first", torch.float32, "cpu")


def check_merge_in_place(case, order, dtype, device):
    """The in-place merge of the case's layer (a channels_last weight where the case is channels_last)."""
    t = make_tensors(case, order, dtype, device=device)
    weight, bias = t["weight"].clone(), None if t["bias"] is None else t["bias"].clone()
    if case.channels_last:
        weight = weight.contiguous(memory_format=CHANNELS_LAST[weight.dim()])
    expected = t["weight"].double().cpu() + delta_weight_reference(
        t["pointwise"].double().cpu(), t["depthwise"].double().cpu(), case.groups, order)
    ptr, version, strides = weight.data_ptr(), weight._version, weight.stride()
    merge_(weight, bias, t["pointwise"], t["depthwise"], t["bias_delta"], case.groups, order)
    assert weight.data_ptr() == ptr and weight._version > version and weight.stride() == strides
    assert_close(weight, expected, dtype, f"{case.id} weight")
    if bias is not None:
        assert_close(bias, t["bias"].double().cpu() + t["bias_delta"].double().cpu(), dtype, f"{case.id} bias")


@requires_interpreter
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_merge_in_place(case, order):
    check_merge_in_place(case, order, torch.float32, "cpu")


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_id", ["2d-groups3", "3d-k3-groups2"])
def test_merge_half_precision(case_id, dtype):
    check_merge_in_place(BY_ID[case_id], "depthwise_first", dtype, "cpu")


@requires_interpreter
def test_merge_keeps_bias_without_bias_delta():
    case = BY_ID["2d-k3-pad1"]
    t = make_tensors(case, "pointwise_first")
    bias = t["bias"].clone()
    merge_(t["weight"].clone(), bias, t["pointwise"], t["depthwise"], None, case.groups, "pointwise_first")
    assert torch.equal(bias, t["bias"])


def good_inputs(dtype=torch.float32):
    case = BY_ID["2d-groups3"]
    t = make_tensors(case, "pointwise_first", dtype, device=DEVICE)
    return t, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=case.groups, order="pointwise_first")


def call_forward(t, conv):
    return colora_conv_forward(t["x"], t["weight"], t["bias"], t["pointwise"], t["depthwise"], t["bias_delta"],
                               **conv)


def expect_backend_error(kind, match, fn, *args):
    with pytest.raises(kind, match=match) as info:
        fn(*args)
    assert "triton backend" in str(info.value) and 'backend="torch"' in str(info.value)


def test_supports_forward():
    t, conv = good_inputs()
    runnable = DEVICE == "cuda" or _common.INTERPRET
    assert (supports_forward(t["x"], t["weight"], conv["groups"]) is None) == runnable
    assert "float64" in supports_forward(t["x"].double(), t["weight"].double(), conv["groups"])
    assert "channel" in supports_forward(t["x"], t["weight"], 2)


@pytest.mark.parametrize("bad", ["fp64", "int", "mixed-dtypes", "fp64-adapter"])
def test_forward_rejects_dtypes(bad):
    t, conv = good_inputs()
    if bad == "fp64":
        t = {k: None if v is None else v.double() for k, v in t.items()}
    elif bad == "int":
        t["x"] = t["x"].to(torch.int32)
    elif bad == "mixed-dtypes":
        t["weight"] = t["weight"].half()
    else:
        t["depthwise"] = t["depthwise"].double()
    expect_backend_error(TypeError, "dtype", call_forward, t, conv)


def test_forward_rejects_mismatched_devices():
    t, conv = good_inputs()
    t["pointwise"] = t["pointwise"].to("meta")
    expect_backend_error(ValueError, "different devices", call_forward, t, conv)


def test_forward_rejects_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    t = make_tensors(BY_ID["2d-k3-pad1"], "pointwise_first")
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, order="pointwise_first")
    expect_backend_error(ValueError, "TRITON_INTERPRET=1", call_forward, t, conv)


@pytest.mark.parametrize("bad", ["channels", "groups", "pointwise-shape", "depthwise-order", "bias-shape",
                                 "stride-len", "negative-padding", "order", "too-small", "out-shape"])
def test_forward_rejects_bad_arguments(bad):
    t, conv = good_inputs()
    match = {"channels": "channel", "groups": "channel", "pointwise-shape": "pointwise",
             "depthwise-order": "depthwise", "bias-shape": "bias", "stride-len": "stride",
             "negative-padding": "padding", "order": "order", "too-small": "smaller", "out-shape": "out"}[bad]
    if bad == "channels":
        t["x"] = torch.cat([t["x"], t["x"][:, :1]], dim=1)
    elif bad == "groups":
        conv["groups"] = 2
    elif bad == "pointwise-shape":
        t["pointwise"] = t["pointwise"].t()
    elif bad == "depthwise-order":
        conv["order"] = "depthwise_first"
        t["depthwise"] = torch.zeros(9, 3, 3, device=DEVICE)
    elif bad == "bias-shape":
        t["bias"] = t["bias"][:-1]
    elif bad == "stride-len":
        conv["stride"] = (1,)
    elif bad == "negative-padding":
        conv["padding"] = (-1, 0)
    elif bad == "order":
        conv["order"] = "sideways"
    elif bad == "too-small":
        conv["dilation"] = (5, 5)
    else:
        conv["out"] = torch.empty(1, device=DEVICE)
    expect_backend_error(ValueError, match, call_forward, t, conv)


def test_merge_rejects_bad_inputs():
    t, conv = good_inputs()
    groups, order = conv["groups"], conv["order"]
    w, kp, kd = t["weight"], t["pointwise"], t["depthwise"]
    expect_backend_error(TypeError, "dtype", merge_, w.double(), None, kp, kd, None, groups, order)
    expect_backend_error(ValueError, "depthwise", merge_, w.clone(), None, kp, kd[:, :2], None, groups, order)
    expect_backend_error(ValueError, "bias is None", merge_, w.clone(), None, kp, kd, t["bias_delta"], groups, order)
    expect_backend_error(ValueError, "different devices", merge_, w.clone(), t["bias"].to("meta"), kp, kd,
                         t["bias_delta"], groups, order)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_forward_cuda(case, order, dtype):
    check_forward(case, order, dtype, "cuda", tol=TOLERANCE_TF32 if dtype == torch.float32 else TOLERANCE[dtype])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_merge_cuda(case, order, dtype):
    check_merge_in_place(case, order, dtype, "cuda")
