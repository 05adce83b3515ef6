"""adapters.bases: built-in names, canonical ids, the one-time conversion (faked: no 40 s GGUF load)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from adapters import bases


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert bases.default_cache_dir() == tmp_path / "adaptserve" / "bases"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert bases.default_cache_dir() == Path.home() / ".cache" / "adaptserve" / "bases"


def test_builtin_names_and_their_hub_ids_resolve_alike(tmp_path):
    encoder = bases.resolve_base("minilm-l6", tmp_path)
    assert encoder.builtin == "minilm-l6" and encoder.canonical_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert (encoder.path / "config.json").is_file()
    assert bases.resolve_base("sentence-transformers/all-MiniLM-L6-v2", tmp_path) == encoder
    # The packaged folder, given as a path, is still recognised as the built-in.
    assert bases.resolve_base(str(encoder.path), tmp_path) == encoder


def test_local_folders_hub_ids_and_missing_paths(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    local = bases.resolve_base(folder, tmp_path)
    assert local.path == folder.resolve() and local.canonical_id == str(folder.resolve()) and local.builtin is None
    assert bases.resolve_base("org/some-model", tmp_path).canonical_id == "org/some-model"
    with pytest.raises(bases.BaseModelUnavailable, match="does not exist"):
        bases.resolve_base("./not-here", tmp_path)


def test_smollm2_is_converted_once_even_when_asked_concurrently(tmp_path, monkeypatch):
    conversions = []

    def fake_convert(gguf_path, target):
        conversions.append(gguf_path)
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(bases, "_convert_gguf", fake_convert)
    monkeypatch.setattr(bases, "_package_dir", lambda package: tmp_path / package)
    results = []
    threads = [threading.Thread(target=lambda: results.append(bases.resolve_base("smollm2-135m-instruct", tmp_path))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1
    assert {r.path for r in results} == {tmp_path / "smollm2-135m-instruct"}
    assert {r.canonical_id for r in results} == {"HuggingFaceTB/SmolLM2-135M-Instruct"}


def test_quantization_config_is_dropped(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    bases._drop_quantization_config(config)
    assert json.loads(config.read_text()) == {"model_type": "llama"}
