"""adapters.validate: every problem is found and reported at once; good adapters load exactly."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.package import AdapterInvalid
from adapters.signature import BaseSignature
from adapters.validate import AdapterLimits, load_adapter_dir
from tests.conftest import make_lora

SHAPES = {f"layers.{i}.self_attn.{m}": (64, 64 if m in ("q_proj", "o_proj") else 32)
          for i in range(2) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
SHAPES.update({f"layers.{i}.mlp.{m}": ((128, 64) if m == "down_proj" else (64, 128))
               for i in range(2) for m in ("gate_proj", "up_proj", "down_proj")})


@pytest.fixture(scope="module")
def signature() -> BaseSignature:
    return BaseSignature("tiny", "decoder", "model", 64, SHAPES, "score", False)


@pytest.fixture()
def adapter(tiny_llama, tmp_path):
    return make_lora(tiny_llama, tmp_path / "good", r=4, seed=5)


def problems(directory, signature, name="good", **limits) -> list[str]:
    with pytest.raises(AdapterInvalid) as info:
        load_adapter_dir(directory, name, signature, AdapterLimits(**limits))
    return info.value.problems


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_good_adapter_loads_with_manifest(adapter, signature):
    package = load_adapter_dir(adapter, "good", signature)
    manifest = package.manifest
    assert manifest.task == "generate" and manifest.rank == 4 and manifest.peft_type == "LORA"
    assert manifest.version == manifest.sha256[:12]
    assert set(package.modules) == {f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")}
    assert package.modules["layers.0.self_attn.q_proj"].scale == pytest.approx(8 / 4)


def test_rslora_scale(tiny_llama, tmp_path, signature):
    package = load_adapter_dir(make_lora(tiny_llama, tmp_path / "rs", r=4, use_rslora=True), "rs", signature)
    assert package.modules["layers.1.self_attn.v_proj"].scale == pytest.approx(8 / math.sqrt(4))


def test_all_problems_reported_together(adapter, signature):
    edit_config(adapter, r=0, auto_map={"AutoModel": "evil.Model"}, use_dora=True, trust_remote_code=True)
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    found = " | ".join(problems(adapter, signature, name="../etc"))
    for expected in ("name '../etc'", "r=0", "auto_map", "trust_remote_code", "DoRA", "pickle"):
        assert expected in found


def test_pickle_file_is_never_opened(adapter, signature, monkeypatch):
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    found = problems(adapter, signature)
    assert any("pickle" in p for p in found) and any("missing" in p for p in found)


@pytest.mark.parametrize("bad_name", ["../x", "/etc", "a\x00b", "evil\u202etxt", "x" * 200, "Upper", "", ".hidden"])
def test_bad_names(adapter, signature, bad_name):
    assert any("name" in p for p in problems(adapter, signature, name=bad_name))


@pytest.mark.parametrize("rank", [0, -1, 65, "8"])
def test_bad_ranks(adapter, signature, rank):
    edit_config(adapter, r=rank)
    assert any("r" in p for p in problems(adapter, signature))


def test_rank_over_the_server_cap(adapter, signature):
    assert any("0 < r <= 2" in p for p in problems(adapter, signature, max_rank=2))


def test_nan_and_wrong_shape_name_the_module(adapter, signature):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    a_key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_A" in k)
    b_key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[a_key][0, 0] = float("nan")
    tensors[b_key] = torch.zeros(99, 4)
    save_file(tensors, path)
    found = " | ".join(problems(adapter, signature))
    assert "NaN or Inf" in found and a_key in found
    assert "layers.1.self_attn.v_proj: lora_B shape (99, 4)" in found


def test_target_module_absent_and_foreign_keys(adapter, signature):
    edit_config(adapter, target_modules=["q_proj", "c_attn"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, path)
    found = " | ".join(problems(adapter, signature))
    assert "target module 'c_attn' does not exist" in found
    assert "transformer.h.0.attn.c_attn: not a linear module" in found


def test_unsupported_peft_types(adapter, signature):
    for peft_type, reason in (("IA3", "IA3"), ("PROMPT_TUNING", "prompt tuning"), ("LOHA", "LOHA")):
        edit_config(adapter, peft_type=peft_type)
        assert any(reason in p for p in problems(adapter, signature))


def test_unknown_config_key_and_bad_dtype(adapter, signature):
    edit_config(adapter, exec_this="rm -rf /")
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, path)
    found = " | ".join(problems(adapter, signature))
    assert "exec_this" in found and "dtype torch.int32" in found


def test_corrupt_safetensors(adapter, signature):
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    assert any("not a readable safetensors" in p for p in problems(adapter, signature))


def test_declared_base_differs_is_a_warning(adapter, signature, tmp_path):
    edit_config(adapter, base_model_name_or_path="someone/else")
    package = load_adapter_dir(adapter, "good", signature)
    assert any("someone/else" in w for w in package.warnings)


def test_version_follows_content(adapter, signature, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(adapter, copy)
    first = load_adapter_dir(adapter, "good", signature).manifest.version
    assert load_adapter_dir(copy, "good", signature).manifest.version == first
    edit_config(copy, lora_alpha=99)
    assert load_adapter_dir(copy, "good", signature).manifest.version != first


# --- refusals of what the engine does not compute, each with its reason ----------------------


def test_lora_bias_from_plain_peft_is_refused_with_its_reason(tiny_llama, tmp_path, signature):
    adapter = make_lora(tiny_llama, tmp_path / "lora-bias", r=4, seed=6, lora_bias=True)
    found = problems(adapter, signature)
    assert "LoRA with a bias on lora_B is not served" in found
    bias_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    assert f"{bias_key}: maps to no module this engine can serve" in found


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_base_bias_training_is_refused_with_its_reason(tiny_llama, tmp_path, signature, bias):
    adapter = make_lora(tiny_llama, tmp_path / f"bias-{bias}", r=4, seed=6, bias=bias)
    assert problems(adapter, signature) == [f"bias={bias!r} is not served (only 'none')"]


def test_fan_in_fan_out_is_refused_with_its_reason(adapter, signature):
    edit_config(adapter, fan_in_fan_out=True)
    assert problems(adapter, signature) == ["fan_in_fan_out (Conv1D bases such as GPT-2) is not served"]


def test_a_gpt2_conv1d_adapter_from_plain_peft_names_fan_in_fan_out(tmp_path, signature):
    """PEFT sets fan_in_fan_out only on Conv1D bases: a real GPT-2 LoRA, not an edited config."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    peft_model = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True,
                                                 task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "gpt2-lora")
    assert json.loads((tmp_path / "gpt2-lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert "fan_in_fan_out (Conv1D bases such as GPT-2) is not served" in problems(tmp_path / "gpt2-lora", signature)


def test_plain_peft_adapter_without_task_type_loads(tiny_llama, tmp_path, signature):
    """get_peft_model without task_type records `auto_mapping` (the base class PEFT's Auto
    classes would build): PEFT's own field, never read here, so not a reason to refuse."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "no-task")
    config = json.loads((tmp_path / "no-task" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    package = load_adapter_dir(tmp_path / "no-task", "no-task", signature)
    assert package.manifest.task == "generate"
    assert package.modules["layers.1.self_attn.q_proj"].scale == pytest.approx(6 / 4)


@pytest.mark.parametrize("auto_mapping", [
    {"base_model_class": "Evil", "parent_library": "evil_package.models"},
    {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers", "extra": "x"},
    "transformers.LlamaForCausalLM",
])
def test_auto_mapping_naming_anything_but_a_transformers_class_is_refused(adapter, signature, auto_mapping):
    edit_config(adapter, auto_mapping=auto_mapping)
    assert any("auto_mapping" in p for p in problems(adapter, signature))


def test_targets_named_by_full_module_path_load(tiny_llama, tmp_path, signature):
    # What PEFT saves for target_modules="all-linear" (adaptserve train's default): full paths.
    full = make_lora(tiny_llama, tmp_path / "full", r=4, targets=("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"))
    package = load_adapter_dir(full, "full", signature, AdapterLimits())
    assert set(package.modules) == {"layers.0.self_attn.q_proj", "layers.1.mlp.up_proj"}
    edit_config(full, target_modules=["model.layers.0.self_attn.nope"])
    assert any("'model.layers.0.self_attn.nope' does not exist" in p for p in problems(full, signature, name="full"))
