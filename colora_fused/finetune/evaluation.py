"""``colora-finetune``'s evaluation: a model's predictions on a split (sharded over the ranks), their loss and
accuracy, and the best model's test report (metrics.json, the confusion matrix and ROC plots)."""
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import metrics
from .checkpoint import save_json
from .data import make_loader


@torch.no_grad()
def predict(model, dataset, ctx, batch_size, workers, to_input, amp, num_classes, before_batch=None):
    """Logits and labels of the whole ``dataset``: each rank scores a shard, every rank gets all, in order.

    ``to_input(images)`` makes the model's input of a batch; ``before_batch(i, n)`` runs before batch i of n (no
    bar here: a large split on a CPU can take minutes, so a caller may print progress lines).
    """
    model.eval()
    shard = list(range(ctx.rank, len(dataset), ctx.world))
    loader = make_loader(dataset, shard, batch_size, workers)
    out, ys = [], []
    for i, (images, labels) in enumerate(loader, 1):
        if before_batch is not None:
            before_batch(i, len(loader))
        x = to_input(images)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            out.append(model(x).float().cpu())
        ys.append(torch.as_tensor(labels))
    logits = torch.cat(out) if out else torch.zeros(0, num_classes)
    labels = torch.cat(ys) if ys else torch.zeros(0, dtype=torch.long)
    if ctx.active:
        parts = [None] * ctx.world
        dist.all_gather_object(parts, (shard, logits, labels))
        order = torch.tensor([i for p in parts for i in p[0]]).argsort()
        logits = torch.cat([p[1] for p in parts])[order]
        labels = torch.cat([p[2] for p in parts])[order]
    return logits, labels


def scores(logits, labels):
    """(loss, accuracy, probabilities, labels) of a split's predictions."""
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).double().mean().item(), logits.softmax(1), labels


def write_test_report(out, strategy, best, report, result, class_names):
    """metrics.json (the best epoch's test report and the run's result row), confusion_matrix.png and roc.png."""
    save_json({"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "test": report, "run": result},
              os.path.join(out, "metrics.json"))
    metrics.plot_confusion_matrix(np.asarray(report["confusion_matrix"]), class_names,
                                  os.path.join(out, "confusion_matrix.png"),
                                  title=f"{strategy}: test, best epoch {best['epoch']}")
    metrics.plot_roc_curves(best["test_probs"], best["test_labels"], class_names, os.path.join(out, "roc.png"),
                            title=f"{strategy}: test ROC, best epoch {best['epoch']}")
