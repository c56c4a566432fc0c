"""CoLoRA under DistributedDataParallel: two CPU processes on gloo train, merge on every rank, stay identical,
and end where one process training on the full batch ends."""
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import colora_fused as cf

WORLD = 2
PER_RANK = 4
STEPS = 3
TIME_LIMIT_S = 60


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(8, 6, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


def full_batch():
    g = torch.Generator().manual_seed(42)
    return torch.randn(WORLD * PER_RANK, 3, 9, 10, generator=g), torch.randint(0, 5, (WORLD * PER_RANK,), generator=g)


def wrapped_model_and_optimizer():
    model = small_cnn()
    cf.apply_colora(model, train_bias=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2, momentum=0.9)
    return model, opt


def train(module: nn.Module, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, opt = wrapped_model_and_optimizer()
        ddp = DistributedDataParallel(model)
        x, y = full_batch()
        x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        train(ddp, opt, x, y, STEPS)
        # Ranks' random streams drift apart in real training (augmentation, dropout): the fresh Kp drawn by
        # the merge must still come out identical everywhere, or the replicas diverge from the next step on.
        torch.manual_seed(1000 + rank)
        cf.merge_colora(model, opt)
        merged = snapshot(model)
        train(ddp, opt, x, y, 1)
        after = snapshot(model)
        # Gather every tensor from every rank and compare on each.
        for key, value in after.items():
            gathered = [torch.empty_like(value) for _ in range(WORLD)]
            dist.all_gather(gathered, value.contiguous())
            for other, tensor in enumerate(gathered):
                if not torch.equal(tensor, value):
                    raise AssertionError(f"rank {rank}: {key} differs from rank {other}")
        torch.save({"merged": merged, "after": after}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while its peer still talks to it (that aborts the peer)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, out_dir) -> None:
    """Run ``worker(rank, port, out_dir)`` on WORLD processes; a hang (ranks that disagree) fails the test."""
    context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIME_LIMIT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP training did not finish within {TIME_LIMIT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join()


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed gloo")


@needs_gloo
def test_ddp_training_and_merge_match_single_process(tmp_path):
    _spawn(_worker, tmp_path)

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in results[0]["after"].items():
        assert torch.equal(results[1]["after"][key], value), f"{key} differs across ranks"
    for key, value in results[0]["merged"].items():
        assert torch.equal(results[1]["merged"][key], value), f"{key} differs across ranks after merge"

    model, opt = wrapped_model_and_optimizer()
    x, y = full_batch()
    train(model, opt, x, y, STEPS)
    before_merge = snapshot(model)
    cf.merge_colora(model, opt)
    single = snapshot(model)
    assert any(k.endswith("depthwise") and torch.count_nonzero(v) > 0 for k, v in before_merge.items()), \
        "training must have moved the adapters for this test to mean anything"
    for key, value in single.items():
        if key.endswith("pointwise"):
            continue  # a fresh random draw after the merge
        expected = results[0]["merged"][key]
        scale = max(expected.abs().max().item(), 1e-6)
        torch.testing.assert_close(value, expected, atol=1e-5 * scale, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
        if key.endswith(("depthwise", "bias_delta")):
            assert torch.count_nonzero(value) == 0
    initial = small_cnn().state_dict()
    initial["4.bias"] = torch.zeros(6)  # the bias-free conv gets a bias from its merged Δb
    for key in ("0.weight", "2.weight", "4.weight", "0.bias", "2.bias", "4.bias"):
        assert not torch.equal(single[key], initial[key]), f"{key} did not absorb the adapters"


def _nonfinite_worker(rank: int, port: int, out_dir: str) -> None:
    """colora-finetune's Trainer under DDP with a NaN in rank 1's second batch only: once stopping, once skipping."""
    from colora_fused.finetune import recipe as finetune
    from colora_fused.finetune.data import ArrayDataset, Splits

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        g = torch.Generator().manual_seed(0)
        data = ArrayDataset(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, generator=g), torch.arange(32) % 3)
        splits = Splits(data, data, data, num_classes=3)
        real, calls = finetune.prepare_batch, [0]

        def nan_on_rank1(*args, **kwargs):
            x = real(*args, **kwargs)
            calls[0] += 1
            if rank == 1 and calls[0] == 2:
                x = x.clone()
                x[0, 0, 0, 0] = float("nan")
            return x

        finetune.prepare_batch = nan_on_rank1
        results = {}
        for skip in (False, True):
            calls[0] = 0
            args = finetune.parse_args(["--data", "in-memory", "--model", "smallcnn", "--strategy", "colora",
                                        "--epochs", "1", "--batch-size", "4", "--lr", "3e-3", "--no-progress",
                                        "--log-every", "-1"] + (["--skip-nonfinite"] if skip else []))
            torch.manual_seed(0)
            spec = finetune.build_model("smallcnn", 3, 1)
            finetune.setup_strategy(spec, "colora")
            trainer = finetune.Trainer(args, splits, spec, "colora", out_dir,
                                       finetune.Dist(rank, WORLD, torch.device("cpu")))
            try:
                trainer.train_epoch(finetune.Log(False))
                results[skip] = {"skipped": trainer.skipped, "steps": trainer.step,
                                 "state": {k: v.clone() for k, v in trainer.model.state_dict().items()}}
            except finetune.NonFiniteError as e:
                results[skip] = {"stopped": str(e), "steps": trainer.step}
        torch.save(results, os.path.join(out_dir, f"nonfinite{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@needs_gloo
def test_ddp_ranks_agree_on_a_nonfinite_step(tmp_path):
    """A NaN on one rank stops (or skips the step on) every rank at the same step, naming the same cause; skipped,
    the replicas stay identical. Ranks that disagreed would leave one waiting in a collective: a hang, a failure."""
    _spawn(_nonfinite_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"nonfinite{r}.pt", weights_only=True) for r in range(WORLD)]
    stopped = [r[False] for r in ranks]
    assert stopped[0] == stopped[1] and stopped[0]["steps"] == 1, stopped
    assert "[colora] non-finite loss at epoch 1/1, step 2 (batch 2/4 of the epoch)" in stopped[0]["stopped"]
    skipped = [r[True] for r in ranks]
    assert all(s["skipped"] == 1 and s["steps"] == 4 for s in skipped), [(s["skipped"], s["steps"]) for s in skipped]
    for key, value in skipped[0]["state"].items():
        assert torch.isfinite(value).all() and torch.equal(skipped[1]["state"][key], value), key
