"""Closed-loop load: C clients, each sending its next request as soon as the last one ends.

Requests go to POST /v1/generate with stream=true. A server that streams (SSE `data: {json}`
lines, the last one carrying `finish_reason` and `usage`) gives a real time to first token;
one that answers with a plain JSON body gets its full latency counted as TTFT, and the
record says so (`streamed=False`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import httpx

from bench.report import RequestRecord

# Topics make prompts differ (so no server can reuse one answer); the filler pads them to the
# asked length with text the model will keep writing after.
TOPICS = (
    "the history of the printing press", "how bridges are designed", "the water cycle",
    "the life of honey bees", "how compilers work", "the first voyages around the world",
    "why the sky is blue", "how vaccines train the immune system",
)
FILLER = (
    "Explain every step in detail, give examples, and keep writing a long and thorough answer "
    "that covers causes, consequences, people involved and open questions."
)
WORDS_PER_TOKEN = 0.75  # English prose through a BPE vocabulary, close enough for sizing


def make_prompts(prompt_tokens: int, count: int = len(TOPICS)) -> list[str]:
    """`count` distinct prompts of about `prompt_tokens` tokens (the server reports exact counts)."""
    filler = FILLER.split()
    prompts = []
    for topic in itertools.islice(itertools.cycle(TOPICS), count):
        words = f"Write an essay about {topic}.".split()
        target = max(len(words), int(prompt_tokens * WORDS_PER_TOKEN))
        words += list(itertools.islice(itertools.cycle(filler), target - len(words)))
        prompts.append(" ".join(words))
    return prompts


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    adapters: Sequence[str | None]  # requests cycle through these; None = the base
    prompts: Sequence[str]
    max_new_tokens: int
    duration_s: float  # from the first send until clients stop; in-flight requests are abandoned
    ramp_s: float  # client i starts at i * ramp_s / C, so rows do not all start and end together
    temperature: float = 0.0


async def _one_request(client: httpx.AsyncClient, body: dict) -> RequestRecord:
    start = time.monotonic()
    ttft: float | None = None
    final: dict | None = None
    async with client.stream("POST", "/v1/generate", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread())[:200].decode(errors="replace")
            now = time.monotonic()
            return RequestRecord(start, now, now - start, 0, 0, "error", False, f"HTTP {response.status_code}: {detail}")
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            final = json.loads(await response.aread())
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if ttft is None and event.get("text"):
                    ttft = time.monotonic() - start
                if event.get("finish_reason") is not None:
                    final = event
    end = time.monotonic()
    if final is None:
        return RequestRecord(start, end, end - start, 0, 0, "error", ttft is not None, "stream ended without a final event")
    error = final.get("error")
    usage = final.get("usage") or {}
    return RequestRecord(
        start=start,
        end=end,
        ttft=ttft if ttft is not None else end - start,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        finish_reason=str(final.get("finish_reason")),
        streamed=ttft is not None,
        error=f"engine: {error.get('message')}" if error else None,
    )


async def run_load(
    base_url: str,
    spec: LoadSpec,
    progress: Callable[[float, list[RequestRecord]], None] | None = None,
    progress_every_s: float = 5.0,
) -> tuple[float, list[RequestRecord]]:
    """Drive the server for spec.duration_s; returns (time of the first send, finished records)."""
    records: list[RequestRecord] = []
    counter = itertools.count()
    t0 = time.monotonic()
    stop_at = t0 + spec.duration_s

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        await asyncio.sleep(index * spec.ramp_s / spec.concurrency)
        while time.monotonic() < stop_at:
            n = next(counter)
            body = {
                "prompt": spec.prompts[n % len(spec.prompts)],
                "max_new_tokens": spec.max_new_tokens,
                "temperature": spec.temperature,
                "stream": True,
            }
            adapter = spec.adapters[n % len(spec.adapters)]
            if adapter is not None:
                body["adapter"] = adapter
            try:
                records.append(await _one_request(client, body))
            except httpx.HTTPError as exc:
                now = time.monotonic()
                records.append(RequestRecord(now, now, 0.0, 0, 0, "error", False, f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(0.5)  # a dead server refuses at once; don't spin on it

    limits = httpx.Limits(max_connections=spec.concurrency + 4, max_keepalive_connections=spec.concurrency + 4)
    # No read timeout: under a serial baseline a request legitimately waits minutes in its queue.
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(None), limits=limits) as client:
        tasks = [asyncio.create_task(client_loop(client, i)) for i in range(spec.concurrency)]
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(progress_every_s, max(0.0, stop_at - time.monotonic())))
            if progress is not None:
                progress(time.monotonic() - t0, records)
        # Abandon whatever is in flight: closing the connection is how a client cancels.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return t0, records
