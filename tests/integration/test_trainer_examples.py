"""The shipped example adapters still hit their figures on the real default base.

Re-evaluates adapters/examples/<name>/ on its held-out file (examples/data/<name>/test.jsonl)
with the base beside: generation exact match base < 0.2 and adapter >= 0.8; classification
base head near chance and adapter accuracy >= 0.9.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.package import content_sha256

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _example(name: str) -> Path:
    folder = REPO / "adapters" / "examples" / name
    if not (folder / "adapter_model.safetensors").is_file():
        pytest.skip(f"example adapter {name} not trained: python examples/make_examples.py --train")
    return folder


@pytest.mark.parametrize("name", ["date-iso", "ticket-routing"])
def test_example_manifest_matches_its_files(name):
    folder = _example(name)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["sha256"] == content_sha256(folder) and manifest["version"] == manifest["sha256"][:12]
    assert manifest["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (folder / "adapter_model.safetensors").stat().st_size < 5_000_000


def test_generation_example_beats_the_base():
    from trainer.eval_adapter import evaluate_adapter

    results = evaluate_adapter(str(REPO / "examples/data/date-iso/test.jsonl"), str(_example("date-iso")), max_new_tokens=16)
    assert results["base"]["exact_match"] < 0.2
    assert results["adapter"]["exact_match"] >= 0.8


def test_classification_example_beats_the_base_head():
    from trainer.eval_adapter import evaluate_adapter

    results = evaluate_adapter(str(REPO / "examples/data/ticket-routing/test.jsonl"), str(_example("ticket-routing")))
    assert results["base"]["accuracy"] < 0.5  # 4 balanced labels: chance is 0.25
    assert results["adapter"]["accuracy"] >= 0.9
