"""colora-finetune --tasks: the collaborative recipe (shared + personal named adapters) end to end on the digits
demo, and its task split."""
import json

import numpy as np
import pytest

from colora_fused.finetune import collab, recipe as finetune


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the demo runs on one thread


def test_tasks_are_pairs_of_related_classes_without_shared_images():
    labels = np.repeat(np.arange(5), 12)
    tasks = collab.make_tasks(labels, 5, 5, 4, seed=0)
    assert [c for c, _ in tasks] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 0)]
    for (a, b), idx in tasks:
        assert len(idx) == 8 and sorted(np.bincount(labels[idx], minlength=5)[[a, b]]) == [4, 4]
    every = np.concatenate([idx for _, idx in tasks])
    assert len(np.unique(every)) == len(every)  # no image in two tasks
    with pytest.raises(ValueError, match="too few"):
        collab.make_tasks(labels, 5, 5, 7, seed=0)  # each class is in two tasks: 14 > 12 images


def test_three_strategies_side_by_side(tmp_path):
    results = finetune.run(["--tasks", "3", "--task-samples", "4", "--epochs", "3", "--pretrain-epochs", "2",
                            "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    by = {r["strategy"]: r for r in results}
    assert list(by) == list(collab.STRATEGIES)
    for r in results:
        assert len(r["task_acc"]) == 3 and all(0.0 <= a <= 1.0 for a in r["task_acc"])
        assert r["mean_acc"] == pytest.approx(float(np.mean(r["task_acc"])))
    # With A the parameters of one adapter and H of one head: shared-only trains A + 3H, personal-only 3A + 3H,
    # shared+personal 4A + 3H.
    shared, personal, both = (by[s]["trained_params"] for s in ("shared-only", "personal-only", "shared+personal"))
    adapter = both - personal
    assert adapter > 0 and personal - shared == 2 * adapter
    saved = json.loads((tmp_path / "collab.json").read_text())
    assert saved["tasks"] == [[0, 1], [1, 2], [2, 3]] and len(saved["results"]) == 3


def test_tasks_refuse_merges(tmp_path):
    with pytest.raises(SystemExit, match="merges"):
        finetune.main(["--tasks", "3", "--merge-when", "0.1", "--no-progress", "--out", str(tmp_path / "x")])


def test_mixed_passes_mix_the_tasks_and_separate_ones_do_not():
    tasks = [((0, 1), np.arange(6)), ((1, 2), np.arange(6, 12)), ((2, 0), np.arange(12, 18))]
    rng = np.random.default_rng(0)
    mixed = collab._batches(tasks, "mixed", rng)
    separate = collab._batches(tasks, "separate", rng)
    assert len(mixed) == len(separate) == 3
    for batches in (mixed, separate):  # every (task, image) exactly once per pass
        every = sorted(map(tuple, np.concatenate(batches).tolist()))
        assert every == [(t, i) for t in range(3) for i in range(6)]
    assert all(len(set(b[:, 0])) == 1 for b in separate)
    assert any(len(set(b[:, 0])) > 1 for b in mixed)


def test_separate_task_batches_run_too(tmp_path):
    results = finetune.run(["--tasks", "2", "--task-samples", "3", "--epochs", "2", "--pretrain-epochs", "1",
                            "--task-batches", "separate", "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    assert [r["task_batches"] for r in results] == ["separate"] * 3
    assert json.loads((tmp_path / "collab.json").read_text())["task_batches"] == "separate"
