"""The HTTP request that asks a served adapter a held-out question, in the shape it was trained on.

`adaptserve eval --server` sends exactly these bodies, and a report prints them as a curl
command and an `openai` call, so the request a report shows is the request its served
figure is measured with. Decoding is greedy (temperature 0) with the evaluation's
max_new_tokens, as in the offline evaluation. No server import: this is a client.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any, Sequence

from trainer.data import ClassificationExample, GenerationExample

DEFAULT_SERVER = "http://127.0.0.1:8000"  # `adaptserve serve`'s default address, shown in reports
NATIVE, OPENAI = "native", "openai"
APIS = (NATIVE, OPENAI)


@dataclass(frozen=True)
class ServedRequest:
    path: str  # /v1/generate, /v1/classify, /v1/completions or /v1/chat/completions
    body: dict[str, Any]

    def answer(self, response: dict[str, Any]) -> str:
        """The generated text of this request's response."""
        if self.path == "/v1/generate":
            return response["text"]
        choice = response["choices"][0]
        return choice["message"]["content"] if self.path == "/v1/chat/completions" else choice["text"]


def _messages(example: GenerationExample) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in example.prompt]


def generation_request(example: GenerationExample, adapter: str | None, max_new_tokens: int, api: str) -> ServedRequest:
    """`adapter` None asks the base. Chat rows go as `messages`, raw rows as `prompt`."""
    shape = {"messages": _messages(example)} if example.is_chat else {"prompt": example.prompt}
    if api == NATIVE:
        target = {"adapter": adapter} if adapter else {}
        return ServedRequest("/v1/generate", {**target, **shape, "max_new_tokens": max_new_tokens, "temperature": 0})
    # OpenAI's default temperature is 1 (sampling): greedy has to be asked for.
    path = "/v1/chat/completions" if example.is_chat else "/v1/completions"
    return ServedRequest(path, {"model": adapter or "", **shape, "max_tokens": max_new_tokens, "temperature": 0})


def classification_request(examples: Sequence[ClassificationExample], adapter: str) -> ServedRequest:
    return ServedRequest("/v1/classify", {"adapter": adapter, "inputs": [e.text for e in examples]})


def curl_command(request: ServedRequest, server: str = DEFAULT_SERVER) -> str:
    return (f"curl -s {server}{request.path} -H 'content-type: application/json' "
            f"-d {shlex.quote(json.dumps(request.body, ensure_ascii=False))}")


def openai_snippet(request: ServedRequest, server: str = DEFAULT_SERVER) -> str | None:
    """Python with the `openai` client; None for /v1/classify, which OpenAI's API has no equivalent of."""
    if request.path == "/v1/classify":
        return None
    if request.path == "/v1/generate":
        raise ValueError("openai_snippet takes an OpenAI-API request (generation_request(..., api='openai'))")
    body = request.body
    chat = request.path == "/v1/chat/completions"
    shape = f"messages={body['messages']!r}" if chat else f"prompt={body['prompt']!r}"
    answer = "reply.choices[0].message.content" if chat else "reply.choices[0].text"
    return "\n".join([
        "from openai import OpenAI",
        "",
        f'client = OpenAI(base_url="{server}/v1", api_key="unused")',
        f"reply = client.{'chat.completions' if chat else 'completions'}.create(",
        f"    model={body['model']!r}, {shape},",
        f"    max_tokens={body['max_tokens']}, temperature=0,",
        ")",
        f"print({answer})",
    ])
