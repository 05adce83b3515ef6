"""The shipped example datasets are exactly what examples/make_examples.py generates."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _make_examples():
    spec = importlib.util.spec_from_file_location("make_examples", REPO / "examples" / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_the_shipped_files(tmp_path):
    _make_examples().make_datasets(tmp_path)
    for name in ("date-iso", "ticket-routing"):
        for split in ("train", "test"):
            shipped = REPO / "examples" / "data" / name / f"{split}.jsonl"
            assert (tmp_path / name / f"{split}.jsonl").read_bytes() == shipped.read_bytes(), shipped


def test_held_out_rows_never_repeat_training_rows():
    for name, key in (("date-iso", "target"), ("ticket-routing", "text")):
        rows = {split: [json.loads(line) for line in (REPO / "examples" / "data" / name / f"{split}.jsonl").open()] for split in ("train", "test")}
        assert not {r[key] for r in rows["train"]} & {r[key] for r in rows["test"]}
    labels = [json.loads(line)["label"] for line in (REPO / "examples/data/ticket-routing/test.jsonl").open()]
    assert {labels.count(label) for label in set(labels)} == {30}  # balanced: chance is 1/4
