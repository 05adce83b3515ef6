"""The OpenAI-compatible API, driven by the real `openai` client against a real server."""

from __future__ import annotations

import json
import logging
import time

import openai
import pytest

MESSAGES = [{"role": "user", "content": "paris is the capital of"}]


@pytest.fixture(scope="module")
def client(llama_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=llama_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def base_id(llama_server) -> str:
    return llama_server.services.info.base_id


def version_of(llama_server, name: str) -> str:
    return llama_server.services.registry.entries[name].current


def access_line(caplog, request_id: str) -> dict:
    # The server logs after the last byte is sent, so the client can be a moment ahead.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == "adaptserve.access" and json.loads(record.getMessage())["request_id"] == request_id:
                return json.loads(record.getMessage())
        time.sleep(0.02)
    raise AssertionError(f"no access log line for {request_id}")


def chat(client, model: str, **kwargs) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, temperature=0, **kwargs)


def test_models_lists_the_base_and_every_adapter(client, llama_server, base_id):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {base_id, "gen-a", "gen-b", "sentiment"}
    assert models[base_id].parent is None
    for name in ("gen-a", "gen-b", "sentiment"):
        card = models[name].model_dump()
        version = version_of(llama_server, name)
        assert card["parent"] == base_id and card["version"] == version
        assert card["root"] == f"{name}@{version}" and card["object"] == "model"
    assert models["sentiment"].model_dump()["task"] == "classify"
    assert client.models.retrieve("gen-a").id == "gen-a"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("missing")


def test_model_selects_the_adapter_in_every_accepted_form(client, llama_server, base_id):
    version = version_of(llama_server, "gen-a")
    plain = chat(client, "gen-a")
    assert plain.model == f"gen-a@{version}"
    assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-")
    for model in (f"gen-a@{version}", f"{base_id}:gen-a"):
        assert chat(client, model).choices[0].message.content == plain.choices[0].message.content
    base = chat(client, "")
    assert base.model == base_id
    assert chat(client, base_id).choices[0].message.content == base.choices[0].message.content
    # The adapter's weights are large enough that its greedy text differs from the base's.
    assert base.choices[0].message.content != plain.choices[0].message.content


def test_chat_stream_matches_the_whole_response(client):
    whole = chat(client, "gen-b", max_completion_tokens=8)
    stream = client.chat.completions.create(
        model="gen-b", messages=MESSAGES, max_completion_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_n_and_seed(client):
    kwargs = dict(model="gen-a", prompt="one two three", max_tokens=6, temperature=1.0, seed=7, n=2)
    first = client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert first.object == "text_completion" and [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    # Each choice samples with its own seed (seed + index): an argmax-only server gives two equal ones.
    assert first.choices[0].text != first.choices[1].text
    # The prompt is counted once however many choices share it.
    single = client.completions.create(**{**kwargs, "n": 1})
    assert first.usage.prompt_tokens == single.usage.prompt_tokens
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens
    streamed: dict[int, str] = {0: "", 1: ""}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [c.text for c in first.choices]


def test_completions_prompt_list_gives_one_choice_per_prompt(client):
    response = client.completions.create(model="", prompt=["the quick", "one two"], max_tokens=3, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    solo = client.completions.create(model="", prompt="one two", max_tokens=3, temperature=0)
    assert response.choices[1].text == solo.choices[0].text


@pytest.mark.parametrize("model,kwargs,error,param", [
    ("missing", {}, openai.NotFoundError, "model"),
    ("task:summarize", {}, openai.NotFoundError, "model"),
    ("other-base:gen-a", {}, openai.NotFoundError, "model"),
    ("sentiment", {}, openai.BadRequestError, "model"),
    ("gen-a", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     openai.BadRequestError, "tools"),
    ("gen-a", {"response_format": {"type": "json_object"}}, openai.BadRequestError, "response_format"),
    ("gen-a", {"top_logprobs": 2}, openai.BadRequestError, "top_logprobs"),  # needs logprobs: true
    ("gen-a", {"logprobs": True, "top_logprobs": 21}, openai.BadRequestError, "top_logprobs"),  # --max-logprobs
    ("gen-a", {"presence_penalty": 0.5}, openai.BadRequestError, "presence_penalty"),
    ("gen-a", {"logit_bias": {"1": 5}}, openai.BadRequestError, "logit_bias"),
    ("gen-a", {"n": 5}, openai.BadRequestError, "n"),
    ("gen-a", {"max_tokens": 10_000}, openai.BadRequestError, "max_tokens"),
    ("gen-a", {"stop": ["a", "b", "c", "d", "e"]}, openai.BadRequestError, "stop"),
    ("gen-a", {"stream_options": {"include_usage": True}}, openai.BadRequestError, "stream_options"),
    ("gen-a", {"extra_body": {"mystery": 1}}, openai.BadRequestError, "mystery"),
    ("gen-a", {"temperature": 3}, openai.BadRequestError, "temperature"),
])
def test_errors_surface_as_the_clients_exception_types(client, model, kwargs, error, param):
    with pytest.raises(error) as caught:
        client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)
    assert caught.value.body["param"] == param
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.body["message"]


def test_completion_only_params_are_refused_too(client):
    for kwargs, param in (({"suffix": "x"}, "suffix"), ({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
                          ({"best_of": 3}, "best_of")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="gen-a", prompt="hi", **kwargs)
        assert caught.value.body["param"] == param


def test_one_json_log_line_per_request(client, llama_server, caplog):
    caplog.set_level(logging.INFO, logger="adaptserve.access")
    raw = client.chat.completions.with_raw_response.create(
        model="gen-a", messages=MESSAGES, max_tokens=4, temperature=0, user="alice",
        extra_headers={"X-Request-Id": "trace-123"},
    )
    response = raw.parse()
    assert raw.headers["x-request-id"] == "trace-123" and response.id == "chatcmpl-trace-123"
    line = access_line(caplog, "trace-123")
    assert line["adapter"] == f"gen-a@{version_of(llama_server, 'gen-a')}"
    assert line["status"] == 200 and line["user"] == "alice" and line["model"] == "gen-a"
    assert line["prompt_tokens"] == response.usage.prompt_tokens
    assert line["completion_tokens"] == response.usage.completion_tokens
    assert line["total_ms"] >= line["ttft_ms"] > 0
    assert 0 <= line["queue_ms"] <= line["total_ms"]


def test_a_streamed_request_logs_its_tokens_once_the_stream_ends(client, caplog):
    caplog.set_level(logging.INFO, logger="adaptserve.access")
    chunks = list(client.completions.create(
        model="gen-b", prompt="one two", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Request-Id": "trace-456"},
    ))
    line = access_line(caplog, "trace-456")
    assert chunks[0].id == "cmpl-trace-456" and line["status"] == 200
    assert line["completion_tokens"] == chunks[-1].usage.completion_tokens > 0


def test_api_keys_work_as_the_clients_api_key(tiny_llama, llama_adapters, tmp_path):
    from pydantic import SecretStr

    from tests.conftest import start_server, stop_server, tiny_settings

    store = next(iter(llama_adapters.values())).parent
    running = start_server(tiny_settings(tiny_llama, store, tmp_path, api_keys=[SecretStr("sk-good")]))
    try:
        url = running.url + "/v1"
        # OpenAI answers a wrong key with 401; either status surfaces as the client's own type.
        with pytest.raises((openai.AuthenticationError, openai.PermissionDeniedError)) as caught:
            openai.OpenAI(base_url=url, api_key="sk-bad", max_retries=0).models.list()
        assert caught.value.body["message"] and caught.value.body["type"]
        good = openai.OpenAI(base_url=url, api_key="sk-good", max_retries=0)
        assert chat(good, "gen-a").choices[0].message.content is not None
    finally:
        stop_server(running)
