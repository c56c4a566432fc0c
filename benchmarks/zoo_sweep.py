"""CoLoRA on real architectures, model by model: timm and torchvision networks with random weights, on the CPU,
in float64 at a small input size, every conv selected (`apply_colora(model, unsupported="skip")`).

Per model it checks
- identity: with fresh adapters (ΔK = 0) the wrapped model gives the unwrapped model's output;
- merge: with random adapters, `merge_colora` and `merge_and_unload` give the wrapped model's output, and
  merge_and_unload gives each conv back as its own class;
- gradients: those of x and of every adapter tensor equal the same model's on backend="reference" (the literal
  unmerged convolution, `colora_fused.reference`);
- state dict: `colora_state_dict` loaded by `load_colora_state_dict` into a freshly wrapped copy gives the same
  eval output;
- accounting: `count_parameters`' adapter count is the sum of the layers' adapter tensors, and every conv is
  either wrapped or reported as refused (with the reason);
and reports what the default `CoLoRAConfig()` wraps and the trainable share `get_colora_model` leaves.

    python benchmarks/zoo_sweep.py --quick --out /tmp/zoo
    python benchmarks/zoo_sweep.py --models tv:resnet50,timm:dm_nfnet_f0 --size 64

Models are named "tv:<torchvision name>" or "timm:<timm name>". Writes results.csv and results.md into --out
(default benchmarks/results/zoo-sweep) and exits with status 1 when any check fails.
"""
import argparse
import collections
import copy
import csv
import logging
import os
import sys
import time
from typing import Dict, List

import torch
from torch import nn

import colora_fused as cf

# One model per conv kind, small: torch's convs, torchvision's Conv3DSimple, timm's ScaledStdConv2d and Conv2dSame.
QUICK = ["tv:resnet18", "tv:r3d_18", "timm:resnet10t", "timm:test_nfnet", "timm:tf_mobilenetv3_small_minimal_100"]
FULL = QUICK + [
    "tv:resnet50", "tv:mobilenet_v3_small", "tv:efficientnet_b0", "tv:convnext_tiny", "tv:regnet_y_400mf",
    "tv:vgg11", "tv:mc3_18", "tv:r2plus1d_18",
    "timm:resnetv2_50x1_bit", "timm:nf_resnet26", "timm:nf_regnet_b0", "timm:eca_nfnet_l0", "timm:dm_nfnet_f0",
    "timm:tf_efficientnet_b0", "timm:tf_mixnet_s", "timm:mixnet_s", "timm:convnext_atto", "timm:regnety_002",
    "timm:vit_tiny_r_s16_p8_224",
]
# float64 on the same ops: the checks compare against rounding noise, not against a tolerance for fp32.
TOLERANCE = 1e-9
TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYERS = {nn.Conv1d: cf.CoLoRAConv1d, nn.Conv2d: cf.CoLoRAConv2d, nn.Conv3d: cf.CoLoRAConv3d}
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t")


def build(spec: str, size: int) -> nn.Module:
    source, _, name = spec.partition(":")
    if source == "tv":
        import torchvision
        return torchvision.models.get_model(name, weights=None)
    if source == "timm":
        import timm
        # A ViT's position embedding is sized for its input: build it for this one.
        kwargs = {"img_size": size} if name.startswith(("vit_", "deit_")) else {}
        return timm.create_model(name, pretrained=False, **kwargs)
    raise ValueError(f"model {spec!r}: name it tv:<torchvision name> or timm:<timm name>")


def example_input(spec: str, size: int) -> torch.Tensor:
    """One image (or a 4-frame clip for torchvision's video models) of size×size, float64."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 3, 4, size, size) if spec.partition(":")[2] in VIDEO else (1, 3, size, size)
    return torch.randn(shape, generator=g, dtype=torch.float64)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def randomize_adapters_(model: nn.Module, scale: float = 0.01) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in cf.colora_layers(model):
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def convs_of(model: nn.Module) -> Dict[str, nn.Module]:
    return dict((n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, TORCH_CONVS))


def wrap_all(model: nn.Module) -> List[str]:
    """apply_colora on every conv; refused convs stay plain (reported by the caller, so its warning is muted)."""
    log = logging.getLogger("colora_fused.model")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return cf.apply_colora(model, unsupported="skip")
    finally:
        log.setLevel(level)


def grads(model: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    model(x).backward(grad_out)
    found = {"x": x.grad}
    for name, layer in cf.colora_layers(model):
        for key in ("pointwise", "depthwise", "bias_delta"):
            if getattr(layer, key) is not None:
                found[f"{name}.{key}"] = getattr(layer, key).grad
    return found


def sweep_model(spec: str, size: int) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    base = build(spec, size).double().eval()
    x = example_input(spec, size)
    with torch.no_grad():
        expected = base(x)
    convs = convs_of(base)

    model = copy.deepcopy(base)
    wrapped = wrap_all(model)
    plain = {n: m for n, m in convs_of(model).items() if not isinstance(m, cf.layers._CoLoRAConvNd)}
    refused = collections.Counter(
        f"{type(m).__name__}: {LAYERS[next(c for c in TORCH_CONVS if isinstance(m, c))].refusal(m)}"
        for m in plain.values())
    kinds = collections.Counter(layer.conv_kind.name for _, layer in cf.colora_layers(model))
    with torch.no_grad():
        identity = rel_err(model(x), expected)

    randomize_adapters_(model)
    with torch.no_grad():
        trained = model(x)
        merged, unloaded = copy.deepcopy(model), copy.deepcopy(model)
        cf.merge_colora(merged)
        cf.merge_and_unload(unloaded)
        merged_out, unloaded_out = merged(x), unloaded(x)
        merge = rel_err(merged_out, trained)
        unload = rel_err(unloaded_out, trained)
        merge_vs_unload = rel_err(unloaded_out, merged_out)
    classes_back = all(type(m) is type(convs[n]) for n, m in convs_of(unloaded).items())

    reference = copy.deepcopy(model)
    for _, layer in cf.colora_layers(reference):
        layer.backend = "reference"
    grad_out = torch.randn(trained.shape, generator=torch.Generator().manual_seed(2), dtype=trained.dtype)
    ours, theirs = grads(model, x, grad_out), grads(reference, x, grad_out)
    grad = max(rel_err(ours[k], theirs[k]) for k in theirs if theirs[k].abs().max() > 0)

    fresh = copy.deepcopy(base)
    wrap_all(fresh)
    cf.load_colora_state_dict(fresh, cf.colora_state_dict(model))
    with torch.no_grad():
        state_dict = rel_err(fresh(x), trained)

    counts = cf.count_parameters(model)
    layer_adapters = sum(p.numel() for _, layer in cf.colora_layers(model) for p in layer.adapter_parameters())
    accounted = counts["adapter"] == layer_adapters and set(wrapped) | set(plain) == set(convs)

    default = copy.deepcopy(base)
    cf.get_colora_model(default, cf.CoLoRAConfig(unsupported="skip"))
    default_counts = cf.count_parameters(default)

    errors = dict(identity=identity, merge=merge, unload=unload, merge_vs_unload=merge_vs_unload, grad=grad,
                  state_dict=state_dict)
    failed = [k for k, v in errors.items() if not v <= TOLERANCE]
    failed += [k for k, ok in (("classes_back", classes_back), ("accounting", accounted)) if not ok]
    return dict(
        model=spec, input="x".join(map(str, x.shape[1:])), convs=len(convs), wrapped=len(wrapped),
        refused=sum(refused.values()), kinds="; ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
        refusals="; ".join(f"{v}× {k}" for k, v in sorted(refused.items())),
        **{f"err_{k}": f"{v:.1e}" for k, v in errors.items()}, classes_back=classes_back, accounted=accounted,
        adapter_params=counts["adapter"], default_wrapped=len(cf.colora_layers(default)),
        default_trainable_pct=f"{100 * default_counts['trainable'] / default_counts['total']:.2f}",
        seconds=f"{time.perf_counter() - start:.1f}", status="ok" if not failed else "FAIL: " + ", ".join(failed))


def write(out: str, rows: List[dict], size: int) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    failed = [r["model"] for r in rows if r["status"] != "ok"]
    columns = ["model", "convs", "wrapped", "refused", "kinds", "err_identity", "err_merge_vs_unload", "err_grad",
               "err_state_dict", "default_wrapped", "default_trainable_pct", "status"]
    lines = [f"# Zoo sweep: {len(rows)} models, float64 on the CPU, input {size}×{size}, every conv selected", "",
             f"Verdict: {'all checks pass' if not failed else 'FAILED: ' + ', '.join(failed)} "
             f"(relative errors against the unwrapped model, merge_colora and backend='reference'; "
             f"pass ≤ {TOLERANCE:g}).", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    refusals = [f"- {r['model']}: {r['refusals']}" for r in rows if r["refusals"]]
    if refusals:
        lines += ["", "Convs left plain (unsupported classes):", ""] + refusals
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated tv:<name> / timm:<name> (default: the full list)")
    p.add_argument("--quick", action="store_true", help=f"the quick list: {', '.join(QUICK)}")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "zoo-sweep"), help="results folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these small convs gain nothing from more, and a busy machine's "
                        "spinning thread pool made them 10× slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else QUICK if args.quick else FULL
    rows = []
    for spec in models:
        row = sweep_model(spec, args.size)
        print(f"{spec}: {row['status']} ({row['wrapped']}/{row['convs']} convs wrapped, {row['seconds']} s)",
              flush=True)
        rows.append(row)
    write(args.out, rows, args.size)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
