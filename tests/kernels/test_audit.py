"""The static sm_90 audit (colora_fused.audit) and the rules it holds the kernels to.

The compile test runs the audit in a subprocess without TRITON_INTERPRET (the suite sets it), on the small CI
shapes, and fails when a config the autotuner may launch overflows shared memory, a bf16/fp16 kernel spills, a
tensor-core kernel does not use wgmma on sm_90, or a kernel does not compile. The other tests check the
audit's own reading of SASS, its model and the pruning helpers on made-up inputs.
"""
import csv
import os
import subprocess
import sys

import pytest
import torch
import triton

from colora_fused.audit import core as audit
from colora_fused.kernels import _common

AUDIT_ENV = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "COLORA_TRITON_AUTOTUNE")}
TENSOR_CORE_KERNELS = {"colora_conv_fwd_kernel", "conv_bwd_input_kernel", "adapter_grads_one_pass_kernel",
                       "pointwise_grad_kernel", "depthwise_grad_kernel", "gradw_adapter_kernel"}
# The quick shapes whose channel groups have 16 or more channels (the depthwise one has 1).
WIDE_GROUP_SHAPES = {"q-3x3-64@8", "q-1x1-64>32@8"}


# Every kernel family in bf16 in both layouts (the mixed-batch variants, `_segmented`, compile in the image leg's
# strict audit and the committed one instead: CI's time), and the forward (whose fp32 tiles are the largest) in
# fp16 and fp32: about 180 compilations, two to three minutes on 2 cores.
AUDIT_SCRIPT = """
import csv, sys
from colora_fused.audit import core as A
families = [f for f in A.FAMILIES if not f.endswith("_segmented")]  # the committed audit and the image leg's
units = (A.plan_units(A.QUICK_SHAPES, ["bf16"], A.LAYOUTS, ["sm90"], families)
         + A.plan_units(A.QUICK_SHAPES, ["fp16", "fp32"], ["channels_last"], ["sm90"], ["forward"]))
rows = A.run_audit(units)
with open(sys.argv[1], "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=A.CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
"""


@pytest.fixture(scope="module")
def audit_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "rows.csv"
    done = subprocess.run([sys.executable, "-c", AUDIT_SCRIPT, str(out)], env=AUDIT_ENV, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[audit]" in done.stderr  # progress lines
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["kernel"] for r in rows} >= TENSOR_CORE_KERNELS | {"merge_kernel"}
    return rows


def _where(r):
    return f"{r['kernel']} {r['shape']} {r['layout']} {r['dtype']} {r['config']}"


def test_every_reachable_config_compiles_and_fits_shared_memory(audit_rows):
    for r in audit_rows:
        assert not r["error"], _where(r) + ": " + r["error"]
        assert 0 <= int(r["smem"]) <= int(r["smem_limit"]), f"{_where(r)}: {r['smem']} B shared memory"


def test_half_precision_kernels_do_not_spill(audit_rows):
    half = [r for r in audit_rows if r["dtype"] in ("bf16", "fp16") and r["kernel"] in TENSOR_CORE_KERNELS]
    assert half
    spilling = [f"{_where(r)}: {r['spill_bytes']} B" for r in half if int(r["spill_bytes"]) != 0]
    assert not spilling, spilling


def test_half_precision_kernels_use_wgmma_for_wide_groups(audit_rows):
    rows = [r for r in audit_rows if r["dtype"] in ("bf16", "fp16") and r["kernel"] in TENSOR_CORE_KERNELS
            and r["shape"] in WIDE_GROUP_SHAPES]
    assert rows
    # The one-pass adapter kernel may run its 1×1 product on mma.sync beside its wgmma dKp GEMM: with 32 positions
    # on its M side (to keep one accumulator per tap in registers), not with 64.
    allowed = {r["kernel"]: ("wgmma",) for r in rows} | {"adapter_grads_one_pass_kernel": ("wgmma", "wgmma+mma.sync")}
    not_wgmma = [f"{_where(r)}: {r['mma']}" for r in rows if r["mma"] not in allowed[r["kernel"]]]
    assert not not_wgmma, not_wgmma


def test_problems_flag_spills_oversized_shared_memory_and_errors():
    base = dict(kernel="k", shape="s", layout="l", dtype="bf16", arch="sm90", config="c", error="", smem=1000,
                smem_limit=232448, spill_bytes=0)
    assert audit.problems([base]) == []
    found = audit.problems([{**base, "spill_bytes": 2496}, {**base, "smem": 245760}, {**base, "error": "E"}])
    assert [("spills" in p, "shared memory" in p, "compile error" in p) for p in found] == [
        (True, False, False), (False, True, False), (False, False, True)]


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR4], R24, gsb0 ;
        /*0020*/                   IMAD R2, R3, R4, R5 ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR4], R24, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   NOP ;
        /*0070*/               @P0 BRA 0x30 ;
        /*0080*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0090*/               @P1 BRA 0x20 ;
        /*00a0*/                   EXIT ;
"""


def test_main_loop_is_the_innermost_loop_with_tensor_core_instructions():
    loop = audit.main_loop(audit.parse_sass(SASS), num_warps=8)
    # 0x30..0x70 without the NOP: ARRIVE, HGMMA, DEPBAR, BRA; one HGMMA per warp stream, two warpgroups.
    assert (loop["mma"], loop["loop_instrs"], loop["loop_mmas"], loop["loop_waits"]) == ("wgmma", 4, 1, 1)
    assert loop["loop_mma_flops"] == 2 * 64 * 128 * 16 * 2
    assert loop["outer_instrs"] == 7 - 4  # 0x20..0x90 less NOP and the inner loop
    c = audit.Compiled(regs=128, spill_bytes=0, smem=0, num_warps=8, num_stages=3, serialized=False, **loop)
    issue, tensor, share = audit.estimate(c, audit.ARCHS["sm90"])
    assert (issue, tensor) == (4 * 8 / 4, 2 * 64 * 128 * 16 * 2 / 4096)
    assert share == pytest.approx(1.0)
    no_mma = audit.main_loop(audit.parse_sass(SASS.replace("HGMMA", "FFMA")), num_warps=8)
    assert no_mma["mma"] == "none" and audit.estimate(audit.Compiled(128, 0, 0, 8, 3, False, **no_mma),
                                                      audit.ARCHS["sm90"]) == (None, None, None)


def test_prunes_use_the_device_limits():
    configs = [triton.Config({"B": b}, num_warps=w, num_stages=s) for b, w, s in [(64, 4, 4), (32, 4, 3), (16, 8, 2)]]
    with _common.recording(_common.DeviceLimits(sm_count=132, smem_per_block=100_000)):
        kept = _common.prune_by_shared_memory(configs, lambda c: c.kwargs["B"] * 1024, torch.device("meta"))
    assert [c.kwargs["B"] for c in kept] == [32, 16]  # 4·64 KiB is over the limit; 3·32 KiB and 2·16 KiB fit
    with _common.recording(_common.DeviceLimits(sm_count=132, smem_per_block=1)):
        smallest = _common.prune_by_shared_memory(configs, lambda c: c.kwargs["B"] * 1024, torch.device("meta"))
    assert [c.kwargs["B"] for c in smallest] == [16]
    by_regs = _common.prune_by_registers(configs, lambda c: c.kwargs["B"] * 128, per_thread=32)
    assert [(c.kwargs["B"], c.num_warps) for c in by_regs] == [(32, 4), (16, 8)]
    fitted = _common.fit_configs(configs, lambda kw: {"B": min(kw["B"], 16)})
    assert len(fitted) == 3 and all(c.kwargs["B"] == 16 for c in fitted)
    assert len(_common.fit_configs(configs[:2] * 2, lambda kw: kw)) == 2
