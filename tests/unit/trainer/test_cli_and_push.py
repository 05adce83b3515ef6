from __future__ import annotations

import json

import httpx
import pytest

from trainer.cli import _training_config, build_parser, main
from trainer.config import TrainConfig
from trainer.push import PushError, push_adapter


def _parse(argv):
    return _training_config(build_parser().parse_args(argv))


def test_flags_override_the_config_file_and_unset_flags_do_not(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train_file: a.jsonl\noutput_dir: out\nrank: 4\nlearning_rate: 0.1\ntarget_modules: q_proj,v_proj\n")
    config = _parse(["train", "--config", str(config_file), "--rank", "16", "--seeds", "3"])
    assert config.rank == 16 and config.learning_rate == 0.1 and config.seeds == [0, 1, 2]
    assert config.target_modules == ["q_proj", "v_proj"] and config.method == "lora"


def test_config_errors_are_reported_without_a_traceback(tmp_path, capsys):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train_file: a.jsonl\noutput_dir: out\nrnak: 4\n")
    assert main(["train", "--config", str(config_file)]) == 2
    assert "unknown training option(s): rnak" in capsys.readouterr().err
    assert main(["train", "data.jsonl"]) == 2
    assert "missing required option(s): output_dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="validation_fraction"):
        TrainConfig(train_file="a", output_dir="b", validation_fraction=1.5)


def test_bad_data_exits_with_file_and_line(tmp_path, tiny_llama, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"input": "x", "target": "y"}\n{"input": "x"}\n')
    assert main(["train", str(data), "-o", str(tmp_path / "out"), "--base", str(tiny_llama)]) == 2
    assert f"{data}:2: 'target' must be a string" in capsys.readouterr().err


def _adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_push_sends_the_contracted_multipart_request(tmp_path, monkeypatch):
    folder = _adapter_folder(tmp_path)
    (folder / "manifest.json").write_text(json.dumps({
        "name": "dates", "version": "x", "sha256": "x", "task": "generate", "peft_type": "LORA",
        "rank": 8, "target_modules": [], "size_bytes": 1,
    }))
    sent = {}

    def handler(request: httpx.Request) -> httpx.Response:
        sent["url"], sent["auth"] = str(request.url), request.headers["authorization"]
        sent["body"] = request.read()
        return httpx.Response(201, json={"name": "dates", "version": "abc123def456"})

    transport = httpx.MockTransport(handler)
    monkeypatch.setattr(httpx, "post", lambda *a, **kw: httpx.Client(transport=transport).post(*a, **kw))
    monkeypatch.setenv("ADAPTSERVE_ADMIN_TOKEN", "s3cret")
    answer = push_adapter(folder, "http://server:8000/", token=None)
    assert answer["version"] == "abc123def456"
    assert sent["url"] == "http://server:8000/v1/adapters" and sent["auth"] == "Bearer s3cret"
    body = sent["body"]
    for part in (b'name="name"\r\n\r\ndates', b'name="adapter_config.json"; filename="adapter_config.json"',
                 b'name="adapter_model.safetensors"; filename="adapter_model.safetensors"', b'name="manifest.json"'):
        assert part in body


def test_push_reports_refusals_and_missing_pieces(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ADAPTSERVE_ADMIN_TOKEN", raising=False)
    with pytest.raises(PushError, match="missing adapter_config.json"):
        push_adapter(tmp_path, "http://s", token="t")
    folder = _adapter_folder(tmp_path)
    with pytest.raises(PushError, match="admin token"):
        push_adapter(folder, "http://s", token=None)
    refusal = httpx.Response(422, json={"error": {"message": "rank 512 exceeds the cap 64"}})
    monkeypatch.setattr(httpx, "post", lambda *a, **kw: refusal)
    assert main(["push", str(folder), "--server", "http://s", "--token", "t"]) == 1
    assert "server refused the adapter (422): rank 512 exceeds the cap 64" in capsys.readouterr().err
