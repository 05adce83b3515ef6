"""`eval --server URL`: the offline evaluation's metrics, measured through a running server's HTTP API.

What production answers, not what the training process saw: every held-out row is sent
to the server (the adapter, and the base beside it) in the request shape the adapter was
trained on, read from its model card (`GET /v1/models/{name}`, `prompt_format`; rows
follow trainer/prompt_format.py's rule when the card does not say). The bodies are
serving_request's, the metrics trainer/metrics.py's, the same code as the offline
evaluation. Perplexity needs token log-probabilities and is not measured here.

A client only: httpx, no server import, no torch.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx
from tqdm import tqdm

from adapters.manifest import PromptFormat
from trainer.data import ClassificationExample, GenerationExample, load_examples
from trainer.metrics import SAMPLES_KEPT, classification_metrics, generation_metrics
from trainer.prompt_format import in_format
from trainer.push import error_message
from trainer.serving_request import NATIVE, ServedRequest, classification_request, generation_request

RETRIED_STATUS = (429, 503)  # overload and not-ready-yet: the server says when to come back
MAX_ATTEMPTS = 6
CLASSIFY_BATCH = 16  # inputs per /v1/classify call (the server's default cap is 64)


class ServerEvalError(RuntimeError):
    pass


def evaluate_server(
    data_file: str,
    server: str,
    adapter: str | None,
    *,
    task: str | None = None,
    max_new_tokens: int = 64,
    api: str = NATIVE,
    api_key: str | None = None,
    concurrency: int = 8,
    timeout_s: float = 300.0,
    progress: bool = True,
) -> dict[str, Any]:
    """{"base": metrics | None, "adapter": metrics ("adapter" only with one), "served": ..., "request": ...}."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout_s) as client:
        card = _model_card(client, adapter) if adapter else None
        served_task = card["task"] if card else None
        if task and served_task and task != served_task:
            raise ServerEvalError(f"adapter {adapter!r} is a {served_task} adapter on {server}, not {task}")
        task = task or served_task
        if task is None:
            raise ValueError("--task is needed when evaluating the bare base")
        prompt_format = PromptFormat.from_dict(card["prompt_format"]) if card and card.get("prompt_format") else None
        examples = load_examples(data_file, task)
        caller = _Caller(client, concurrency, progress)
        results: dict[str, Any] = {"server": server, "task": task, "api": api}
        if card:
            results["served"] = {"name": adapter, "version": card.get("version"), "prompt_format": card.get("prompt_format")}
        if task == "classify":
            if api != NATIVE:
                raise ValueError("classification is served on /v1/classify only: use --api native")
            if not adapter:
                raise ValueError("classification over HTTP needs --adapter: the base has no classifier head")
            results["request"] = _request_out(classification_request(examples[:1], adapter))
            # The base has no classifier head on the server (the offline eval gives it a random one).
            results["base"] = None
            results["adapter"] = _classify(caller, examples, adapter)
            return results
        examples = in_format(examples, prompt_format)
        results["request"] = _request_out(generation_request(examples[0], adapter, max_new_tokens, api))
        results["base"] = _generate(caller, examples, None, max_new_tokens, api)
        if adapter:
            results["adapter"] = _generate(caller, examples, adapter, max_new_tokens, api)
        return results


def _request_out(request: ServedRequest) -> dict[str, Any]:
    return {"path": request.path, "body": request.body}


def _model_card(client: httpx.Client, adapter: str) -> dict[str, Any]:
    response = _get(client, f"/v1/models/{adapter}")
    if response.status_code == 404:
        raise ServerEvalError(f"{client.base_url} serves no adapter {adapter!r}: {error_message(response)}")
    _raise_for(response, f"GET /v1/models/{adapter}")
    return response.json()


def _get(client: httpx.Client, path: str) -> httpx.Response:
    try:
        return client.get(path)
    except httpx.HTTPError as exc:
        raise ServerEvalError(f"could not reach {client.base_url}: {exc}") from exc


class _Caller:
    """POSTs requests concurrently (the server batches them), retrying overload, with a progress bar."""

    def __init__(self, client: httpx.Client, concurrency: int, progress: bool):
        self.client = client
        self.concurrency = max(1, concurrency)
        self.progress = progress

    def post_all(self, requests: Sequence[ServedRequest], label: str) -> list[dict[str, Any]]:
        with tqdm(total=len(requests), desc=label, unit="req", file=sys.stderr, disable=not self.progress) as bar:
            def post(request: ServedRequest) -> dict[str, Any]:
                answer = self._post(request)
                bar.update()
                return answer

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(post, requests))

    def _post(self, request: ServedRequest) -> dict[str, Any]:
        for attempt in range(MAX_ATTEMPTS):
            try:
                response = self.client.post(request.path, json=request.body)
            except httpx.HTTPError as exc:
                raise ServerEvalError(f"could not reach {self.client.base_url}: {exc}") from exc
            if response.status_code not in RETRIED_STATUS or attempt == MAX_ATTEMPTS - 1:
                break
            time.sleep(_retry_after(response))
        _raise_for(response, f"POST {request.path}")
        return response.json()


def _generate(caller: _Caller, examples: Sequence[GenerationExample], adapter: str | None, max_new_tokens: int,
              api: str) -> dict[str, Any]:
    requests = [generation_request(e, adapter, max_new_tokens, api) for e in examples]
    responses = caller.post_all(requests, adapter or "base")
    predictions = [request.answer(response).strip() for request, response in zip(requests, responses)]
    references = [e.answer.strip() for e in examples]
    warned = [r["warnings"] for r in responses if r.get("warnings")]
    return {
        **generation_metrics(predictions, references),
        "examples": len(examples),
        # Responses the server flagged: a request shape other than the adapter was trained on.
        "warned_responses": len(warned),
        "warning": warned[0][0]["message"] if warned else None,
        "samples": [
            {"reference": r, "prediction": p} for r, p in list(zip(references, predictions))[:SAMPLES_KEPT]
        ],
    }


def _classify(caller: _Caller, examples: Sequence[ClassificationExample], adapter: str) -> dict[str, Any]:
    batches = [examples[i : i + CLASSIFY_BATCH] for i in range(0, len(examples), CLASSIFY_BATCH)]
    responses = caller.post_all([classification_request(batch, adapter) for batch in batches], adapter)
    results = [result for response in responses for result in response["results"]]
    # The adapter's labels in id order, as its head defines them; `scores` lists every one.
    labels = list(results[0]["scores"])
    unknown = sorted({e.label for e in examples} - set(labels))
    if unknown:
        raise ValueError(f"label(s) {unknown} are not among adapter {adapter!r}'s labels {labels}")
    index = {label: i for i, label in enumerate(labels)}
    return classification_metrics([index[e.label] for e in examples], [index[r["label"]] for r in results], labels)


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(30.0, max(0.1, float(response.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.status_code >= 400:
        raise ServerEvalError(f"{what} answered {response.status_code}: {error_message(response)}")
