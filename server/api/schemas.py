"""Request and response bodies of the native API (OpenAPI at /docs is generated from these)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator


def _encodable(text: str) -> str:
    # JSON may spell lone surrogates ("\\ud800"); the tokenizer raises a TypeError on them (a 500).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode at position {exc.start}") from None
    return text


# Any text that reaches the tokenizer.
Text = Annotated[str, AfterValidator(_encodable)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class WeightedAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, description="Adapter name or name@version.")
    weight: float = Field(1.0, allow_inf_nan=False, description="Weight of this adapter's delta-W in the sum.")


class MergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["cat", "linear", "svd", "ties", "dare_linear", "dare_ties"] = Field(
        "cat", description="cat: exact weighted sum (rank = sum of ranks). The others act on delta-W and are "
        "re-factored by SVD to `rank`.",
    )
    density: float | None = Field(None, gt=0.0, le=1.0, description="ties/dare: fraction of each delta-W kept.")
    rank: int | None = Field(None, ge=1, description="svd family: rank of the result.")
    majority_sign: Literal["total", "frequency"] = Field("total", description="ties/dare_ties sign election.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="dare: seed of the random drop.")


class TargetFields(BaseModel):
    """How a request picks what it runs on: one of `adapter`, `task` or `adapters` (+ `merge`)."""

    adapter: str | None = Field(None, description="Adapter name or name@version; omit for the base.")
    task: str | None = Field(None, description="A task route's name; the route picks the adapter version.")
    adapters: list[WeightedAdapter] | None = Field(
        None, min_length=1, description="Several adapters: merged (generate; classify with `merge`) or, on "
        "classify without `merge`, each one's result per input.",
    )
    merge: MergeIn | None = Field(None, description="How `adapters` are merged (default cat).")

    @model_validator(mode="after")
    def _one_target(self):
        if sum(x is not None for x in (self.adapter, self.task, self.adapters)) > 1:
            raise ValueError("give at most one of `adapter`, `task` or `adapters`")
        if self.merge is not None and self.adapters is None:
            raise ValueError("`merge` needs `adapters`")
        return self


class GenerateRequest(TargetFields):
    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, description="Raw prompt text; give this or `messages`.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat turns, rendered with the base's chat template."
    )
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


class PromptWarningOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built straight from server.inference.PromptWarning
    code: Literal["prompt_format_mismatch", "system_prompt_mismatch"]
    message: str
    trained_on: Literal["prompt", "messages"] = Field(
        ..., description="The request field that gets the adapter's trained behaviour."
    )


# Shared by the native and the OpenAI responses.
PromptWarnings = Annotated[list[PromptWarningOut], Field(
    default_factory=list,
    description="The request's shape differs from the adapter's training prompts (recorded in its manifest); "
    "it was answered as sent. Always empty for adapters without a recorded format.",
)]


class GenerateResponse(BaseModel):
    text: str
    finish_reason: str
    usage: Usage
    adapter: AdapterRefOut | None
    task: str | None = Field(None, description="The route that picked `adapter`, when the request named a task.")
    fallback: bool = Field(False, description="The route's target was unavailable; its fallback served.")
    warnings: PromptWarnings


class ClassifyRequest(TargetFields):
    """JSON body of /v1/classify. The same endpoint takes multipart/form-data too: image files
    (any field name) plus `adapter`, `task` or repeated `adapters` form fields."""

    model_config = ConfigDict(extra="forbid")
    inputs: Text | list[Text] | None = Field(None, description="One text or a list of texts (text bases).")
    images: str | list[str] | None = Field(
        None, description="One image file or a list, each base64-encoded (a `data:image/...;base64,` URL works "
        "too): vision bases. Without an adapter, a vision base with its own head (mobilenet-v2: ImageNet) answers.",
    )

    @model_validator(mode="after")
    def _needs_target(self) -> "ClassifyRequest":
        if (self.inputs is None) == (self.images is None):
            raise ValueError("give exactly one of `inputs` (texts) or `images` (base64 image files)")
        if self.inputs is not None and self.adapter is None and self.task is None and self.adapters is None:
            raise ValueError("give `adapter`, `task` or `adapters`: classification needs an adapter's head")
        return self

    def texts(self) -> list[str] | None:
        if self.inputs is None:
            return None
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)

    def encoded_images(self) -> list[str] | None:
        if self.images is None:
            return None
        return [self.images] if isinstance(self.images, str) else list(self.images)


class ClassifyResultOut(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    results: list[ClassifyResultOut]
    adapter: AdapterRefOut | None = Field(..., description="None: a vision base's own head answered.")
    usage: Usage
    task: str | None = None
    fallback: bool = False


class AdapterResultOut(ClassifyResultOut):
    adapter: AdapterRefOut


class FanoutResultOut(BaseModel):
    results: list[AdapterResultOut] = Field(..., description="One per adapter, in the request's order.")


class FanoutClassifyResponse(BaseModel):
    """`adapters` without `merge`: every adapter's result for every input (results[i] = input i)."""

    results: list[FanoutResultOut]
    adapters: list[AdapterRefOut]
    usage: Usage


class ErrorBody(BaseModel):
    code: str
    message: str
    type: str
    param: str | None = None
    details: object | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
