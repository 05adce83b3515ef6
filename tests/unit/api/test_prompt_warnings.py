"""A request in another shape than the adapter's training prompts is answered with a warning
naming the trained shape, on the native and the OpenAI API; adapters without a recorded
format (plain PEFT folders) answer exactly as before, with no warnings."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from adapters.manifest import AdapterManifest, PromptFormat
from adapters.package import content_sha256
from tests.conftest import ADMIN_TOKEN, make_lora, start_server, stop_server, tiny_settings

RAW = PromptFormat("raw", "input/target")
CHAT = PromptFormat("chat", "messages", roles=("system", "user"), system_prompt="be brief")
NO_SYSTEM = PromptFormat("chat", "messages", roles=("user",))


def _trained_like(folder, prompt_format: PromptFormat):
    """A manifest.json as the trainer writes it beside the PEFT files."""
    sha = content_sha256(folder)
    AdapterManifest(name=folder.name, version=sha[:12], sha256=sha, task="generate", peft_type="LORA", rank=4,
                    target_modules=("q_proj", "v_proj"), size_bytes=1, prompt_format=prompt_format).write(folder)


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    store = tmp_path_factory.mktemp("format-store")
    # One set of PEFT weights under four names: only the manifests differ.
    peft = make_lora(tiny_llama, store / "elsewhere", seed=11, weight_scale=3.0)
    for name, prompt_format in (("raw-trained", RAW), ("chat-trained", CHAT), ("no-system", NO_SYSTEM)):
        shutil.copytree(peft, store / name)
        _trained_like(store / name, prompt_format)
    running = start_server(tiny_settings(tiny_llama, store, tmp_path_factory.mktemp("srv"), admin_token=ADMIN_TOKEN))
    yield running
    stop_server(running)


def _generate(server, adapter: str, shape: dict) -> dict:
    with server.client() as client:
        response = client.post("/v1/generate", json={"adapter": adapter, "max_new_tokens": 3, **shape})
    assert response.status_code == 200, response.text
    return response.json()


PROMPT = {"prompt": "one two"}
USER = {"messages": [{"role": "user", "content": "one two"}]}
BRIEF = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"}]}


@pytest.mark.parametrize("adapter, shape, expected", [
    ("raw-trained", PROMPT, []),
    ("raw-trained", USER, [("prompt_format_mismatch", "prompt")]),
    ("chat-trained", BRIEF, []),
    ("chat-trained", PROMPT, [("prompt_format_mismatch", "messages")]),
    ("chat-trained", USER, [("system_prompt_mismatch", "messages")]),
    ("no-system", USER, []),
    ("no-system", BRIEF, [("system_prompt_mismatch", "messages")]),
    ("elsewhere", PROMPT, []),
    ("elsewhere", USER, []),
])
def test_native_generate_warns_when_the_request_shape_is_not_the_trained_one(server, adapter, shape, expected):
    body = _generate(server, adapter, shape)
    assert [(w["code"], w["trained_on"]) for w in body["warnings"]] == expected
    assert body["text"] is not None  # answered as sent, not refused


def test_the_warning_says_what_to_send(server):
    [warning] = _generate(server, "chat-trained", PROMPT)["warnings"]
    assert "trained on chat messages" in warning["message"] and "Send `messages`" in warning["message"]
    [warning] = _generate(server, "chat-trained", USER)["warnings"]
    assert "'be brief'" in warning["message"]


def test_native_stream_carries_the_warnings_in_its_final_event(server):
    body = {"adapter": "raw-trained", "max_new_tokens": 3, "stream": True, **USER}
    with server.client() as client, client.stream("POST", "/v1/generate", json=body) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert [w["trained_on"] for w in events[-1]["warnings"]] == ["prompt"]
    assert all("warnings" not in event for event in events[:-1])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_responses_carry_the_same_warnings(client):
    completion = client.completions.create(model="chat-trained", prompt="one two", max_tokens=3, temperature=0)
    assert [(w["code"], w["trained_on"]) for w in completion.warnings] == [("prompt_format_mismatch", "messages")]
    chat = client.chat.completions.create(model="raw-trained", messages=USER["messages"], max_tokens=3, temperature=0)
    assert [w["trained_on"] for w in chat.warnings] == ["prompt"]
    fine = client.chat.completions.create(model="chat-trained", messages=BRIEF["messages"], max_tokens=3, temperature=0)
    assert fine.warnings == []
    elsewhere = client.completions.create(model="elsewhere", prompt="one two", max_tokens=3, temperature=0)
    assert elsewhere.warnings == []


def test_openai_streams_send_the_warnings_once_in_their_first_chunk(client):
    stream = client.chat.completions.create(model="raw-trained", messages=USER["messages"], max_tokens=3,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert [w["trained_on"] for w in chunks[0].warnings] == ["prompt"]
    assert all(not (chunk.model_extra or {}).get("warnings") for chunk in chunks[1:])
    plain = list(client.completions.create(model="raw-trained", prompt="one two", max_tokens=3, temperature=0, stream=True))
    assert all(not (chunk.model_extra or {}).get("warnings") for chunk in plain)


def test_model_cards_and_the_admin_listing_name_the_trained_shape(client, server):
    assert client.models.retrieve("chat-trained").prompt_format == CHAT.to_dict()
    assert client.models.retrieve("raw-trained").prompt_format["kind"] == "raw"
    assert client.models.retrieve("elsewhere").prompt_format is None
    with server.client(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        listed = admin.get("/v1/adapters/raw-trained").json()
    assert listed["versions"][0]["prompt_format"] == RAW.to_dict()
