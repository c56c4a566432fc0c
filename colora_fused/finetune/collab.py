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

Training: `--epochs` passes, each one full batch of every task in turn, Adam at `--lr` on the active trainable
tensors; no merge (a personal adapter cannot be folded into weights the other tasks share). Reported per task:
the test accuracy of the final model, and the parameters each strategy trains.
"""
import copy
import json
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..adapters import add_adapter, set_active_adapters, set_trainable_adapters
from ..config import CoLoRAConfig
from ..model import colora_layers, get_colora_model
from ..serialization import atomic_write

STRATEGIES = ("shared+personal", "personal-only", "shared-only")


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


def _task_logits(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    return logits[:, list(classes)]


def run_strategy(strategy: str, spec, splits, tasks, args, device, prepare) -> Dict[str, object]:
    """Train one strategy on every task; its per-task test accuracies and trained parameter count."""
    torch.manual_seed(args.seed)
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
    active = {"shared+personal": lambda n: ["default", n], "personal-only": lambda n: [n],
              "shared-only": lambda n: ["default"]}[strategy]
    set_trainable_adapters(features, {n for name in names for n in active(name)})
    params = [p for _, layer in colora_layers(features) for p in layer.adapter_parameters() if p.requires_grad]
    params += [p for h in heads for p in h.parameters()]
    optimizer = torch.optim.Adam(params, lr=args.lr)
    train = [(classes, prepare(splits.train, idx)) for classes, idx in tasks]
    model.train()
    for _ in range(args.epochs):
        for t, (classes, (x, y)) in enumerate(train):
            set_active_adapters(features, active(names[t]))
            logits = _task_logits(heads[t](features(x)), classes)
            target = (y == classes[1]).long()
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(logits, target).backward()
            optimizer.step()
    model.eval()
    test_labels = np.asarray(splits.test.labels)
    accs = []
    with torch.no_grad():
        for t, (classes, _) in enumerate(tasks):
            idx = np.flatnonzero(np.isin(test_labels, classes))
            x, y = prepare(splits.test, idx)
            set_active_adapters(features, active(names[t]))
            pred = _task_logits(heads[t](features(x)), classes).argmax(1)
            accs.append(float((pred == (y == classes[1]).long()).float().mean()))
    return {"strategy": strategy, "task_acc": accs, "mean_acc": float(np.mean(accs)),
            "trained_params": sum(p.numel() for p in params)}


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
                         "results": results}, indent=2)
    atomic_write(os.path.join(args.out, "collab.json"), lambda f: f.write(report.encode()))
    return results
