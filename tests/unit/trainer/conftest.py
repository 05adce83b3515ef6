"""Tiny randomly initialised models and a word-level tokenizer built here: no hub, seconds to train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

COLORS = ["red", "green", "blue", "yellow"]
ANIMALS = ["cat", "dog", "bird", "fish"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant> {% endif %}"
)


def _vocabulary() -> list[str]:
    words = ["what", "sound", "does", "a", "make", "the", "is", "label", "me", "tell", "colour", "of", "about", "animal"]
    words += ["meow", "woof", "tweet", "blub"] + COLORS + ANIMALS
    return ["<pad>", "</s>", "<unk>", "<s>", "<user>", "<assistant>", "<system>", "[CLS]", "[SEP]"] + sorted(set(words))


def _build_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", bos_token="<s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    _build_tokenizer(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(_vocabulary()),
        # 64, not 32: bitsandbytes' nf4 kernels need more than one 64-value block per row.
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    _build_tokenizer(directory)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(_vocabulary()),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def generation_file(tmp_path) -> Path:
    sounds = dict(zip(ANIMALS, ["meow", "woof", "tweet", "blub"]))
    rows = [{"input": f"what sound does a {a} make", "target": s} for a, s in sounds.items()] * 6
    return write_jsonl(tmp_path / "sounds.jsonl", rows)


@pytest.fixture
def classification_file(tmp_path) -> Path:
    rows = [{"text": f"tell me about the {c}", "label": "colour"} for c in COLORS]
    rows += [{"text": f"tell me about the {a}", "label": "animal"} for a in ANIMALS]
    rows += [{"text": f"what sound does a {a} make", "label": "sound"} for a in ANIMALS]
    return write_jsonl(tmp_path / "topics.jsonl", rows * 3)
