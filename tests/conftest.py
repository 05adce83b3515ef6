"""Shared fixtures: tiny randomly initialised models built offline, PEFT adapters made
with plain PEFT, and a real uvicorn server on loopback running create_app.

Everything is built in tmp dirs; nothing reaches a model hub.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from bench.run import free_port  # one helper for tests and bench: a free loopback port

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "adapters change what a small model says",
    "paris is the capital of france and berlin of germany",
    "i love this product it is great",
    "this is terrible and i hate it",
    "one two three four five six seven eight nine ten",
    "select name from users where id = 1",
]


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def metric(client: httpx.Client, sample: str, **labels: str) -> float:
    """The value of one sample of this server's /metrics (0 when no series matches yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def build_tiny_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    return build_tiny_decoder(directory, LlamaConfig, LlamaForCausalLM)


def build_tiny_decoder(directory: Path, config_class, model_class, **config_options) -> Path:
    """A 2-layer random decoder of `model_class` (GQA: 4 heads over 2 KV heads) with the tiny tokenizer."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer(directory)
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False, **config_options,
    )
    model = model_class(config)
    # Random init at 0.02 std gives near-uniform logits; larger weights give varied greedy text.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


def build_tiny_bert(directory: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    tokenizer = build_tokenizer(directory)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(directory)
    return directory


def make_lora(base_dir: Path, out_dir: Path, *, task: str = "CAUSAL_LM", r: int = 4, targets=("q_proj", "v_proj"),
              seed: int = 0, num_labels: int = 3, use_rslora: bool = False, alpha: int | None = None,
              labels: list[str] | None = None, weight_scale: float = 1.0, **lora_options) -> Path:
    """A PEFT adapter with random (non-zero) A and B, saved with plain PEFT.

    `lora_options` go to LoraConfig as they are (rank_pattern, alpha_pattern, lora_bias, ...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    if task == "CAUSAL_LM":
        model = AutoModelForCausalLM.from_pretrained(base_dir)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
        if labels:
            model.config.id2label = dict(enumerate(labels))
            model.config.label2id = {v: k for k, v in enumerate(labels)}
    config = LoraConfig(
        r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets) if not isinstance(targets, str) else targets,
        init_lora_weights=False, task_type=task, use_rslora=use_rslora, **lora_options,
    )
    return save_peft_adapter(get_peft_model(model, config), out_dir, weight_scale, labels)


def save_peft_adapter(peft_model, out_dir: Path, weight_scale: float = 1.0, labels: list[str] | None = None) -> Path:
    """Saves a PEFT model's adapter as PEFT does, its LoRA weights scaled by `weight_scale` first
    (small weights keep a random adapter from drowning the base), with `labels` as config.json."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(weight_scale)
    peft_model.save_pretrained(out_dir)
    if labels:
        (out_dir / "config.json").write_text(json.dumps({"id2label": dict(enumerate(labels))}))
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def llama_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """A store with two generation adapters (different ranks, one rsLoRA) and a classifier."""
    store = tmp_path_factory.mktemp("llama-adapters")
    return {
        "gen-a": make_lora(tiny_llama, store / "gen-a", r=4, seed=1, weight_scale=3.0),
        "gen-b": make_lora(tiny_llama, store / "gen-b", r=8, seed=2, use_rslora=True,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                           weight_scale=3.0),
        "sentiment": make_lora(tiny_llama, store / "sentiment", task="SEQ_CLS", r=4, seed=3,
                               labels=["negative", "neutral", "positive"]),
    }


@dataclass
class RunningServer:
    url: str
    app: object
    server: object
    thread: threading.Thread

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    @property
    def services(self):
        return self.app.state.services


def start_server(settings, timeout: float = 120.0, **app_kwargs) -> RunningServer:
    """create_app + uvicorn on a free loopback port in a thread; returns once /readyz is 200."""
    import uvicorn

    from server.app import create_app

    settings = settings.model_copy(update={"port": settings.port or free_port()})
    app = create_app(settings, **app_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url + "/readyz", timeout=2)
            if response.status_code == 200:
                return RunningServer(url, app, server, thread)
            if response.json().get("status") == "failed":
                raise RuntimeError(response.text)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError("server did not become ready")


def stop_server(running: RunningServer) -> None:
    running.server.should_exit = True
    running.thread.join(timeout=30)


def tiny_settings(base: Path, adapters_dir: Path, tmp: Path, **overrides):
    from server.config import Settings

    values = dict(base_model=str(base), adapters_dir=adapters_dir, cache_dir=tmp / "cache",
                  install_example_adapters=False, port=0, max_batch_size=8, max_new_tokens_limit=64)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def llama_server(tiny_llama, llama_adapters, tmp_path_factory):
    """A server on the tiny Llama with the adapters above plus one invalid folder."""
    store = next(iter(llama_adapters.values())).parent
    bad = store / "broken"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "r": 0, "auto_map": {"x": "y"}}))
    (bad / "adapter_model.bin").write_bytes(b"not really a pickle")
    running = start_server(tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("srv")))
    yield running
    stop_server(running)


ADMIN_TOKEN = "admin-secret"


@pytest.fixture(scope="session")
def routed_replicas(tiny_llama, llama_adapters, tmp_path_factory):
    """Two servers sharing one store (routes + merges tests): A starts with a routes file, B without.

    Sources beyond llama_adapters: gen-c (r=4, the one that gets a new version in the merge
    cache test), sentiment2 (same labels as sentiment) and topic (other labels) for classify."""
    import shutil

    store = tmp_path_factory.mktemp("replica-store")
    for name in ("gen-a", "gen-b", "sentiment"):
        shutil.copytree(llama_adapters[name], store / name)
    make_lora(tiny_llama, store / "gen-c", r=4, seed=9, weight_scale=3.0, targets=("q_proj", "o_proj"))
    make_lora(tiny_llama, store / "sentiment2", task="SEQ_CLS", r=2, seed=4, labels=["negative", "neutral", "positive"])
    make_lora(tiny_llama, store / "topic", task="SEQ_CLS", r=4, seed=5, num_labels=2, labels=["sport", "tech"])
    routes = tmp_path_factory.mktemp("routes") / "routes.yaml"
    routes.write_text("chat:\n  targets:\n    - {adapter: gen-a, weight: 90}\n    - {adapter: gen-b, weight: 10}\n"
                      "mood: {adapter: sentiment}\n")
    common = dict(admin_token=ADMIN_TOKEN, store_poll_interval_s=0.2, max_merge_rank=16)
    first = start_server(tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("a"), routes_file=routes, **common))
    second = start_server(tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("b"), **common))
    yield first, second
    stop_server(second)
    stop_server(first)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's standalone S3 server in its own process (tests/objectstore.py); each user makes its own bucket."""
    from tests.objectstore import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()
