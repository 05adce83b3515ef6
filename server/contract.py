"""The engine contract: typed, immutable values that cross the scheduler/engine seam.

Nothing here imports torch, so the HTTP layer and the scheduler can use these types while
`server/engine` stays the only place that touches tensors. A different engine (a remote
one, a fake in tests) implements `Engine` and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

FinishReason = Literal["stop", "length", "cancelled", "timeout", "error"]
# adapter_load_failed: its adapter could not be copied into a slot (out of memory), the
# request alone failed; engine_error: the step it was in failed.
ErrorCode = Literal["adapter_load_failed", "engine_error"]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Log-probabilities (from the logits the sampler reads, before temperature): None = not
    # asked; k >= 0 = each token's own plus the k most likely. Prompt ones cost a pass of the
    # vocabulary projection over the whole prompt, so only requests that ask pay it.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class AdapterBinding:
    """Which adapter version a request runs on, fixed when the request is admitted.

    `package` is the loaded AdapterPackage (opaque here); `key` is its content hash, so a
    new version under the same name is a different binding and can never be confused.
    """

    name: str
    version: str
    key: str
    package: Any


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    adapter: AdapterBinding | None = None
    deadline: float | None = None  # time.monotonic() past which the row is freed


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely (token id, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    text: str  # newly decoded text (may be empty while a stop string could still match)
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # why a request ended with finish_reason "error" (for people)
    error_code: ErrorCode | None = None  # the same, for code: the API maps it to its error
    queue_s: float | None = None  # on a request's first token: time from add() to its prefill
    cached_tokens: int | None = None  # on the first token: prompt tokens read from the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids, when the request asked
    # On the first event, when asked: one per prompt token; the first is None (nothing precedes it).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class ClassifyItem:
    text: str
    adapter: AdapterBinding | None  # None: the base's own head (vision bases that have one)
    # A vision base's input instead of `text`: one preprocessed image, a numpy float32
    # array [3, height, width] (adapters.images.Preprocessing), decoded off the engine thread.
    pixels: Any = None


@dataclass(frozen=True)
class ClassifyResult:
    label: str
    score: float
    scores: dict[str, float]
    prompt_tokens: int


@dataclass(frozen=True)
class DeviceTierActivity:
    """What the engine's adapter slots did since the last report (metrics read it)."""

    hits: int = 0  # an adapter asked for was resident
    misses: int = 0  # it had to be copied into a slot
    evictions: int = 0  # slots the engine freed on its own (slot LRU, device byte budget)
    load_seconds: tuple[float, ...] = ()  # each copy into a slot


@dataclass(frozen=True)
class EngineInfo:
    base_id: str
    kind: Literal["decoder", "encoder", "vision"]
    max_context: int
    device: str
    dtype: str
    quantization: str
    max_device_adapters: int
    has_chat_template: bool
    base_labels: tuple[str, ...] = ()  # labels of a head the base itself has (vision); empty: none
    image_preprocessing: Any = None  # vision bases: adapters.images.Preprocessing, applied off the engine thread
    vocab_size: int = 0  # token ids a prompt may be given as are 0 .. vocab_size - 1 (text bases)


class Engine(Protocol):
    """Runs on one thread (the scheduler's); never called from the event loop."""

    info: EngineInfo
    signature: Any  # adapters.signature.BaseSignature: what adapters are validated against

    def tokenize(self, prompt: str | None, messages: Sequence[dict[str, str]] | None) -> list[int]: ...

    def count_tokens(self, text: str) -> int: ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text (logprobs name tokens this way); any thread."""

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of a token sequence (a prompt given as ids, echoed back); any thread."""

    def add(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the running batch at the next step boundary."""

    def cancel(self, request_id: str, reason: FinishReason) -> None:
        """Drop a waiting or running request at the next step; it emits a final event."""

    def has_work(self) -> bool: ...

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (prefill), decode one token for every running row."""

    def abort_all(self, error: str) -> list[TokenEvent]:
        """After a failed step: drop every waiting and running request, one final event each."""

    def classify(self, items: Sequence[ClassifyItem]) -> list[ClassifyResult]: ...

    def load_adapter(self, adapter: AdapterBinding) -> None:
        """Make an adapter resident in a device slot (no-op when it already is)."""

    def evict_adapter(self, key: str) -> None:
        """Free an adapter's slot once no running row uses it."""

    def hold_adapter(self, key: str, held: bool) -> bool:
        """Pin (held=True) or release a resident adapter; False when it is not resident."""

    def resident_adapters(self) -> dict[str, bool]:
        """key -> in use by a running row (for metrics and the cache table)."""

    def take_device_tier_activity(self) -> DeviceTierActivity:
        """Slot hits, misses, evictions and load times since the last call (any thread)."""

    def stats(self) -> dict[str, Any]:
        """Snapshot: running, waiting, kv_tokens, kv_capacity_tokens, running_adapters,
        waiting_adapters (names), resident_adapter_keys, memory_bytes (part -> bytes the engine
        allocated beside the base's weights). Safe to call from any thread."""
