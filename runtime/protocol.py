"""OpenAI-compatible request and response bodies (the subset this server implements).

Requests are validated here so every bad field becomes a 400 with an OpenAI error body; fields
OpenAI defines but this server cannot honour are accepted only at their neutral value and
otherwise refused by name, never silently ignored. Unknown fields are ignored, as OpenAI
clients send newer fields (`store`, `metadata`, ...) that do not change generation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Stop strings: OpenAI allows 4; a few more cost nothing and help prompt formats with many turns.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class _Body(BaseModel):
    # Strict: `"max_tokens": true` or `"stream": "yes"` is a client bug to report, not to coerce.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = Field(default=None, description="Served model id (see /v1/models); optional.")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Tokens to generate at most; default 16 for completions (as OpenAI), the rest of the context for chat.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="Extension: keep the k most likely tokens; 0/-1 = all.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)] | list[
        Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
    ] | None = Field(default=None, description="Up to 16 strings; generation stops before the first one.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=64, description="Extension: token ids that end generation."
    )
    ignore_eos: bool = Field(default=False, description="Extension: keep generating past end-of-sequence.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_supported(self) -> _SamplingFields:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings are supported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name}: penalties are not supported by this server; omit it or send 0")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server; omit it")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple, whichever form it came in."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


# OpenAI's legacy completions API generates 16 tokens when max_tokens is left out.
COMPLETION_DEFAULT_MAX_TOKENS = 16


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Annotated[str, Field(min_length=1)] | list[Annotated[int, Field(ge=0)]] | list[str] = Field(
        description="Text, or a list of token ids; a list of one string is accepted too."
    )
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=0, description="Not supported; omit it.")
    suffix: str | None = Field(default=None, max_length=0, description="Not supported; omit it.")
    best_of: int | None = Field(default=None, ge=1, le=1)

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo: not supported by this server; omit it")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: must not be empty")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise ValueError("prompt: send one prompt per request (a list of one string is accepted)")
        return self


class TextPart(_Body):
    """One `{"type": "text", "text": ...}` part of a message's content."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = Field(default=None, description="Not supported; omit it or send false.")
    tools: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server; omit it")
        if self.tools:
            raise ValueError("tools: tool calling is not supported by this server; omit it")
        return self

    def token_limit(self) -> int | None:
        """max_completion_tokens (the newer name) or max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class Usage(BaseModel):
    """Exact token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    """The `error` member of an OpenAI error body."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer has this body."""

    error: ErrorDetail


class CompletionChoice(BaseModel):
    """One choice of a completion."""

    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    """Non-streamed /v1/completions answer."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    """Non-streamed /v1/chat/completions answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    """One entry of /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "largemodel"
    max_model_len: int


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
