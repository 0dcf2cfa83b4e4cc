"""OpenAI-compatible request and response bodies (the subset this server implements).

Requests are validated here so every bad field becomes a 400 with an OpenAI error body; fields
OpenAI defines but this server cannot honour are accepted only at their neutral value and
otherwise refused by name, never silently ignored. Unknown fields are ignored, as OpenAI
clients send newer fields (`store`, `metadata`, ...) that do not change generation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

# Stop strings: OpenAI allows 4; a few more cost nothing and help prompt formats with many turns.
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
# Every number that reaches the engine is bounded here, so nothing the engine encodes can overflow
# (issue 14: top_k = 2**63 overflowed the int64 step plan and stopped the group).
MAX_INT32 = 2**31 - 1
MAX_SEED = 2**63 - 1
# Bounds on how much work one request can ask of the event loop before it is refused; the body
# itself is capped by the server (ServerSettings.max_body_bytes) before it is parsed.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
MAX_PROMPT_TOKEN_IDS = 131072
MAX_NAME_LENGTH = 256


def _valid_unicode(value: str) -> str:
    # JSON may escape lone surrogates ("\ud800"); no tokenizer (and no UTF-8 answer) can carry them.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"contains a lone surrogate at position {err.start}; text must be valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]
Name = Annotated[str, Field(max_length=MAX_NAME_LENGTH), AfterValidator(_valid_unicode)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT32)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH), AfterValidator(_valid_unicode)]


def _is_union_tag(part: object) -> bool:
    # pydantic names union branches in error locations ("constrained-str", "list[constrained-int]").
    return isinstance(part, str) and ("[" in part or "-" in part or part in {"str", "int", "float", "bool"})


def validation_message(errors: Iterable[Mapping[str, Any]]) -> tuple[str, str | None]:
    """(message, param) of pydantic validation errors, as HTTP and gRPC both report them."""
    by_loc: dict[str, list[str]] = {}
    for item in errors:
        if item.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {item.get('ctx', {}).get('error', 'parse error')}", None
        loc = [str(x) for x in item.get("loc", ()) if x != "body" and not _is_union_tag(x)]
        msg = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        messages = by_loc.setdefault(".".join(loc) or "body", [])
        if msg not in messages:
            messages.append(msg)
    param = next(iter(by_loc), None)
    text = "; ".join(f"{loc}: {' or '.join(msgs)}" for loc, msgs in by_loc.items())
    return text or "invalid request body", None if param == "body" else (param or "").split(".")[0] or None


class _Body(BaseModel):
    # Strict: `"max_tokens": true` or `"stream": "yes"` is a client bug to report, not to coerce.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    """`stream_options`: include_usage adds a last chunk with the usage counts."""

    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Name | None = Field(default=None, description="Served model id (see /v1/models); optional.")
    max_tokens: int | None = Field(
        default=None, ge=1, le=MAX_INT32,
        description="Tokens to generate at most; default 16 for completions (as OpenAI), the rest of the context for chat.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="0 = greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT32,
                              description="Extension: keep the k most likely tokens; 0/-1 = all.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = Field(
        default=None, description="Up to 16 strings; generation stops before the first one.")
    stop_token_ids: list[TokenId] | None = Field(
        default=None, max_length=64, description="Extension: token ids that end generation."
    )
    ignore_eos: bool = Field(default=False, description="Extension: keep generating past end-of-sequence.")
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: Name | None = None

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

    prompt: Annotated[Text, Field(min_length=1)] | Annotated[
        list[TokenId], Field(max_length=MAX_PROMPT_TOKEN_IDS)
    ] | list[Text] = Field(
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
    text: Text


class ChatMessage(_Body):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: Name | None = None

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT32)
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
