"""colora_fused.finetune.metrics against hand-computed confusion matrices and AUCs."""
import itertools

import numpy as np
import pytest
import torch

from colora_fused.finetune import metrics

# C = [[5,0,0],[0,3,2],[0,1,4]]: rows true, columns predicted (15 samples, trace 12).
Y_TRUE = [0] * 5 + [1] * 5 + [2] * 5
Y_PRED = [0] * 5 + [1, 1, 1, 2, 2] + [1, 2, 2, 2, 2]
CM = np.array([[5, 0, 0], [0, 3, 2], [0, 1, 4]])


def test_confusion_matrix_by_hand():
    np.testing.assert_array_equal(metrics.confusion_matrix(Y_TRUE, Y_PRED, 3), CM)
    np.testing.assert_array_equal(metrics.confusion_matrix(torch.tensor(Y_TRUE), torch.tensor(Y_PRED), 3), CM)
    np.testing.assert_array_equal(metrics.confusion_matrix([0, 2], [0, 2], 4),
                                  [[1, 0, 0, 0], [0] * 4, [0, 0, 1, 0], [0] * 4])


def test_rates_by_hand():
    assert metrics.accuracy(CM) == pytest.approx(12 / 15)  # eq. 22
    np.testing.assert_allclose(metrics.recall(CM), [5 / 5, 3 / 5, 4 / 5])  # eq. 20: C_ii / row sum
    np.testing.assert_allclose(metrics.precision(CM), [5 / 5, 3 / 4, 4 / 6])  # eq. 21: C_ii / column sum
    # TN / (TN + FP): class 0 has 10 negatives, none predicted 0; class 1: 10 negatives, 1 predicted 1;
    # class 2: 10 negatives, 2 predicted 2.
    np.testing.assert_allclose(metrics.specificity(CM), [10 / 10, 9 / 10, 8 / 10])


def test_specificity_is_the_standard_one_not_eq23_literal():
    paper_eq23 = (np.trace(CM) - np.diag(CM)) / (CM.sum() - CM.sum(axis=1))
    assert paper_eq23[0] == pytest.approx(7 / 10)  # negatives right in their own class only
    assert metrics.specificity(CM)[0] == 1.0
    two = np.array([[7, 3], [2, 8]])  # two classes: eq. 23 and TN/(TN+FP) agree
    np.testing.assert_allclose(metrics.specificity(two), (np.trace(two) - np.diag(two)) / (two.sum() - two.sum(axis=1)))


def test_undefined_rates_are_nan():
    cm = np.array([[2, 0, 0], [1, 0, 0], [0, 0, 0]])  # class 2 absent, class 1 and 2 never predicted
    r, p = metrics.recall(cm), metrics.precision(cm)
    assert np.isnan(r[2]) and np.isnan(p[1]) and np.isnan(p[2]) and r[1] == 0.0


def test_auc_by_hand():
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # ties count one half: pairs (0.5 vs 0.5) ½, (0.5 vs 0.2) 1, (0.9 vs 0.5) 1, (0.9 vs 0.2) 1 → 3.5 / 4
    assert metrics.roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert metrics.roc_auc([0.3, 0.3, 0.3], [1, 0, 1]) == pytest.approx(0.5)
    assert np.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))


def test_auc_matches_pairwise_count_and_roc_area():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, size=40) / 5.0  # many ties
    y = rng.integers(0, 2, size=40).astype(bool)
    pairs = [(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])]
    assert metrics.roc_auc(s, y) == pytest.approx(np.mean(pairs))
    fpr, tpr, thr = metrics.roc_curve(s, y)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0 and np.isinf(thr[0])
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(thr) == len(np.unique(s)) + 1  # one point per distinct score
    assert np.trapezoid(tpr, fpr) == pytest.approx(np.mean(pairs))


def test_one_vs_rest_and_report():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3], [0.5, 0.3, 0.2]])
    y = np.array([0, 1, 2, 2, 1])
    auc = metrics.one_vs_rest_auc(probs, y)
    assert auc[0] == pytest.approx(metrics.roc_auc(probs[:, 0], y == 0))
    # class 1 scores: positives {0.7, 0.3}, negatives {0.1, 0.2, 0.4}: 3 + 2 = 5 of 6 pairs
    assert auc[1] == pytest.approx(5 / 6)
    rep = metrics.classification_report(y, probs, ["a", "b", "c"])
    assert rep["accuracy"] == pytest.approx(3 / 5)
    assert rep["confusion_matrix"] == metrics.confusion_matrix(y, probs.argmax(1), 3).tolist()
    assert rep["per_class"]["recall"] == {"a": 1.0, "b": 0.5, "c": 0.5}
    assert rep["macro"]["auc"] == pytest.approx(np.mean(auc))


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="labels must lie"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="differ in length"):
        metrics.roc_auc([0.1, 0.2], [1])


def test_plots_write_png(tmp_path):
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    y = np.array([0, 1, 1, 1])
    metrics.plot_confusion_matrix(metrics.confusion_matrix(y, probs.argmax(1), 2), ["a", "b"], tmp_path / "cm.png")
    metrics.plot_roc_curves(probs, y, ["a", "b"], tmp_path / "roc.png")
    for name in ("cm.png", "roc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "roc.png"]  # written via a renamed .partial


def test_failed_plot_leaves_the_previous_png(tmp_path, monkeypatch):
    import matplotlib.figure

    path = tmp_path / "cm.png"
    path.write_bytes(b"previous")

    def broken(self, *args, **kwargs):
        args[0].write(b"\x89PNG half")
        raise OSError("no space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="no space"):
        metrics.plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], path)
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["cm.png"]
