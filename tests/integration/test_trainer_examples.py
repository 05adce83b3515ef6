"""The shipped example adapters: their files, their data, the README's figures, and (slow) the
figures themselves re-measured on the real default base.

Cheap checks run in the default suite: each manifest matches its files, the data hash in it
matches the shipped data, and the README's example table and sentence say what the reports
say. The slow ones re-evaluate adapters/examples/<name>/ on its held-out file
(examples/data/<name>/test.jsonl) with the base beside: generation exact match base < 0.2 and
adapter >= 0.8; classification base head near chance and adapter accuracy >= 0.9.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adapters.package import content_sha256
from trainer.data import files_sha256

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["date-iso", "ticket-routing"]
SHOWN = {"exact_match": "exact match", "accuracy": "accuracy", "macro_f1": "macro-F1"}
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}


def _example(name: str) -> Path:
    folder = REPO / "adapters" / "examples" / name
    if not (folder / "adapter_model.safetensors").is_file():
        pytest.fail(f"example adapter {name} is not in the repository: python examples/make_examples.py --train")
    return folder


def _report(name: str) -> dict:
    return json.loads((_example(name) / "report.json").read_text())


def _readme_row(name: str) -> dict[str, str]:
    """The README example table's cells for `name` by column title (after the name), bold marks dropped."""
    readme = (REPO / "README.md").read_text()
    header = re.search(r"^\| adapter \|(.*)\|$", readme, re.MULTILINE)
    row = re.search(rf"^\| `{re.escape(name)}` \|(.*)\|$", readme, re.MULTILINE)
    assert header and row, f"README has no example table, or no row for {name}"
    titles, cells = (
        [cell.strip().replace("**", "") for cell in match.group(1).split("|")] for match in (header, row)
    )
    return dict(zip(titles, cells))


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_manifest_matches_its_files(name):
    folder = _example(name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == content_sha256(folder) and manifest["version"] == manifest["sha256"][:12]
    assert manifest["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (folder / "adapter_model.safetensors").stat().st_size < 5_000_000


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_was_trained_on_the_shipped_data(name):
    manifest = json.loads((_example(name) / "manifest.json").read_text())
    config = manifest["extra"]["training_config"]
    files = [REPO / config["train_file"], REPO / config["validation_file"]]
    assert manifest["extra"]["data_sha256"] == files_sha256(files), "examples/data changed since training"
    held_out = _report(name)["data"]["held_out_examples"]
    assert held_out == len((REPO / config["validation_file"]).read_text().splitlines())


@pytest.mark.parametrize("name", EXAMPLES)
def test_readme_example_table_states_the_reported_figures(name):
    report = _report(name)
    row = _readme_row(name)
    held_out, base, adapter = row["held-out"], row["base"], row["adapter"]
    # The request shape the report names (its manifest's prompt format, or the classify field).
    assert f"`{report['request']['field']}`" in row["asked with"]
    headline = report["headline_metric"]
    assert held_out == f"{report['data']['held_out_examples']} examples"
    assert f"{SHOWN[headline]} {report['base_metrics'][headline]:.2f}" in base
    assert f"{SHOWN[headline]} {report['metrics'][headline]:.2f}" in adapter
    if report["task"] == "classify":
        assert f"(chance {1 / len(report['data']['labels']):.2f})" in base
        assert f"{SHOWN['macro_f1']} {report['metrics']['macro_f1']:.2f}" in adapter


def test_readme_example_sentence_states_the_reported_method():
    sentence = re.search(r"Both are LoRA r=(\d+) on the attention projections of (\S+) \(([\d.]+) % of the\s+"
                         r"parameters trainable\)", (REPO / "README.md").read_text())
    assert sentence, "README's sentence under the example table changed: update this test with it"
    rank, base, percent = sentence.groups()
    for name in EXAMPLES:
        report = _report(name)
        config = report["training_config"]
        assert report["method"] == "lora" and config["rank"] == int(rank), name
        assert set(config["target_modules"]) <= ATTENTION, name
        assert report["base_model"].endswith("/" + base), name
        assert f"{report['trainable_percent']:.2f}" == percent, name


@pytest.mark.integration
@pytest.mark.slow
def test_generation_example_beats_the_base():
    from trainer.eval_adapter import evaluate_adapter

    results = evaluate_adapter(str(REPO / "examples/data/date-iso/test.jsonl"), str(_example("date-iso")), max_new_tokens=16)
    assert results["base"]["exact_match"] < 0.2
    assert results["adapter"]["exact_match"] >= 0.8


@pytest.mark.integration
@pytest.mark.slow
def test_classification_example_beats_the_base_head():
    from trainer.eval_adapter import evaluate_adapter

    results = evaluate_adapter(str(REPO / "examples/data/ticket-routing/test.jsonl"), str(_example("ticket-routing")))
    assert results["base"]["accuracy"] < 0.5  # 4 balanced labels: chance is 0.25
    assert results["adapter"]["accuracy"] >= 0.9
