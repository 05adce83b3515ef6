"""The metrics themselves, on predictions already made: no model, no torch.

Shared by the offline evaluation (trainer/evaluation.py, predictions from the model in this
process) and the evaluation through a server (trainer/eval_server.py, predictions over
HTTP), so the two figures are computed by the same code and can be compared.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

SAMPLES_KEPT = 8  # predictions shown in reports next to their references


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style overlap F1 over lower-cased whitespace tokens."""
    predicted, expected = prediction.lower().split(), reference.lower().split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match and token F1; both sides are compared with surrounding whitespace stripped."""
    predicted = [p.strip() for p in predictions]
    expected = [r.strip() for r in references]
    return {
        "exact_match": sum(p == r for p, r in zip(predicted, expected)) / len(expected),
        "token_f1": sum(token_f1(p, r) for p, r in zip(predicted, expected)) / len(expected),
    }


def classification_metrics(gold: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    size = len(labels)
    confusion = [[0] * size for _ in range(size)]  # rows: gold label, columns: predicted label
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    f1s = []
    for k in range(size):
        true_positive = confusion[k][k]
        predicted_k = sum(confusion[g][k] for g in range(size))
        gold_k = sum(confusion[k])
        denominator = predicted_k + gold_k
        f1s.append(2 * true_positive / denominator if denominator else 0.0)
    return {
        "accuracy": sum(g == p for g, p in zip(gold, predicted)) / len(gold),
        "macro_f1": sum(f1s) / size,
        "confusion_matrix": confusion,
        "labels": list(labels),
        "examples": len(gold),
    }
