"""pytest-benchmark over conv layer shapes from ResNet-50 and VGG-16: the plain frozen conv (the floor), full
fine-tuning, eager CoLoRA, the torch and triton backends and PEFT LoRA at CoLoRA's parameter count, each as a
forward pass and as a training step (forward + backward, input gradient required).

    pytest benchmarks/ --benchmark-only                       # CPU: batch 2, quarter-size feature maps
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

On CUDA the shapes are the models' own at batch 64, 224² input, under bf16 autocast. Each group (one shape,
one mode) compares the methods side by side; extra_info carries the GFLOP and the achieved TFLOP/s of the
task's ideal work (colora_fused.bench.layer_mode.ConvShape.ideal_flops).
"""
import pytest
import torch
from torch import nn

from colora_fused.bench.common import LAYER_METHODS, Config, missing_dependency
from colora_fused.bench.layer_mode import ConvShape, build_layer, layer_runners

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (name, conv, input size at 224² on CUDA); the CPU run quarters the feature maps (at least 7×7).
SHAPES = [
    ("r50-stem-7x7s2", nn.Conv2d(3, 64, 7, 2, 3, bias=False), 224),
    ("r50-1x1-64-256", nn.Conv2d(64, 256, 1, bias=False), 56),
    ("r50-3x3-64", nn.Conv2d(64, 64, 3, 1, 1, bias=False), 56),
    ("r50-3x3-128-s2", nn.Conv2d(128, 128, 3, 2, 1, bias=False), 56),
    ("r50-3x3-256", nn.Conv2d(256, 256, 3, 1, 1, bias=False), 14),
    ("r50-1x1-2048-512", nn.Conv2d(2048, 512, 1, bias=False), 7),
    ("vgg-3x3-64", nn.Conv2d(64, 64, 3, 1, 1), 224),
    ("vgg-3x3-256", nn.Conv2d(256, 256, 3, 1, 1), 56),
    ("vgg-3x3-512", nn.Conv2d(512, 512, 3, 1, 1), 28),
]
CFG = Config(device=DEVICE, dtype="bf16" if CUDA else "fp32", batch=64 if CUDA else 2, image_size=224,
             channels_last=True)
ROUNDS, WARMUP = (20, 3) if CUDA else (5, 1)


def _shape(conv: nn.Conv2d, size: int) -> ConvShape:
    return ConvShape.from_conv(conv, (size, size) if CUDA else (max(size // 4, 7),) * 2)


@pytest.mark.parametrize("mode", ["forward", "step"])
@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("name, conv, size", SHAPES, ids=[s[0] for s in SHAPES])
def test_layer(benchmark, name, conv, size, method, mode):
    reason = missing_dependency(method, DEVICE)
    if reason is not None:
        pytest.skip(f"{method} {reason}")
    shape = _shape(conv, size)
    run = layer_runners(build_layer(shape, method, CFG), shape, CFG)[mode]

    def call():
        run()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.group = f"{name} {shape.label} {mode}"
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    flops = shape.ideal_flops(CFG.batch, method, mode)
    benchmark.extra_info.update(gflop=flops / 1e9, tflops=flops / benchmark.stats.stats.median / 1e12,
                                device=str(DEVICE), dtype=CFG.dtype, batch=CFG.batch)
