"""Classification metrics as the paper reports them (Rivera & Hoyos 2025, §4.2, eq. 20–23).

Every function takes plain arrays (numpy or torch) and returns numpy / Python numbers; nothing here
depends on scikit-learn. The confusion matrix ``C`` has true classes along rows and predicted classes
along columns, ``C[i, j]`` = number of class-``i`` samples predicted as ``j``, as in eq. 20–23.

A per-class value whose denominator is zero (a class absent from the labels, or never predicted) is
``nan``; averages skip ``nan`` entries.

Specificity (eq. 23). The paper writes ``S_i = (Tr(C) - C_ii) / (1ᵀC1 - [C1]_i)``. Its denominator is the
number of negatives of class ``i`` (TN + FP), but its numerator counts only the negatives that were
classified *correctly into their own class*; the standard true negatives also include negatives
confused with a third class. The two agree for two classes and differ for more (for
``C = [[5,0,0],[0,3,2],[0,1,4]]`` class 0: paper 7/10, standard 10/10, and class 0 has no false
positives). We implement the standard ``TN / (TN + FP)``.

The plots are written atomically (``serialization.atomic_write``).
"""
import numpy as np

from ..serialization import atomic_write

__all__ = [
    "confusion_matrix",
    "accuracy",
    "recall",
    "precision",
    "specificity",
    "roc_curve",
    "roc_auc",
    "one_vs_rest_auc",
    "classification_report",
    "plot_confusion_matrix",
    "plot_roc_curves",
]


def _numpy(a):
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _labels(y, num_classes):
    y = _numpy(y).reshape(-1)
    if y.size and (not np.issubdtype(y.dtype, np.integer)):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("labels must be integers")
        y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _ratio(num, den):
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def confusion_matrix(y_true, y_pred, num_classes):
    """``C[i, j]`` = count of samples with true class ``i`` predicted as ``j``; int64 ``[K, K]``."""
    t = _labels(y_true, num_classes)
    p = _labels(y_pred, num_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(cm):
    """Eq. 22: ``Tr(C) / 1ᵀC1``."""
    cm = _numpy(cm)
    return float(_ratio(np.trace(cm), cm.sum()))


def recall(cm):
    """Eq. 20, per class: ``C_ii / [C1]_i`` (sensitivity, true-positive rate)."""
    cm = _numpy(cm)
    return _ratio(np.diag(cm), cm.sum(axis=1))


def precision(cm):
    """Eq. 21, per class: ``C_ii / [1ᵀC]_i``."""
    cm = _numpy(cm)
    return _ratio(np.diag(cm), cm.sum(axis=0))


def specificity(cm):
    """Per class ``TN / (TN + FP)`` — the standard definition (see the module docstring on eq. 23)."""
    cm = _numpy(cm)
    negatives = cm.sum() - cm.sum(axis=1)  # TN + FP
    false_pos = cm.sum(axis=0) - np.diag(cm)
    return _ratio(negatives - false_pos, negatives)


def roc_curve(scores, positive):
    """ROC of a score for a binary target: ``(fpr, tpr, thresholds)``, starting at (0, 0).

    One point per distinct score (descending), so tied scores move the curve diagonally, never
    in an order-dependent staircase. ``thresholds[0]`` is ``+inf``.
    """
    s = _numpy(scores).astype(np.float64).reshape(-1)
    y = _numpy(positive).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and targets differ in length: {s.size} vs {y.size}")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), s.size - 1] if s.size else np.zeros(0, np.int64)
    tp = np.cumsum(y)[last_of_tie]
    fp = (last_of_tie + 1) - tp
    tpr = np.r_[0.0, _ratio(tp, y.sum())]
    fpr = np.r_[0.0, _ratio(fp, (~y).sum())]
    return fpr, tpr, np.r_[np.inf, s[last_of_tie]]


def roc_auc(scores, positive):
    """Area under the ROC curve = P(score of a positive > score of a negative) + ½ P(tie).

    Computed with mid-ranks (Mann–Whitney U), which equals the trapezoidal area of
    :func:`roc_curve`. ``nan`` when there are no positives or no negatives.
    """
    s = _numpy(scores).astype(np.float64).reshape(-1)
    y = _numpy(positive).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and targets differ in length: {s.size} vs {y.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    last = np.r_[first[1:], s.size]
    mid_rank = (first + last + 1) / 2.0  # 1-based average rank of each tie group
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(mid_rank, last - first)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def one_vs_rest_auc(probs, y_true):
    """Per-class one-vs-rest AUC-ROC from class scores ``probs`` ``[N, K]``."""
    p = _numpy(probs)
    t = _labels(y_true, p.shape[1])
    return np.array([roc_auc(p[:, k], t == k) for k in range(p.shape[1])])


def _mean(v):
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def classification_report(y_true, probs, class_names=None):
    """All the paper's metrics for class scores ``probs`` ``[N, K]``: a JSON-ready dict.

    ``per_class`` holds recall, precision, specificity and AUC for each class; ``macro`` their
    unweighted means; ``accuracy`` is eq. 22; ``confusion_matrix`` is ``C`` as nested lists.
    """
    p = _numpy(probs)
    k = p.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for {k} classes")
    cm = confusion_matrix(y_true, p.argmax(axis=1), k)
    per = {
        "recall": recall(cm),
        "precision": precision(cm),
        "specificity": specificity(cm),
        "auc": one_vs_rest_auc(p, y_true),
    }
    return {
        "accuracy": accuracy(cm),
        "num_samples": int(cm.sum()),
        "classes": names,
        "per_class": {m: {n: _finite_or_none(v) for n, v in zip(names, vals)} for m, vals in per.items()},
        "macro": {m: _finite_or_none(_mean(vals)) for m, vals in per.items()},
        "confusion_matrix": cm.tolist(),
    }


def _finite_or_none(v):
    v = float(v)
    return v if np.isfinite(v) else None


def _save_png(fig, path):
    """Write ``fig`` as a PNG, atomically (a crash never leaves half an image), and close it, also on failure."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def plot_confusion_matrix(cm, class_names, path, title="Confusion matrix"):
    """Write the confusion matrix as a PNG (atomically) with counts in the cells (rows: true, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = _numpy(cm)
    k = cm.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * k, 1.0 + 0.7 * k), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = cm.max() / 2.0 if cm.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    _save_png(fig, path)


def plot_roc_curves(probs, y_true, class_names, path, title="ROC (one vs rest)"):
    """Write one-vs-rest ROC curves, one per class with its AUC in the legend, as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = _numpy(probs)
    t = _labels(y_true, p.shape[1])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for k, name in enumerate(class_names):
        fpr, tpr, _ = roc_curve(p[:, k], t == k)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(p[:, k], t == k):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (recall)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    _save_png(fig, path)
