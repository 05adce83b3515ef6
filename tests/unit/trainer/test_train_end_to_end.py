"""Tiny end-to-end runs: train -> output folder -> manifest/report/plots, on tiny random models."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from adapters.manifest import AdapterManifest
from adapters.package import content_sha256
from trainer.cli import main
from trainer.config import CONFIG_FILE_NAME, TrainConfig
from trainer.report import write_outputs
from trainer.training import PARTIAL_WEIGHTS_FILE, run_training

# One thread: tiny matmuls gain nothing from two, and other test processes share the cores.
FAST = dict(batch_size=8, eval_steps=4, max_new_tokens=3, eval_batch_size=16, max_length=32, num_threads=1, learning_rate=5e-3)


def _config(tmp_path, data_file, base, **overrides) -> TrainConfig:
    values = dict(train_file=str(data_file), output_dir=str(tmp_path / "out"), base=str(base), **FAST)
    values.update(overrides)
    return TrainConfig(**values)


def _tensor_names(path) -> list[str]:
    with safe_open(str(path), "pt") as fh:
        return list(fh.keys())


def test_generation_lora_writes_a_serve_ready_folder(tmp_path, tiny_llama, generation_file, capsys):
    code = main(
        ["train", str(generation_file), "-o", str(tmp_path / "sounds"), "--base", str(tiny_llama), "--max-steps", "12",
         "--batch-size", "8", "--eval-steps", "4", "--max-new-tokens", "3", "--max-length", "32", "--lr", "0.01", "--threads", "1"]
    )
    assert code == 0
    out = tmp_path / "sounds"
    printed = capsys.readouterr().out
    assert "held-out exact_match" in printed and "server batches: lora, rslora" in printed

    manifest = AdapterManifest.from_dict(json.loads((out / "manifest.json").read_text()))
    assert manifest.sha256 == content_sha256(out) and manifest.version == manifest.sha256[:12]
    assert manifest.task == "generate" and manifest.peft_type == "LORA" and manifest.rank == 8
    assert manifest.labels is None and manifest.base_model == str(tiny_llama)
    kinds = {name.rsplit(".", 1)[-1] for name in manifest.target_modules}
    assert kinds >= {"q_proj", "down_proj"}  # all-linear, as PEFT expanded it
    assert manifest.extra["data_sha256"] and manifest.extra["training_config"]["max_steps"] == 12
    assert "exact_match" in manifest.extra["metrics"] and "exact_match" in manifest.extra["base_metrics"]

    report = json.loads((out / "report.json").read_text())
    assert report["serving"]["level"] == "batched"
    assert 0 < report["trainable_percent"] < 100
    assert any("eval_loss" in entry for entry in report["loss_history"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "report.md", "loss.png", "metrics.png", CONFIG_FILE_NAME):
        assert (out / name).is_file(), name
    assert not (out / "README.md").exists()
    assert all("lora_" in key for key in _tensor_names(out / "adapter_model.safetensors"))
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == manifest.base_model
    # The written config reproduces the run.
    again = TrainConfig.from_sources(str(out / CONFIG_FILE_NAME), {})
    assert again.max_steps == 12 and again.base == str(tiny_llama)


@pytest.mark.parametrize("base_fixture, head", [("tiny_llama", "score"), ("tiny_bert", "classifier")])
def test_classification_ships_head_and_labels(request, tmp_path, classification_file, base_fixture, head):
    base = request.getfixturevalue(base_fixture)
    config = _config(tmp_path, classification_file, base, task="classify", max_steps=24, eval_steps=12, validation_fraction=0.25)
    report = write_outputs(run_training(config))
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "classify" and manifest["labels"] == ["animal", "colour", "sound"]
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and head in adapter_config["modules_to_save"]
    assert any(f"{head}." in key for key in _tensor_names(out / "adapter_model.safetensors"))
    metrics = report["metrics"]
    assert len(metrics["confusion_matrix"]) == 3 and sum(map(sum, metrics["confusion_matrix"])) == metrics["examples"]
    assert metrics["accuracy"] > report["base_metrics"]["accuracy"] or metrics["accuracy"] == 1.0
    assert "Confusion matrix" in (out / "report.md").read_text()


def test_seeds_report_mean_and_std(tmp_path, tiny_bert, classification_file):
    config = _config(tmp_path, classification_file, tiny_bert, task="classify", max_steps=6, seeds=[0, 1], evaluate_base=False)
    report = write_outputs(run_training(config))
    assert [s["seed"] for s in report["seeds"]] == [0, 1]
    assert set(report["summary"]["accuracy"]) == {"mean", "std"}
    assert report["base_metrics"] is None
    for seed in (0, 1):
        assert (tmp_path / "out" / "seeds" / f"seed-{seed}" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "manifest.json").is_file()


@pytest.mark.parametrize("method", ["rslora", "dora", "ia3", "prompt-tuning"])
def test_other_adapter_methods_train_and_say_they_are_not_batched(tmp_path, tiny_llama, generation_file, method):
    config = _config(tmp_path, generation_file, tiny_llama, method=method, max_steps=2, evaluate_base=False, num_virtual_tokens=4)
    report = write_outputs(run_training(config))
    assert report["serving"]["level"] == ("batched" if method == "rslora" else "not-served")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["peft_type"] == {"rslora": "LORA", "dora": "LORA", "ia3": "IA3", "prompt-tuning": "PROMPT_TUNING"}[method]


def test_last_n_layers_saves_only_the_unfrozen_layers(tmp_path, tiny_llama, generation_file):
    config = _config(tmp_path, generation_file, tiny_llama, method="last-n-layers", last_n_layers=1, max_steps=2, evaluate_base=False)
    report = write_outputs(run_training(config))
    out = tmp_path / "out"
    assert report["serving"]["level"] == "not-served"
    assert not (out / "manifest.json").exists()  # not an adapter: nothing to push
    names = _tensor_names(out / PARTIAL_WEIGHTS_FILE)
    assert names and all(".layers.1." in name for name in names)


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_llama, generation_file, monkeypatch):
    import transformers

    first = _config(tmp_path, generation_file, tiny_llama, max_steps=4, evaluate_base=False)
    run_training(first)
    checkpoints = tmp_path / "out" / "checkpoints" / "seed-0"
    assert (checkpoints / "checkpoint-4").is_dir()

    resumed_from = []
    original_train = transformers.Trainer.train

    def spy(self, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        return original_train(self, resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", spy)
    outcome = run_training(_config(tmp_path, generation_file, tiny_llama, max_steps=8, evaluate_base=False, resume=True))
    assert resumed_from == [str(checkpoints / "checkpoint-4")]
    steps = [entry["step"] for entry in outcome.runs[0].log_history if "loss" in entry]
    # The history restored from the checkpoint (steps <= 4) continues with the new steps.
    assert min(steps) <= 4 and max(steps) == 8
    assert (checkpoints / "checkpoint-8").is_dir()


def test_qlora_trains_lora_on_an_nf4_base(tmp_path, tiny_llama, generation_file):
    # bitsandbytes' pure-torch CPU kernels: slow on a real model, fine on this one.
    config = _config(tmp_path, generation_file, tiny_llama, quantize="nf4", max_steps=2, evaluate_base=False)
    report = write_outputs(run_training(config))
    assert report["serving"]["level"] == "batched"
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert report["training_config"]["quantize"] == "nf4"
