"""Request and response bodies of the OpenAI-compatible API.

Requests forbid unknown fields, and parameters OpenAI defines but this server does not
implement are declared here only so that `unsupported()` can refuse them by name: a
client must never believe a parameter took effect when it did not.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.schemas import PromptWarnings, Text


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send one last chunk with the usage of the whole request.")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Text


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # `developer` is OpenAI's newer name for `system`; `tool` is refused with the tools.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _SamplingFields(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "",
        max_length=256,
        description="Adapter name, name@version, base:adapter, or the base id / empty string for the base.",
    )
    max_tokens: int | None = Field(None, ge=1, description="Defaults to the server's default_max_new_tokens.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy. OpenAI's default of 1 applies.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="With n > 1, choice i samples with seed + i.")
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="End-user id; written to the request log.")

    # Declared so they can be refused by name (see `unsupported`).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for the first parameter set to something this server cannot honour."""
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported (only 0)"
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed with stream=true"
        return None


TokenIds = list[int]


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        ..., description="One prompt or several, as text or as token ids (not tokenized again)."
    )
    max_tokens: int | None = Field(
        None, ge=0, description="Defaults to the server's default_max_new_tokens; 0 (with echo) scores the prompt only."
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs, if asked).")
    logprobs: int | None = Field(
        None, ge=0, description="Log-probabilities of each token and of its `logprobs` most likely alternatives "
        "(at most the server's max_logprobs)."
    )
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """Text prompts as strings, token-id prompts as lists of ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix is not None:
            return "suffix", "suffix (insertion) is not supported"
        if self.best_of not in (None, 1, self.n):
            return "best_of", "best_of other than n is not supported"
        return super().unsupported()


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: bool | None = Field(None, description="Log-probability of each generated token.")
    top_logprobs: int | None = Field(None, ge=0, description="With logprobs: that many most likely alternatives "
                                     "per token (at most the server's max_logprobs).")
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.response_format is not None and self.response_format.get("type") != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, f"{name} (function calling) is not supported"
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                return name, f"{name} is not supported"
        if self.parallel_tool_calls is not None:
            return "parallel_tool_calls", "parallel_tool_calls is not supported"
        for index, message in enumerate(self.messages):
            if message.role == "tool" or message.tool_calls or message.tool_call_id is not None:
                return f"messages.{index}", "tool messages are not supported"
            if message.name is not None:
                return f"messages.{index}.name", "message names are not supported by the chat template"
        return super().unsupported()

    def token_limit(self) -> tuple[int | None, str]:
        """(max new tokens, the param that set it) — max_completion_tokens wins when both agree."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptFormatOut(BaseModel):
    """How an adapter's training prompts were formatted (adapters.manifest.PromptFormat)."""

    kind: Literal["raw", "chat"] = Field(
        ..., description="raw: send `prompt` (/v1/completions); chat: send `messages` (/v1/chat/completions)."
    )
    source: str | None = Field(None, description="The training rows' shape: input/target, prompt/completion, messages.")
    roles: list[str] = Field(default_factory=list, description="chat: roles of the prompt turns seen in training.")
    system_prompt: str | None = Field(None, description="chat: the system message every training row began with.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "adaptserve"
    root: str
    parent: str | None
    version: str | None = None
    task: str
    max_model_len: int | None = None
    prompt_format: PromptFormatOut | None = Field(
        None, description="How the adapter's training prompts were formatted; null when its manifest does not say."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs object: one entry per token of `text` (with echo, the prompt's
    first; its first token has no logprob, as nothing precedes it)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut
    warnings: PromptWarnings


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(None, description="UTF-8 bytes of `token`.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut
    warnings: PromptWarnings
