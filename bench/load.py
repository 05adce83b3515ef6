"""Closed-loop load: C clients, each sending its next request as soon as the last one ends.

What the clients send is a RequestMix: plain prompts (an essay the model keeps writing) or
chat messages (a short question, optionally after a tenant's own system prompt), over a set
of adapters picked in turn or by a Zipf popularity. Requests go to POST /v1/generate with
stream=true. A server that streams (SSE `data: {json}`
lines, the last one carrying `finish_reason` and `usage`) gives a real time to first token;
one that answers with a plain JSON body gets its full latency counted as TTFT, and the
record says so (`streamed=False`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import httpx

from bench.report import ABANDONED, RequestRecord

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


# Questions with short natural answers (a date, a number, a word or a sentence): what chat
# traffic to a task adapter looks like, answers ending at EOS rather than at a token cap.
QUESTIONS = (
    "What is the capital of Italy?", "ISO date for: Thursday, April 10, 2042", "How many legs does a spider have?",
    "Name a primary colour.", "What is 12 times 12?", "Translate 'thank you' into French.",
    "Is the sun a star or a planet?", "Give me one word that rhymes with cat.",
    "What is the boiling point of water in Celsius?", "Which ocean is the largest?",
    "ISO date for: May 9th, 2040", "What is the opposite of hot?", "How many days are in a week?",
    "Who wrote Romeo and Juliet?", "What gas do plants take in?", "Spell the number 7 in words.",
)


def tenant_system_prompt(tenant: int, tokens: int = 300) -> str:
    """A distinct system prompt of about `tokens` tokens for tenant `tenant` (its own policy text)."""
    rules = [
        f"You are the support assistant of company number {tenant}.",
        "Answer in one short sentence, be polite, never invent facts, and say when you do not know.",
        f"Our opening hours are {8 + tenant % 3} to {17 + tenant % 4}, our returns window is {14 + tenant} days,",
        f"and our premium plan costs {9 + tenant} euros a month.",
        "Refunds are issued to the original payment method within five working days of the return arriving.",
        "Shipping is free above fifty euros inside the European Union and costs twelve euros elsewhere.",
        "Customers may change their delivery address until the parcel leaves the warehouse.",
    ]
    words = " ".join(rules).split()
    target = int(tokens * WORDS_PER_TOKEN)
    return " ".join(itertools.islice(itertools.cycle(words), max(target, len(words))))


@dataclass(frozen=True)
class RequestMix:
    """Request n's adapter and body: `prompts` (plain text) or `questions` (chat messages)."""

    adapters: Sequence[str | None]  # None = the base
    prompts: Sequence[str] = ()
    questions: Sequence[str] = ()
    # Chat only: each adapter's own system prompt (its tenant's); absent = the chat
    # template's default system prompt, as a client that sends only the user turn gets.
    system_prompts: Mapping[str | None, str] = field(default_factory=dict)
    popularity: Literal["cycle", "zipf"] = "cycle"  # zipf: adapter i (0-based) with weight 1 / (i + 1)
    seed: int = 0

    def adapter(self, n: int) -> str | None:
        if self.popularity == "cycle":
            return self.adapters[n % len(self.adapters)]
        weights = [1.0 / (i + 1) for i in range(len(self.adapters))]
        return random.Random(self.seed * 1_000_003 + n).choices(self.adapters, weights)[0]

    def body(self, n: int) -> dict:
        adapter = self.adapter(n)
        if self.questions:
            messages = [{"role": "user", "content": self.questions[n % len(self.questions)]}]
            if adapter in self.system_prompts:
                messages.insert(0, {"role": "system", "content": self.system_prompts[adapter]})
            body: dict = {"messages": messages}
        else:
            body = {"prompt": self.prompts[n % len(self.prompts)]}
        if adapter is not None:
            body["adapter"] = adapter
        return body


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    mix: RequestMix
    max_new_tokens: int
    duration_s: float  # from the first send until clients stop; in-flight requests are abandoned
    # Client i's first request asks for (i + 1) / C of max_new_tokens, so rows finish (and
    # new prompts arrive) spread evenly from the start, as in a long-running service, instead
    # of the whole batch prefilling and finishing in lockstep for many rounds. Pointless for
    # a server that runs one request at a time.
    stagger: bool = True
    temperature: float = 0.0


class _Progress:
    """What a request has seen so far, kept outside it so an abandoned one still counts."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.ttft: float | None = None
        self.token_times: list[float] = []


async def _one_request(client: httpx.AsyncClient, body: dict, seen: _Progress, warmup: bool) -> RequestRecord:
    async with client.stream("POST", "/v1/generate", json=body) as response:
        if response.status_code != 200:
            detail = (await response.aread())[:200].decode(errors="replace")
            now = time.monotonic()
            return RequestRecord(seen.start, now, now - seen.start, 0, 0, "error", False,
                                 f"HTTP {response.status_code}: {detail}")
        final: dict | None = None
        if not response.headers.get("content-type", "").startswith("text/event-stream"):
            final = json.loads(await response.aread())
        else:
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if event.get("finish_reason") is not None:
                    final = event
                elif event.get("text"):
                    now = time.monotonic()
                    seen.ttft = now - seen.start if seen.ttft is None else seen.ttft
                    seen.token_times.append(now)  # one event per decode step = one token
    end = time.monotonic()
    streamed = seen.ttft is not None
    if final is None:
        return RequestRecord(seen.start, end, end - seen.start, 0, 0, "error", streamed,
                             "stream ended without a final event")
    error = final.get("error")
    usage = final.get("usage") or {}
    completion_tokens = int(usage.get("completion_tokens", 0))
    # Tokens the stream did not show one by one (held back by the detokenizer, or all of
    # them from a server that does not stream) arrived with the final answer.
    rest = max(0, completion_tokens - len(seen.token_times))
    return RequestRecord(
        start=seen.start,
        end=end,
        ttft=seen.ttft if streamed else end - seen.start,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=completion_tokens,
        finish_reason=str(final.get("finish_reason")),
        streamed=streamed,
        error=f"engine: {error.get('message')}" if error else None,
        token_times=(*seen.token_times, *([end] * rest)),
        warmup=warmup,
    )


async def run_load(
    base_url: str,
    spec: LoadSpec,
    progress: Callable[[float, list[RequestRecord]], None] | None = None,
    progress_every_s: float = 5.0,
) -> tuple[float, list[RequestRecord]]:
    """Drive the server for spec.duration_s; returns (time of the first send, records).

    Requests still running at the end are closed (how a client cancels) and recorded as
    abandoned, with the tokens they had streamed by then.
    """
    records: list[RequestRecord] = []
    counter = itertools.count()
    t0 = time.monotonic()
    stop_at = t0 + spec.duration_s

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        first = True
        while time.monotonic() < stop_at:
            n = next(counter)
            warmup = first and spec.stagger and index + 1 < spec.concurrency
            tokens = max(1, (index + 1) * spec.max_new_tokens // spec.concurrency) if warmup else spec.max_new_tokens
            first = False
            body = {**spec.mix.body(n), "max_new_tokens": tokens, "temperature": spec.temperature, "stream": True}
            seen = _Progress()
            try:
                records.append(await _one_request(client, body, seen, warmup))
            except asyncio.CancelledError:
                now = time.monotonic()
                ttft = seen.ttft if seen.ttft is not None else now - seen.start
                records.append(RequestRecord(seen.start, now, ttft, 0, len(seen.token_times), ABANDONED,
                                             seen.ttft is not None, token_times=tuple(seen.token_times)))
                raise
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
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return t0, records
