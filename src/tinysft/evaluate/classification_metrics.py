"""Classification metrics: pure functions from gold and predicted labels to numbers, by scikit-learn.

scikit-learn's conventions (``zero_division=0``): a class with no predictions has precision 0, a
class with no gold rows has recall 0 and weight 0 in the weighted averages. The output keeps
tinysft's report keys (``accuracy``, ``f1_weighted``, ``per_class``, ``confusion_matrix``, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def confusion_matrix(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """``matrix[i][j]`` = rows whose gold label is ``labels[i]`` and prediction is ``labels[j]``."""
    from sklearn import metrics

    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length ({len(gold)} vs {len(pred)})")
    if not gold:
        return [[0] * len(labels) for _ in labels]
    return metrics.confusion_matrix(list(gold), list(pred), labels=list(labels)).tolist()


def per_class_scores(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support of each class."""
    from sklearn import metrics

    if not gold:
        return {label: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for label in labels}
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        list(gold), list(pred), labels=list(labels), average=None, zero_division=0)
    return {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)}


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro and weighted F1 / precision / recall, per-class scores and the confusion matrix."""
    from sklearn import metrics

    matrix = confusion_matrix(gold, pred, labels)
    n = len(gold)

    def averaged(average: str) -> tuple[float, float, float]:
        if not n:
            return 0.0, 0.0, 0.0
        p, r, f, _ = metrics.precision_recall_fscore_support(list(gold), list(pred), labels=list(labels),
                                                             average=average, zero_division=0)
        return float(p), float(r), float(f)

    p_weighted, r_weighted, f1_weighted = averaged("weighted")
    p_macro, r_macro, f1_macro = averaged("macro")
    return {
        "n": n,
        "accuracy": float(metrics.accuracy_score(list(gold), list(pred))) if n else 0.0,
        "f1_weighted": f1_weighted,
        "f1_macro": f1_macro,
        "precision_weighted": p_weighted,
        "recall_weighted": r_weighted,
        "precision_macro": p_macro,
        "recall_macro": r_macro,
        "per_class": per_class_scores(gold, pred, labels),
        "confusion_matrix": matrix,
        "labels": list(labels),
    }
