"""Classification metrics on a case small enough to check by hand (the report's keys stay the same)."""

from __future__ import annotations

import pytest

from tinysft.evaluate.classification_metrics import classification_metrics


def test_hand_computed_case() -> None:
    # gold: a a a b b c ; pred: a a b b c c  -> a: P 2/2 R 2/3; b: P 1/2 R 1/2; c: P 1/2 R 1/1; "d": no rows.
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = classification_metrics(gold, pred, ["a", "b", "c", "d"])
    assert m["n"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    assert m["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    f1 = {"a": 0.8, "b": 0.5, "c": 2 / 3, "d": 0.0}
    assert m["f1_weighted"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["f1_macro"] == pytest.approx(sum(f1.values()) / 4)
    assert m["confusion_matrix"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert isinstance(m["accuracy"], float) and isinstance(m["per_class"]["a"]["support"], int)  # JSON-ready


def test_empty_input_is_zeros_not_an_error() -> None:
    m = classification_metrics([], [], ["x", "y"])
    assert m["n"] == 0 and m["accuracy"] == 0.0 and m["confusion_matrix"] == [[0, 0], [0, 0]]
