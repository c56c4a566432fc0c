"""Concurrent use from several threads must give each caller its own correct result: with the per-layer merge
cache, and without it, where the torch backend's CPU merge buffer is shared by same-shaped layers per thread."""
import threading

import pytest
import torch

import colora_fused as cf


def _layer(seed, cache):
    torch.manual_seed(seed)
    layer = cf.CoLoRAConv2d(8, 8, 3, padding=1, backend="torch")
    layer.cache_merged_weight = cache
    with torch.no_grad():
        layer.depthwise.normal_()
    return layer


def _step(layer, x):
    x = x.clone().requires_grad_(True)
    layer.zero_grad()
    out = layer(x)
    out.square().sum().backward()
    return out.detach(), x.grad, layer.pointwise.grad.clone(), layer.depthwise.grad.clone()


@pytest.mark.parametrize("cache", [True, False], ids=["merge-cache", "per-thread-workspace"])
def test_threads_sharing_a_weight_shape_get_their_own_results(cache):
    layers = [_layer(seed, cache) for seed in range(4)]  # same weight shape: the same buffer key in every thread
    inputs = [torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    expected = [_step(layer, x) for layer, x in zip(layers, inputs)]
    failures = []

    def work(i):
        for _ in range(20):
            got = _step(layers[i], inputs[i])
            # Scaled tolerance: concurrent threads may reduce in another order; another layer's weight is off by O(1).
            errors = [((g - e).abs().max() / e.abs().max()).item() for g, e in zip(got, expected[i])]
            if max(errors) > 1e-4:
                failures.append((i, max(errors)))
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, f"(thread, relative error) {failures}: another thread's merged weight?"
