"""Held-out metrics: exact match, token F1 and perplexity for generation; accuracy, macro-F1
and the confusion matrix for classification.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Sequence

import torch

from trainer.data import ClassificationExample, GenerationExample
from trainer.features import PaddingCollator, encode_classification, encode_generation, render_prompt

SAMPLES_KEPT = 8  # predictions shown in the report next to their references
HEADLINE_METRIC = {"generate": "exact_match", "classify": "accuracy"}  # picks the best seed, heads tables


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


@torch.no_grad()
def generate_answers(
    model, tokenizer, examples: Sequence[GenerationExample], max_new_tokens: int, batch_size: int
) -> list[str]:
    model.eval()
    original_side = tokenizer.padding_side
    # Left padding so every row's prompt ends where generation starts.
    tokenizer.padding_side = "left"
    answers: list[str] = []
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [render_prompt(e, tokenizer) for e in examples[start : start + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]  # [batch, generated]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = original_side
    return answers


@torch.no_grad()
def answer_perplexity(model, tokenizer, examples: Sequence[GenerationExample], max_length: int, batch_size: int) -> float:
    """exp(mean NLL of the answer tokens), the same positions the training loss covers."""
    model.eval()
    collate = PaddingCollator(tokenizer.pad_token_id)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        rows = [encode_generation(e, tokenizer, max_length) for e in examples[start : start + batch_size]]
        batch = {k: v.to(model.device) for k, v in collate(rows).items()}
        # The loss is a mean over the batch's answer tokens; weight it back into a sum.
        answer_tokens = int((batch["labels"][:, 1:] != -100).sum())
        total_nll += float(model(**batch).loss) * answer_tokens
        total_tokens += answer_tokens
    return math.exp(total_nll / max(total_tokens, 1))


def evaluate_generation(
    model, tokenizer, examples: Sequence[GenerationExample], *, max_new_tokens: int, batch_size: int, max_length: int
) -> dict[str, Any]:
    predictions = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    references = [e.answer.strip() for e in examples]
    exact = [float(p == r) for p, r in zip(predictions, references)]
    return {
        "exact_match": sum(exact) / len(exact),
        "token_f1": sum(token_f1(p, r) for p, r in zip(predictions, references)) / len(references),
        "perplexity": answer_perplexity(model, tokenizer, examples, max_length, batch_size),
        "examples": len(examples),
        "samples": [
            {"prompt": render_prompt(e, tokenizer)[-200:], "reference": r, "prediction": p}
            for e, r, p in list(zip(examples, references, predictions))[:SAMPLES_KEPT]
        ],
    }


@torch.no_grad()
def predict_labels(model, tokenizer, examples: Sequence[ClassificationExample], label_ids: dict[str, int], *, batch_size: int, max_length: int) -> list[int]:
    model.eval()
    collate = PaddingCollator(tokenizer.pad_token_id)
    predicted: list[int] = []
    for start in range(0, len(examples), batch_size):
        rows = [encode_classification(e, tokenizer, label_ids, max_length) for e in examples[start : start + batch_size]]
        batch = collate(rows)
        batch.pop("labels")
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits  # [batch, labels]
        predicted.extend(logits.argmax(dim=-1).tolist())
    return predicted


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


def evaluate_classification(
    model, tokenizer, examples: Sequence[ClassificationExample], labels: Sequence[str], *, batch_size: int, max_length: int
) -> dict[str, Any]:
    label_ids = {name: i for i, name in enumerate(labels)}
    predicted = predict_labels(model, tokenizer, examples, label_ids, batch_size=batch_size, max_length=max_length)
    return classification_metrics([label_ids[e.label] for e in examples], predicted, labels)

