"""Reading training data: JSONL (generation or classification) and CSV (classification).

Generation rows, one JSON object per line, in any of three shapes:
  {"input": ..., "target": ...}        the seed's form; raw text, no chat template
  {"prompt": ..., "completion": ...}   raw text, no chat template
  {"messages": [{"role", "content"}...]} chat; the last message is the assistant answer
How each shape becomes a prompt (and which request shape the adapter then answers) is
decided in trainer/prompt_format.py.
Classification rows: {"text": ..., "label": ...} in JSONL, or a CSV with text,label columns.

Every malformed row is reported with file, line and reason, all at once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from adapters.manifest import Task

MAX_REPORTED_PROBLEMS = 20


class DataError(ValueError):
    """Malformed training data; `problems` holds (file, line, reason) for each bad row."""

    def __init__(self, problems: list[tuple[str, int, str]]):
        self.problems = problems
        shown = [f"{file}:{line}: {reason}" for file, line, reason in problems[:MAX_REPORTED_PROBLEMS]]
        more = len(problems) - len(shown)
        if more:
            shown.append(f"... and {more} more")
        super().__init__("invalid training data:\n  " + "\n  ".join(shown))


RowShape = Literal["input/target", "prompt/completion", "messages"]


@dataclass(frozen=True)
class GenerationExample:
    # Either chat messages (the answer is the final assistant message, not included here)
    # or a raw prompt string; `answer` is what the model must produce.
    prompt: str | tuple[tuple[str, str], ...]
    answer: str
    shape: RowShape = "prompt/completion"  # the row's shape in the data file

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass(frozen=True)
class ClassificationExample:
    text: str
    label: str


Example = GenerationExample | ClassificationExample
_ROLES = ("system", "user", "assistant")


def load_examples(path: str | Path, task: Task) -> list[Example]:
    path = Path(path)
    if not path.is_file():
        raise DataError([(str(path), 0, "file not found")])
    if path.suffix.lower() == ".csv":
        if task != "classify":
            raise DataError([(str(path), 0, "CSV is read for classification only; use JSONL for generation")])
        return _load_csv(path)
    return _load_jsonl(path, task)


def _load_jsonl(path: Path, task: Task) -> list[Example]:
    examples: list[Example] = []
    problems: list[tuple[str, int, str]] = []
    with open(path, encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((str(path), line_number, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                problems.append((str(path), line_number, f"expected a JSON object, got {type(row).__name__}"))
                continue
            parse = _generation_row if task == "generate" else _classification_row
            try:
                examples.append(parse(row))
            except ValueError as exc:
                problems.append((str(path), line_number, str(exc)))
    if not examples and not problems:
        problems.append((str(path), 0, "no examples"))
    if problems:
        raise DataError(problems)
    return examples


def _generation_row(row: dict) -> GenerationExample:
    if "messages" in row:
        return _chat_row(row["messages"])
    for prompt_key, answer_key in (("input", "target"), ("prompt", "completion")):
        if prompt_key in row or answer_key in row:
            prompt, answer = row.get(prompt_key), row.get(answer_key)
            for key, value in ((prompt_key, prompt), (answer_key, answer)):
                if not isinstance(value, str):
                    raise ValueError(f"{key!r} must be a string, got {_kind(value)}")
            if not answer.strip():
                raise ValueError(f"{answer_key!r} is empty")
            return GenerationExample(prompt=prompt, answer=answer, shape=f"{prompt_key}/{answer_key}")
    raise ValueError(
        'expected {"input","target"}, {"prompt","completion"} or {"messages": [...]}, '
        f"got keys {sorted(row)}"
    )


def _chat_row(messages: object) -> GenerationExample:
    if not isinstance(messages, list) or len(messages) < 2:
        raise ValueError("'messages' must be a list of at least two messages")
    turns: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}] must be an object with a string 'content'")
        if message.get("role") not in _ROLES:
            raise ValueError(f"messages[{index}] has role {message.get('role')!r}; expected one of {_ROLES}")
        turns.append((message["role"], message["content"]))
    if turns[-1][0] != "assistant":
        raise ValueError("the last message must have role 'assistant' (it is the answer trained on)")
    return GenerationExample(prompt=tuple(turns[:-1]), answer=turns[-1][1], shape="messages")


def _classification_row(row: dict) -> ClassificationExample:
    text, label = row.get("text"), row.get("label")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"'text' must be a non-empty string, got {_kind(text)}")
    if isinstance(label, bool) or not isinstance(label, (str, int)) or str(label).strip() == "":
        raise ValueError(f"'label' must be a non-empty string or an integer, got {_kind(label)}")
    return ClassificationExample(text=text, label=str(label).strip())


def _load_csv(path: Path) -> list[Example]:
    examples: list[Example] = []
    problems: list[tuple[str, int, str]] = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        if not {"text", "label"} <= columns:
            raise DataError([(str(path), 1, f"header must name 'text' and 'label' columns, got {sorted(columns)}")])
        for row in reader:
            try:
                examples.append(_classification_row(row))
            except ValueError as exc:
                # reader.line_num is the physical line the row ended on (quoted newlines included).
                problems.append((str(path), reader.line_num, str(exc)))
    if not examples and not problems:
        problems.append((str(path), 0, "no examples"))
    if problems:
        raise DataError(problems)
    return examples


def to_row(example: Example) -> dict:
    """The JSONL row `example` reads back from: the inverse of the parsers above."""
    if isinstance(example, ClassificationExample):
        return {"text": example.text, "label": example.label}
    if example.shape == "messages":
        turns = [*example.prompt, ("assistant", example.answer)]
        return {"messages": [{"role": role, "content": content} for role, content in turns]}
    prompt_key, answer_key = example.shape.split("/")
    # A raw row rendered as one user turn (prompt_format chat) keeps its text in that turn.
    prompt = example.prompt if isinstance(example.prompt, str) else example.prompt[0][1]
    return {prompt_key: prompt, answer_key: example.answer}


def _kind(value: object) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def split_validation(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle split; classification keeps each label's share (stratified)."""
    rng = random.Random(seed)
    if examples and isinstance(examples[0], ClassificationExample):
        by_label: dict[str, list[Example]] = {}
        for example in examples:
            by_label.setdefault(example.label, []).append(example)
        train, held_out = [], []
        for group in by_label.values():
            rng.shuffle(group)
            cut = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
            held_out.extend(group[:cut])
            train.extend(group[cut:])
        rng.shuffle(train)
        return train, held_out
    shuffled = list(examples)
    rng.shuffle(shuffled)
    cut = max(1, round(len(shuffled) * fraction))
    if cut >= len(shuffled):
        raise DataError([("<split>", 0, f"{len(shuffled)} example(s) are too few to hold out a validation split")])
    return shuffled[cut:], shuffled[:cut]


def label_names(train: Sequence[ClassificationExample], held_out: Sequence[ClassificationExample]) -> list[str]:
    """Label ids in a stable order: sorted, so retraining on the same data keeps the ids."""
    missing = sorted({e.label for e in held_out} - {e.label for e in train})
    if missing:
        raise DataError([("<validation>", 0, f"label(s) {missing} appear in validation but never in training")])
    return sorted({e.label for e in train})


def files_sha256(paths: Sequence[str | Path | None]) -> str:
    """One digest over the data files, recorded in the manifest to tie an adapter to its data."""
    digest = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        digest.update(Path(path).name.encode() + b"\0")
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
