"""The native API's contract: shapes, streaming, error codes, caps, probes and metrics."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_lora, start_server, stop_server, tiny_settings


def error_code(response) -> str:
    return response.json()["error"]["code"]


def test_generate_response_shape(llama_server):
    with llama_server.client() as client:
        body = client.post("/v1/generate", json={"prompt": "the quick", "max_new_tokens": 5}).json()
    assert set(body) == {"text", "finish_reason", "usage", "adapter", "task", "fallback", "warnings"}
    assert body["warnings"] == []  # the base has no recorded prompt format
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["prompt_tokens"] > 0 and 0 < body["usage"]["completion_tokens"] <= 5
    assert body["adapter"] is None


def test_stream_concatenates_to_the_non_streamed_text(llama_server):
    request = {"prompt": "paris is the", "max_new_tokens": 10, "adapter": "gen-a"}
    with llama_server.client() as client:
        whole = client.post("/v1/generate", json=request).json()
        with client.stream("POST", "/v1/generate", json={**request, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert chunks[-1]["adapter"]["name"] == "gen-a"


def test_chat_messages_use_the_template(llama_server):
    with llama_server.client() as client:
        response = client.post("/v1/generate", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_new_tokens": 3})
    assert response.status_code == 200
    # <|user|>hi</s><|assistant|> is more than the two words of the raw text
    assert response.json()["usage"]["prompt_tokens"] >= 4


def test_stop_string_cuts_the_text(llama_server):
    with llama_server.client() as client:
        full = client.post("/v1/generate", json={"prompt": "one two", "max_new_tokens": 12}).json()["text"]
        assert len(full) > 4
        stop = full[2:4]
        cut = client.post("/v1/generate", json={"prompt": "one two", "max_new_tokens": 12, "stop": [stop]}).json()
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible(llama_server):
    request = {"prompt": "the quick", "max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    with llama_server.client() as client:
        first = client.post("/v1/generate", json=request).json()["text"]
        second = client.post("/v1/generate", json=request).json()["text"]
    assert first == second


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prompt": "x", "adapter": "nope"}, 404, "adapter_not_found"),
        ({"prompt": "x", "adapter": "gen-a@000000000000"}, 404, "adapter_version_not_found"),
        ({"prompt": "x", "adapter": "sentiment"}, 400, "adapter_task_mismatch"),
        ({"prompt": "x", "max_new_tokens": 0}, 422, "invalid_parameter"),
        ({"prompt": "x", "max_new_tokens": -3}, 422, "invalid_parameter"),
        ({"prompt": "x", "max_new_tokens": 1.5}, 422, "invalid_parameter"),
        ({"prompt": "x", "max_new_tokens": 10**9}, 422, "limit_exceeded"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 422, "limit_exceeded"),
        ({"prompt": "x", "temperature": -1}, 422, "invalid_parameter"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, "invalid_parameter"),
        ({}, 422, "invalid_parameter"),
        ({"prompt": "x", "surprise": 1}, 422, "invalid_parameter"),
        ({"prompt": "word " * 400}, 422, "limit_exceeded"),
    ],
)
def test_generate_errors(llama_server, body, status, code):
    with llama_server.client() as client:
        response = client.post("/v1/generate", json=body)
    assert response.status_code == status, response.text
    assert error_code(response) == code
    assert response.json()["error"]["message"]


def test_invalid_parameter_names_the_field(llama_server):
    with llama_server.client() as client:
        response = client.post("/v1/generate", json={"prompt": "x", "top_p": 7})
    assert response.json()["error"]["param"] == "body.top_p"


def test_body_cap_and_malformed_json(llama_server):
    with llama_server.client() as client:
        big = client.post("/v1/generate", content=b'{"prompt": "' + b"a" * 3_000_000 + b'"}',
                          headers={"content-type": "application/json"})
        assert big.status_code == 413 and error_code(big) == "payload_too_large"
        bad = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
        assert bad.status_code == 422 and error_code(bad) == "invalid_parameter"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"inputs": "x", "adapter": "gen-a"}, 400, "adapter_task_mismatch"),
        ({"inputs": "x", "adapter": "missing"}, 404, "adapter_not_found"),
        ({"inputs": [], "adapter": "sentiment"}, 422, "limit_exceeded"),
        ({"inputs": ["x"] * 65, "adapter": "sentiment"}, 422, "limit_exceeded"),
        ({"inputs": "x"}, 422, "invalid_parameter"),
    ],
)
def test_classify_errors(llama_server, body, status, code):
    with llama_server.client() as client:
        response = client.post("/v1/classify", json=body)
    assert response.status_code == status, response.text
    assert error_code(response) == code


def test_classify_single_input_and_labels(llama_server):
    with llama_server.client() as client:
        body = client.post("/v1/classify", json={"inputs": "i love it", "adapter": "sentiment"}).json()
    (result,) = body["results"]
    assert set(result["scores"]) == {"negative", "neutral", "positive"}
    assert result["label"] == max(result["scores"], key=result["scores"].get)
    assert sum(result["scores"].values()) == pytest.approx(1.0, abs=1e-5)


def test_invalid_adapter_in_store_is_skipped_with_every_reason(llama_server):
    rejected = llama_server.services.registry.rejected["broken"]
    reasons = " | ".join(rejected.problems)
    for expected in ("pickle", "auto_map", "IA3", "r=0", "adapter_model.safetensors is missing"):
        assert expected in reasons
    with llama_server.client() as client:
        assert client.post("/v1/generate", json={"prompt": "x", "adapter": "broken"}).status_code == 404
        assert client.post("/v1/generate", json={"prompt": "x", "adapter": "gen-a", "max_new_tokens": 2}).status_code == 200


def test_probes(llama_server):
    with llama_server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert client.get("/v1/generate").status_code == 405
        assert error_code(client.get("/nope")) == "not_found"
        assert client.get("/healthz").headers["x-request-id"]


def _samples(text: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_parse_and_count_requests(llama_server):
    with llama_server.client() as client:
        before = _samples(client.get("/metrics").text)
        for _ in range(3):
            client.post("/v1/generate", json={"prompt": "the", "adapter": "gen-a", "max_new_tokens": 2})
        client.post("/v1/generate", json={"prompt": "the", "adapter": "nope"})
        after = _samples(client.get("/metrics").text)

    def count(values, **labels):
        key = ("adaptserve_requests_total", tuple(sorted(labels.items())))
        return values.get(key, 0.0)

    ok = {"endpoint": "/v1/generate", "adapter": "gen-a", "status": "200"}
    assert count(after, **ok) - count(before, **ok) == 3
    missing = {"endpoint": "/v1/generate", "adapter": "__base__", "status": "404"}
    assert count(after, **missing) - count(before, **missing) == 1
    assert after[("adaptserve_adapters_registered", ())] == 3
    assert after[("adaptserve_adapters_rejected", ())] == 1
    assert ("adaptserve_generated_tokens_total", (("adapter", "gen-a"),)) in after
    assert any(name == "adaptserve_time_to_first_token_seconds_count" for name, _ in after)


def test_encoder_base_classifies_and_refuses_generate(tiny_bert, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    import torch

    store = tmp_path / "store"
    make_lora(tiny_bert, store / "topic", task="SEQ_CLS", r=4, targets=("query", "value"), num_labels=4,
              labels=["a", "b", "c", "d"])
    running = start_server(tiny_settings(tiny_bert, store, tmp_path))
    try:
        with running.client() as client:
            refused = client.post("/v1/generate", json={"prompt": "x"})
            assert refused.status_code == 400 and error_code(refused) == "unsupported_for_base"
            body = client.post("/v1/classify", json={"inputs": ["select name", "i love it"], "adapter": "topic"}).json()
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4)
        model = PeftModel.from_pretrained(model, store / "topic").eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
        for text, result in zip(["select name", "i love it"], body["results"]):
            with torch.no_grad():
                probs = model(**tokenizer(text, return_tensors="pt")).logits[0].softmax(-1)
            assert result["label"] == "abcd"[int(probs.argmax())]
            assert result["scores"]["a"] == pytest.approx(float(probs[0]), abs=1e-5)
    finally:
        stop_server(running)


def test_one_json_log_line_with_queue_and_tokens(llama_server, caplog):
    import logging

    from tests.unit.api.test_openai_api import access_line

    caplog.set_level(logging.INFO, logger="adaptserve.access")
    with llama_server.client() as client:
        response = client.post("/v1/generate", json={"prompt": "one two", "adapter": "gen-a", "max_new_tokens": 3},
                               headers={"X-Request-Id": "native-1"})
    assert response.headers["x-request-id"] == "native-1"
    line = access_line(caplog, "native-1")
    usage = response.json()["usage"]
    assert line["adapter"].startswith("gen-a@") and line["status"] == 200
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert 0 <= line["queue_ms"] <= line["ttft_ms"] <= line["total_ms"]
