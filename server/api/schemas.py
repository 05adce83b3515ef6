"""Request and response bodies of the native API (OpenAPI at /docs is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Raw prompt text; give this or `messages`.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat turns, rendered with the base's chat template."
    )
    adapter: str | None = Field(None, description="Adapter name or name@version; omit for the base.")
    max_new_tokens: int | None = Field(None, ge=1, description="Defaults to the server's default.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=100_000, description="0 = off.")
    stop: str | list[str] | None = Field(None, description="Stop strings; the text ends before the first match.")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Seed for sampling (ignored when greedy).")
    stream: bool = Field(False, description="Server-sent events, one per token group.")

    @model_validator(mode="after")
    def _one_input(self) -> "GenerateRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class AdapterRefOut(BaseModel):
    name: str
    version: str


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str
    usage: Usage
    adapter: AdapterRefOut | None


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: str | list[str] = Field(..., description="One text or a list of texts.")
    adapter: str = Field(..., min_length=1, description="A classification adapter: name or name@version.")

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class ClassifyResultOut(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    results: list[ClassifyResultOut]
    adapter: AdapterRefOut
    usage: Usage


class ErrorBody(BaseModel):
    code: str
    message: str
    type: str
    param: str | None = None
    details: object | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
