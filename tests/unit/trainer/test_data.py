from __future__ import annotations

import json

import pytest

from trainer.data import (
    ClassificationExample,
    DataError,
    GenerationExample,
    label_names,
    load_examples,
    split_validation,
    to_row,
)


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_reads_all_three_generation_shapes(tmp_path):
    path = _write(
        tmp_path,
        "mixed.jsonl",
        '{"input": "2+2", "target": "4"}\n'
        "\n"
        '{"prompt": "Q: 3+3\\nA:", "completion": " 6"}\n'
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "hello"}]}\n',
    )
    seed_form, raw, chat = load_examples(path, "generate")
    # {"input","target"} is raw text, like {"prompt","completion"}: answered from a plain `prompt`.
    assert seed_form == GenerationExample(prompt="2+2", answer="4", shape="input/target") and not seed_form.is_chat
    assert raw == GenerationExample(prompt="Q: 3+3\nA:", answer=" 6", shape="prompt/completion") and not raw.is_chat
    assert chat.prompt == (("system", "be brief"), ("user", "hi")) and chat.answer == "hello" and chat.shape == "messages"
    # Each reads back as the row it came from (held_out.jsonl beside a report).
    assert [to_row(e) for e in (seed_form, raw, chat)] == [json.loads(line) for line in path.read_text().split("\n") if line]


def test_every_bad_row_is_reported_with_file_line_and_reason(tmp_path):
    path = _write(
        tmp_path,
        "bad.jsonl",
        '{"input": "ok", "target": "fine"}\n'  # 1: good
        "{not json\n"  # 2
        '["a list"]\n'  # 3
        '{"input": "no target"}\n'  # 4
        '{"input": 5, "target": "x"}\n'  # 5
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}\n'  # 6
        '{"question": "?", "answer": "!"}\n'  # 7
        '{"prompt": "p", "completion": "   "}\n',  # 8
    )
    with pytest.raises(DataError) as caught:
        load_examples(path, "generate")
    problems = caught.value.problems
    assert [line for _, line, _ in problems] == [2, 3, 4, 5, 6, 7, 8]
    assert all(file == str(path) for file, _, _ in problems)
    reasons = dict((line, reason) for _, line, reason in problems)
    assert "not valid JSON" in reasons[2]
    assert "expected a JSON object" in reasons[3]
    assert "'target' must be a string" in reasons[4]
    assert "'input' must be a string" in reasons[5]
    assert "role 'assistant'" in reasons[6]
    assert "expected" in reasons[7] and "question" in reasons[7]
    assert "'completion' is empty" in reasons[8]
    assert f"{path}:2:" in str(caught.value)


def test_classification_jsonl_and_csv(tmp_path):
    jsonl = _write(tmp_path, "c.jsonl", '{"text": "hello", "label": "greet"}\n{"text": "bye", "label": 3}\n')
    assert load_examples(jsonl, "classify") == [ClassificationExample("hello", "greet"), ClassificationExample("bye", "3")]
    csv_file = _write(tmp_path, "c.csv", 'text,label\nhello,greet\n"multi\nline",greet\n,empty\nbye,\n')
    with pytest.raises(DataError) as caught:
        load_examples(csv_file, "classify")
    # The quoted newline makes the third row end on line 5; physical line numbers are reported.
    assert [(line, "'text'" in reason or "'label'" in reason) for _, line, reason in caught.value.problems] == [(5, True), (6, True)]


def test_csv_header_and_task_mismatch(tmp_path):
    no_label = _write(tmp_path, "n.csv", "text,category\nhi,x\n")
    with pytest.raises(DataError, match="'text' and 'label'"):
        load_examples(no_label, "classify")
    with pytest.raises(DataError, match="classification only"):
        load_examples(no_label, "generate")
    with pytest.raises(DataError, match="file not found"):
        load_examples(tmp_path / "missing.jsonl", "generate")
    with pytest.raises(DataError, match="no examples"):
        load_examples(_write(tmp_path, "empty.jsonl", "\n"), "generate")


def test_classification_split_is_stratified_and_seeded():
    examples = [ClassificationExample(f"t{i}", "a" if i % 4 else "b") for i in range(40)]
    train, held_out = split_validation(examples, 0.2, seed=0)
    assert len(held_out) == 8 and len(train) == 32
    assert sum(e.label == "b" for e in held_out) == 2  # b is a quarter of the data, and of the split
    assert split_validation(examples, 0.2, seed=0) == (train, held_out)
    assert label_names(train, held_out) == ["a", "b"]


def test_validation_labels_must_be_seen_in_training():
    with pytest.raises(DataError, match="never in training"):
        label_names([ClassificationExample("x", "a")], [ClassificationExample("y", "b")])


def test_too_few_generation_examples_to_split():
    with pytest.raises(DataError, match="too few"):
        split_validation([GenerationExample("p", "a")], 0.1, seed=0)
