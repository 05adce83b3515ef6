"""Held-out metrics: exact match, token F1 and perplexity for generation; accuracy, macro-F1
and the confusion matrix for classification.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from tqdm import tqdm

from trainer.data import ClassificationExample, GenerationExample
from trainer.features import PaddingCollator, encode_classification, encode_generation, prompt_ids, render_prompt
from trainer.metrics import SAMPLES_KEPT, classification_metrics, generation_metrics

# Picks the best seed, heads tables.
HEADLINE_METRIC = {"generate": "exact_match", "classify": "accuracy", "image-classify": "accuracy"}


@torch.no_grad()
def generate_answers(
    model, tokenizer, examples: Sequence[GenerationExample], max_new_tokens: int, batch_size: int
) -> list[str]:
    model.eval()
    answers: list[str] = []
    # Generation is the slow part of a run's evaluation (minutes on CPU): show it moving.
    for start in tqdm(range(0, len(examples), batch_size), desc="generating held-out answers", unit="batch", leave=False):
        # The server's ids for each request (features.prompt_ids), left-padded so every row's
        # prompt ends where generation starts.
        rows = [prompt_ids(e, tokenizer) for e in examples[start : start + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])  # [batch, seq]
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        output = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = output[:, width:]  # [batch, generated]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
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
    return {
        **generation_metrics(predictions, references),
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


def evaluate_classification(
    model, tokenizer, examples: Sequence[ClassificationExample], labels: Sequence[str], *, batch_size: int, max_length: int
) -> dict[str, Any]:
    label_ids = {name: i for i, name in enumerate(labels)}
    predicted = predict_labels(model, tokenizer, examples, label_ids, batch_size=batch_size, max_length=max_length)
    return classification_metrics([label_ids[e.label] for e in examples], predicted, labels)

