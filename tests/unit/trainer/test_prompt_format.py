"""The request shape an adapter answers: decided from the rows, recorded in the manifest, and
tokenized at train time exactly as the server tokenizes the same request."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest

from adapters.manifest import AdapterManifest, PromptFormat
from trainer.config import TrainConfig
from trainer.data import DataError, GenerationExample, load_examples
from trainer.features import encode_generation, prompt_ids
from trainer.prompt_format import in_format, resolve_prompt_format
from trainer.report import HELD_OUT_FILE, write_outputs
from trainer.training import run_training
from tests.unit.trainer.conftest import write_jsonl

SEED_ROW = GenerationExample("what sound does a cat make", "meow", shape="input/target")
RAW_ROW = GenerationExample("what sound does a dog make", " woof", shape="prompt/completion")
SYSTEM_CHAT = GenerationExample((("system", "label me"), ("user", "what sound does a bird make")), "tweet", shape="messages")
PLAIN_CHAT = GenerationExample((("user", "what sound does a fish make"),), "blub", shape="messages")


def test_input_target_and_prompt_completion_rows_are_raw_and_messages_rows_chat():
    assert resolve_prompt_format([SEED_ROW], [SEED_ROW], "auto", True)[0] == PromptFormat("raw", "input/target")
    assert resolve_prompt_format([RAW_ROW], [RAW_ROW], "auto", True)[0] == PromptFormat("raw", "prompt/completion")
    chat, train, _ = resolve_prompt_format([SYSTEM_CHAT, SYSTEM_CHAT], [SYSTEM_CHAT], "auto", True)
    assert chat == PromptFormat("chat", "messages", roles=("system", "user"), system_prompt="label me")
    assert train == [SYSTEM_CHAT, SYSTEM_CHAT]
    # Rows that disagree on the system message: none is recorded, but "system" is a trained role.
    varied = resolve_prompt_format([SYSTEM_CHAT], [PLAIN_CHAT], "auto", True)[0]
    assert varied.roles == ("system", "user") and varied.system_prompt is None
    assert resolve_prompt_format([PLAIN_CHAT], [PLAIN_CHAT], "auto", True)[0].roles == ("user",)


def test_chat_choice_wraps_raw_rows_as_one_user_turn():
    chat, train, held_out = resolve_prompt_format([SEED_ROW], [RAW_ROW], "chat", True)
    assert chat == PromptFormat("chat", "input/target", roles=("user",), system_prompt=None)
    assert train[0].prompt == (("user", SEED_ROW.prompt),) and train[0].shape == "input/target"
    assert held_out[0].prompt == (("user", RAW_ROW.prompt),)
    # Evaluation asks each row in the recorded format, and leaves rows alone without one.
    assert in_format([SEED_ROW], chat) == [train[0]]
    assert in_format([SEED_ROW], None) == [SEED_ROW] == in_format([SEED_ROW], PromptFormat("raw"))


@pytest.mark.parametrize("train, choice, has_template, reason", [
    ([SEED_ROW, PLAIN_CHAT], "auto", True, "in one data set"),
    ([PLAIN_CHAT], "raw", True, "cannot apply to 'messages' rows"),
    ([PLAIN_CHAT], "auto", False, "no chat template"),
    ([SEED_ROW], "chat", False, "no chat template"),
])
def test_formats_the_server_could_not_answer_are_refused(train, choice, has_template, reason):
    with pytest.raises(DataError, match=reason):
        resolve_prompt_format(train, train[:1], choice, has_template)


def test_manifest_round_trips_the_format_and_older_manifests_load_without_one():
    chat = PromptFormat("chat", "messages", roles=("system", "user"), system_prompt="label me")
    manifest = AdapterManifest(name="a", version="0" * 12, sha256="0" * 64, task="generate", peft_type="LORA", rank=4,
                               target_modules=("q_proj",), size_bytes=1, prompt_format=chat)
    assert AdapterManifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    older = manifest.to_dict()
    del older["prompt_format"]
    assert AdapterManifest.from_dict(older).prompt_format is None
    with pytest.raises(ValueError, match="kind"):
        AdapterManifest.from_dict({**manifest.to_dict(), "prompt_format": {"kind": "jinja"}})


@pytest.fixture(scope="module")
def bos_llama(tiny_llama, tmp_path_factory):
    """The tiny base with a tokenizer that adds a BOS to plain text, as Llama/Mistral tokenizers do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("bos-llama")
    for path in tiny_llama.iterdir():
        shutil.copy(path, directory / path.name)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.convert_tokens_to_ids("<s>"))])
    tokenizer.save_pretrained(directory)
    return directory


def test_training_gives_the_model_the_ids_the_server_gives_the_same_request(bos_llama, tmp_path):
    from adapters.bases import resolve_base
    from server.engine.base import load_base
    from server.engine.engine import TorchEngine
    from trainer.models import load_tokenizer

    tokenizer = load_tokenizer(resolve_base(str(bos_llama)))
    engine = TorchEngine(load_base(str(bos_llama), tmp_path, "cpu", "float32", "none"), 2, 64, 1)
    wrapped = in_format([SEED_ROW], PromptFormat("chat", "input/target", roles=("user",)))[0]
    for example in (SEED_ROW, RAW_ROW, SYSTEM_CHAT, PLAIN_CHAT, wrapped):
        messages = [{"role": r, "content": c} for r, c in example.prompt] if example.is_chat else None
        served = engine.tokenize(None if messages else example.prompt, messages)
        assert prompt_ids(example, tokenizer) == served, example
        row = encode_generation(example, tokenizer, max_length=64)
        # The answer follows the served prompt directly and ends where the server stops.
        assert row["input_ids"][: len(served)] == served
        assert row["input_ids"][-1] in engine.eos_ids and row["labels"][: len(served)] == [-100] * len(served)
    assert engine.tokenize(SEED_ROW.prompt, None)[0] == tokenizer.bos_token_id  # the case this guards


def test_report_shows_the_request_and_writes_the_split_held_out_rows(tmp_path, tiny_llama):
    rows = [{"messages": [{"role": "system", "content": "label me"}, {"role": "user", "content": f"what sound does a {a} make"},
                          {"role": "assistant", "content": s}]} for a, s in (("cat", "meow"), ("dog", "woof"))] * 4
    config = TrainConfig(train_file=str(write_jsonl(tmp_path / "chat.jsonl", rows)), output_dir=str(tmp_path / "out"),
                         base=str(tiny_llama), max_steps=1, eval_steps=1, max_new_tokens=2, max_length=32,
                         num_threads=1, evaluate_base=False, validation_fraction=0.25)
    report = write_outputs(run_training(config))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["prompt_format"] == {"kind": "chat", "source": "messages", "roles": ["system", "user"],
                                         "system_prompt": "label me"}
    request = report["request"]
    held_out = load_examples(tmp_path / "out" / HELD_OUT_FILE, "generate")
    assert len(held_out) == report["data"]["held_out_examples"] == 2
    first = held_out[0]
    expected_messages = [{"role": r, "content": c} for r, c in first.prompt]
    assert request["native"] == {"path": "/v1/generate", "body": {
        "adapter": "out", "messages": expected_messages, "max_new_tokens": 2, "temperature": 0}}
    assert request["openai"]["path"] == "/v1/chat/completions" and request["openai"]["body"]["model"] == "out"
    # The curl command is the native body, quoted so a shell hands it over unchanged.
    words = shlex.split(request["curl"])
    assert words[2] == "http://127.0.0.1:8000/v1/generate" and json.loads(words[-1]) == request["native"]["body"]
    assert "client.chat.completions.create(" in request["openai_python"]
    assert request["eval_command"].endswith(f"--adapter out {tmp_path / 'out' / HELD_OUT_FILE} --max-new-tokens 2")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "Request shape: **`messages`**" in markdown and "system message `label me`" in markdown
    assert request["curl"] in markdown and request["eval_command"] in markdown
