from __future__ import annotations

import json

from trainer.cli import main
from trainer.config import TrainConfig
from trainer.compare import compare_methods
from trainer.metrics import classification_metrics, token_f1


def test_compare_writes_table_json_and_plot(tmp_path, tiny_llama, generation_file):
    config = TrainConfig(
        train_file=str(generation_file), output_dir=str(tmp_path / "cmp"), base=str(tiny_llama), max_steps=2,
        eval_steps=2, max_new_tokens=2, max_length=32, num_threads=1, num_virtual_tokens=4,
    )
    rows = compare_methods(config, ["lora", "last-n-layers", "prompt-tuning"])
    assert [r["method"] for r in rows] == ["lora", "last-n-layers", "prompt-tuning"]
    assert [r["serving"] for r in rows] == ["batched", "not-served", "not-served"]
    assert all(r["size_bytes"] > 0 and 0 < r["trainable_percent"] <= 100 for r in rows)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| lora | batched |" in table and "exact_match (mean ± std)" in table
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert "exact_match" in saved["base_metrics"]


def test_eval_command_puts_base_beside_the_adapter(tmp_path, tiny_bert, classification_file, capsys):
    out = tmp_path / "topics"
    assert main(["train", str(classification_file), "-o", str(out), "--task", "classify", "--base", str(tiny_bert),
                 "--max-steps", "4", "--eval-steps", "4", "--threads", "1", "--no-base-eval"]) == 0
    capsys.readouterr()
    # Task, labels and base all come from the adapter's manifest.
    assert main(["eval", str(classification_file), "--adapter", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["base"]["labels"] == results["adapter"]["labels"] == ["animal", "colour", "sound"]
    assert results["adapter"]["examples"] == 36


def test_metric_definitions():
    assert token_f1("the cat sat", "The cat") == 0.8
    assert token_f1("", "") == 1.0 and token_f1("dog", "cat") == 0.0
    metrics = classification_metrics([0, 0, 1, 2], [0, 1, 1, 1], ["a", "b", "c"])
    assert metrics["accuracy"] == 0.5
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    # per-label F1: a = 2/3, b = 1/2, c = 0
    assert abs(metrics["macro_f1"] - (2 / 3 + 1 / 2) / 3) < 1e-9
