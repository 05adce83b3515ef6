"""Validating LoRA for vision bases: conv shapes [r, in, kh, kw] / [out, r, 1, 1], ResNet's head
inside a Sequential, grouped convolutions refused; text signatures fingerprint as before."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.package import AdapterInvalid
from adapters.signature import BaseSignature
from adapters.validate import load_adapter_dir
from server.engine.vision import load_vision_base
from tests.unit.vision.conftest import make_vision_lora


@pytest.fixture(scope="module")
def signatures(vision_bases, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {arch: load_vision_base(str(base), cache).signature for arch, base in vision_bases.items()}


def test_conv_lora_is_flattened_and_heads_found_in_containers(signatures, vision_adapters):
    package = load_adapter_dir(vision_adapters["resnet"]["five"], "five", signatures["resnet"])
    stem = package.modules["embedder.embedder.convolution"]  # 7x7, stride 2, 3 -> 8 channels
    assert stem.a.shape == (8, 3 * 7 * 7) and stem.b.shape == (8, 8)
    assert signatures["resnet"].head_linear == "1" and package.head.weight.shape == (5, 16)
    assert package.manifest.task == "classify" and package.manifest.labels == ("a", "b", "c", "d", "e")


def edited(source, target, change):
    shutil.copytree(source, target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    change(tensors)
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def test_wrong_conv_shapes_are_each_reported(signatures, vision_adapters, tmp_path):
    def corrupt(tensors):
        a_key = next(k for k in tensors if "first_conv" in k and "lora_A" in k)
        b_key = next(k for k in tensors if "conv_1x1" in k and "lora_B" in k)
        tensors[a_key] = torch.zeros(4, 3, 1, 1)  # the stem conv is 3x3
        tensors[b_key] = tensors[b_key][:, :, 0, 0]  # a linear's [out, r], not a conv's
    folder = edited(vision_adapters["mobilenet_v2"]["two"], tmp_path / "bad", corrupt)
    with pytest.raises(AdapterInvalid) as caught:
        load_adapter_dir(folder, "bad", signatures["mobilenet_v2"])
    text = "\n".join(caught.value.problems)
    assert "conv_stem.first_conv.convolution: lora_A shape (4, 3, 1, 1) does not fit [r, 3, 3, 3]" in text
    assert "conv_1x1.convolution: lora_B shape" in text and "1, 1]" in text


def test_lora_on_a_depthwise_convolution_is_refused_with_the_reason(signatures, vision_bases, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.unit.vision.conftest import base_with_head

    model = base_with_head(vision_bases["mobilenet_v2"], 2)
    groups = model.mobilenet_v2.conv_stem.conv_3x3.convolution.groups
    peft_model = get_peft_model(model, LoraConfig(r=groups, target_modules=["conv_stem.conv_3x3.convolution"],
                                                  modules_to_save=["classifier"]))
    peft_model.save_pretrained(tmp_path / "depthwise")
    with pytest.raises(AdapterInvalid, match=r"grouped convolution \(groups="):
        load_adapter_dir(tmp_path / "depthwise", "depthwise", signatures["mobilenet_v2"])


def test_an_adapter_for_another_architecture_is_refused(signatures, vision_adapters):
    with pytest.raises(AdapterInvalid, match="does not exist in the base|not a linear or convolution module"):
        load_adapter_dir(vision_adapters["vit"]["two"], "two", signatures["resnet"])


def test_text_signatures_fingerprint_exactly_as_before():
    signature = BaseSignature("x", "decoder", "model", 64, {"layers.0.q_proj": (64, 64)}, "score", False)
    before = hashlib.sha256(json.dumps(["decoder", 64, [["layers.0.q_proj", [64, 64]]]]).encode()).hexdigest()[:16]
    assert signature.fingerprint == before


def test_a_merged_vision_adapter_round_trips_through_a_peft_folder(signatures, vision_adapters, vision_bases, tmp_path):
    from adapters.merge import MergeSource, MergeSpec, merge_adapters, write_peft_dir

    signature = signatures["resnet"]
    two = load_adapter_dir(vision_adapters["resnet"]["two"], "two", signature)
    other = make_vision_lora(vision_bases["resnet"], tmp_path / "other", "resnet", num_labels=2, seed=9)
    merged = merge_adapters("mix", [MergeSource(two, 0.5), MergeSource(load_adapter_dir(other, "o", signature), 0.5)],
                            MergeSpec("cat"))
    write_peft_dir(merged.package, tmp_path / "mix", signature)
    again = load_adapter_dir(tmp_path / "mix", "mix", signature)
    for name, module in merged.package.modules.items():
        assert torch.allclose(again.modules[name].b @ again.modules[name].a * again.modules[name].scale,
                              module.b @ module.a * module.scale, atol=1e-6)
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["task_type"] is None
