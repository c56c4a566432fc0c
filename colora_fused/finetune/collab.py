"""The collaborative recipe (Magakyan et al., collaborative low-rank adaptation) with named CoLoRA adapters:
`colora-finetune --tasks N`.

The fine-tuning data set is split into N tasks of related classes: task t holds classes t and t+1 (mod C), so
each class is shared by two tasks, with `--task-samples` training images per class, drawn so that no two tasks
share an image (the test images of a task are all test images of its classes). Every task gets its own head (a
copy of the model's fresh head, read out on its classes only); the backbone's convs are CoLoRA layers over the
shared pre-trained weights, trained side by side under three strategies on the same data:

- `shared+personal`: one shared adapter ("default") trained on every task plus a personal adapter per task;
  a batch of task t runs with ["default", "task<t>"] active.
- `personal-only`: a personal adapter per task, nothing shared.
- `shared-only`: the shared adapter alone, trained on every task.

Training: `--epochs` passes over every task's training images, Adam at `--lr` on the trainable tensors, one step
per task per pass; no merge (a personal adapter cannot be folded into weights the other tasks share). With
`--task-batches mixed` (the default) the images of all tasks are shuffled together each pass and every step's batch
mixes tasks, each sample run with its own task's adapters (`cf.adapters_per_sample`) and read out by its own head;
with `separate`, each step is one task's whole batch with its adapters active. Reported per task: the test
accuracy of the final model (the test images of all tasks served as one mixed batch), and the parameters each
strategy trains.
"""
import copy
import json
import os
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import add_adapter, set_trainable_adapters
from ..config import CoLoRAConfig
from ..model import colora_layers, get_colora_model
from ..per_sample import adapters_per_sample
from ..serialization import atomic_write

STRATEGIES = ("shared+personal", "personal-only", "shared-only")
TASK_BATCHES = ("mixed", "separate")


def make_tasks(labels: np.ndarray, num_classes: int, tasks: int, per_class: int, seed: int
               ) -> List[Tuple[Tuple[int, int], np.ndarray]]:
    """(classes, training indices) per task: classes (t, t+1 mod C), `per_class` images of each, every image in
    at most one task. Raises ValueError when a class has too few images for the tasks that share it."""
    if num_classes < 2 or tasks < 1:
        raise ValueError(f"--tasks needs at least 2 classes and 1 task, got {num_classes} classes, {tasks} tasks")
    rng = np.random.default_rng(seed)
    pools = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(num_classes)}
    out = []
    for t in range(tasks):
        classes = (t % num_classes, (t + 1) % num_classes)
        picked = []
        for c in classes:
            if len(pools[c]) < per_class:
                raise ValueError(f"class {c} has too few training images for {tasks} tasks of {per_class} per class")
            picked += [pools[c].pop() for _ in range(per_class)]
        out.append((classes, np.array(sorted(picked))))
    return out


def _task_loss(features, heads, tasks, x, y, task_of) -> torch.Tensor:
    """Mean cross-entropy of a batch whose sample i belongs to task task_of[i]: each sample read out by its task's
    head on its task's two classes (the features computed once for the whole batch)."""
    feats = features(x)
    loss = feats.new_zeros(())
    for t in sorted(set(task_of.tolist())):
        rows = torch.from_numpy(np.flatnonzero(task_of == t)).to(x.device)
        classes = tasks[t][0]
        logits = heads[t](feats.index_select(0, rows))[:, list(classes)]
        loss = loss + F.cross_entropy(logits, (y.index_select(0, rows) == classes[1]).long(), reduction="sum")
    return loss / len(task_of)


def _batches(tasks, mix: str, rng: np.random.Generator) -> List[np.ndarray]:
    """One pass: the (task, position) pairs of each step. `separate`: one task's images per step, task by task;
    `mixed`: every task's images shuffled together, cut into as many steps."""
    pairs = [np.stack([np.full(len(idx), t), np.arange(len(idx))], 1) for t, (_, idx) in enumerate(tasks)]
    if mix == "separate":
        return pairs
    every = np.concatenate(pairs)
    return np.array_split(every[rng.permutation(len(every))], len(tasks))


def run_strategy(strategy: str, spec, splits, tasks, args, device, prepare) -> Dict[str, object]:
    """Train one strategy on every task; its per-task test accuracies and trained parameter count."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = copy.deepcopy(spec.model).to(device)
    features, head = model.features, model.head
    # Every conv of the backbone wrapped, everything else in it frozen; the heads below are trained copies.
    get_colora_model(features, CoLoRAConfig(target_modules="all", order=args.order, backend=args.backend,
                                            rank=args.rank))
    names = [f"task{t}" for t in range(len(tasks))]
    if strategy != "shared-only":
        for name in names:
            add_adapter(features, name, rank=args.rank)
    heads = [copy.deepcopy(head).requires_grad_(True) for _ in tasks]
    active = {"shared+personal": lambda n: ("default", n), "personal-only": lambda n: n,
              "shared-only": lambda n: "default"}[strategy]
    used = [active(name) for name in names]
    set_trainable_adapters(features, {n for entry in used for n in ((entry,) if isinstance(entry, str) else entry)})
    params = [p for _, layer in colora_layers(features) for p in layer.adapter_parameters() if p.requires_grad]
    params += [p for h in heads for p in h.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    train = [prepare(splits.train, idx) for _, idx in tasks]
    model.train()
    for _ in range(args.epochs):
        for step in _batches(tasks, args.task_batches, rng):
            task_of = step[:, 0]
            x = torch.cat([train[t][0][i:i + 1] for t, i in step])
            y = torch.cat([train[t][1][i:i + 1] for t, i in step])
            with adapters_per_sample(features, [active(names[t]) for t in task_of]):
                loss = _task_loss(features, heads, tasks, x, y, task_of)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    test_labels = np.asarray(splits.test.labels)
    tests = [np.flatnonzero(np.isin(test_labels, classes)) for classes, _ in tasks]
    x, y = prepare(splits.test, np.concatenate(tests))
    task_of = np.concatenate([np.full(len(idx), t) for t, idx in enumerate(tests)])
    accs = []
    with torch.no_grad(), adapters_per_sample(features, [active(names[t]) for t in task_of]):
        feats = features(x)
    for t, (classes, _) in enumerate(tasks):
        rows = torch.from_numpy(np.flatnonzero(task_of == t)).to(x.device)
        with torch.no_grad():
            pred = heads[t](feats.index_select(0, rows))[:, list(classes)].argmax(1)
        accs.append(float((pred == (y.index_select(0, rows) == classes[1]).long()).float().mean()))
    return {"strategy": strategy, "task_batches": args.task_batches, "task_acc": accs,
            "mean_acc": float(np.mean(accs)), "trained_params": sum(p.numel() for p in params)}


def run(args, splits, spec, device, prepare, log) -> List[Dict[str, object]]:
    """Every strategy on the same tasks; writes collab.json to args.out (atomically) and logs a table."""
    tasks = make_tasks(np.asarray(splits.train.labels), splits.num_classes, args.tasks, args.task_samples, args.seed)
    log.message(f"collaborative: {len(tasks)} tasks of classes "
                + ", ".join(f"({splits.class_names[a]}, {splits.class_names[b]})" for (a, b), _ in tasks)
                + f", {args.task_samples} training images per class and task")
    results = []
    for strategy in STRATEGIES:
        result = run_strategy(strategy, spec, splits, tasks, args, device, prepare)
        log.message(f"[{strategy}] per-task test acc {', '.join(f'{a:.3f}' for a in result['task_acc'])} | mean "
                    f"{result['mean_acc']:.4f} | {result['trained_params']:,} trained parameters")
        results.append(result)
    os.makedirs(args.out, exist_ok=True)
    report = json.dumps({"tasks": [list(c) for c, _ in tasks], "task_samples": args.task_samples, "seed": args.seed,
                         "task_batches": args.task_batches, "results": results}, indent=2)
    atomic_write(os.path.join(args.out, "collab.json"), lambda f: f.write(report.encode()))
    return results
