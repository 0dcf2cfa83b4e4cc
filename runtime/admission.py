"""From user input to a scheduler request: tokenize, apply the chat template, fill sampling defaults.

Shared by the HTTP and gRPC front ends so both accept and refuse exactly the same requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from largemodel import metrics
from largemodel.runtime import protocol as p
from largemodel.runtime.generation import AdmissionError, GenerationRequest, QueueFullError
from largemodel.runtime.scheduler import Scheduler

T = TypeVar("T")

log = logging.getLogger(__name__)

# Below this a temperature means greedy: dividing logits by ~0 overflows to inf and NaN probabilities.
GREEDY_TEMPERATURE_EPS = 1e-5
# A prompt of more characters than this per allowed token cannot fit and is refused before the
# tokenizer spends time on it (no real tokenizer averages 32 characters per token).
_MAX_CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class SamplingDefaults:
    """Sampling used when a request leaves a field out: the model's generation_config.json."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


def load_sampling_defaults(model_dir: Path) -> SamplingDefaults:
    """Read generation_config.json: greedy when it says do_sample is false, as transformers does.

    Without the file the OpenAI default (temperature 1) applies.
    """
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return SamplingDefaults()
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("generation_config.unreadable path=%s error=%s", path, err)
        return SamplingDefaults()
    if not cfg.get("do_sample", False):
        return SamplingDefaults(temperature=0.0)
    return SamplingDefaults(
        temperature=float(cfg.get("temperature", 1.0)),
        top_p=float(cfg.get("top_p", 1.0)),
        top_k=int(cfg.get("top_k", 0) or 0),
    )


def encode_text(tokenizer: Any, text: str, max_model_len: int) -> list[int]:
    """Token ids of a completion prompt (with the tokenizer's own special tokens, e.g. BOS)."""
    _check_size(len(text), max_model_len, "prompt")
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], max_model_len: int) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, ready for the reply."""
    _check_size(sum(len(m["content"]) for m in messages), max_model_len, "messages")
    if not getattr(tokenizer, "chat_template", None):
        raise AdmissionError("this model has no chat template; use /v1/completions with a plain prompt", "messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    except Exception as err:  # noqa: BLE001 - templates raise their own errors for malformed chats
        raise AdmissionError(f"the chat template rejected these messages: {err}", "messages") from None
    # The template already wrote every special token the model expects.
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def _check_size(chars: int, max_model_len: int, param: str) -> None:
    if chars > max_model_len * _MAX_CHARS_PER_TOKEN:
        raise AdmissionError(
            f"the {param} has {chars} characters, far more than fit in maxModelLen={max_model_len} tokens", param
        )


def build_request(
    scheduler: Scheduler,
    sampling_params: Any,
    defaults: SamplingDefaults,
    prompt_tokens: list[int],
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: tuple[str, ...] = (),
    stop_token_ids: tuple[int, ...] = (),
    ignore_eos: bool = False,
    vocab_size: int | None = None,
    prompt_param: str = "prompt",
) -> GenerationRequest:
    """Check lengths against maxModelLen and fill sampling defaults; AdmissionError says what is wrong.

    `sampling_params` is the engine's SamplingParams class; a missing max_tokens means "up to
    the context limit", as OpenAI's chat API does.
    """
    if vocab_size is not None:
        bad = [t for t in prompt_tokens if t >= vocab_size]
        if bad:
            raise AdmissionError(f"prompt token id {bad[0]} is out of range; the vocabulary has {vocab_size}", "prompt")
    limit = scheduler.check_lengths(len(prompt_tokens), max_tokens, prompt_param)
    temperature = defaults.temperature if temperature is None else float(temperature)
    sampling = sampling_params(
        temperature=0.0 if temperature < GREEDY_TEMPERATURE_EPS else temperature,
        top_k=defaults.top_k if top_k is None else max(0, int(top_k)),
        top_p=defaults.top_p if top_p is None else float(top_p),
        seed=seed,
    )
    return GenerationRequest(
        prompt_tokens=prompt_tokens,
        max_tokens=limit,
        sampling=sampling,
        stop=tuple(s for s in stop if s),
        stop_token_ids=stop_token_ids,
        ignore_eos=ignore_eos,
    )


async def off_loop(state: Any, fn: Callable[..., T], *args: Any) -> T:
    """Run tokenizer work on the state's tokenizer thread, never on the event loop.

    One thread: a Rust tokenizer must not be used from two threads at once (the engine thread has
    its own). Requests waiting for it are capped, so a flood is refused (429) rather than queued.
    """
    if state.tokenizing >= state.max_tokenizing:
        metrics.REQUESTS.labels(status=metrics.STATUS_REJECTED).inc()
        raise QueueFullError(f"{state.tokenizing} requests are waiting to be tokenized; retry later", retry_after_s=1)
    state.tokenizing += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(state.tokenizer_pool, fn, *args)
    finally:
        state.tokenizing -= 1


def sampling_request(state: Any, body: p._SamplingFields, tokens: list[int], max_tokens: int | None,
                     prompt_param: str = "prompt") -> GenerationRequest:
    """The scheduler request of a validated body and its prompt tokens."""
    return build_request(
        state.scheduler, state.sampling_params, state.defaults, tokens,
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        seed=body.seed, stop=body.stop_strings(), stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos, vocab_size=state.vocab_size, prompt_param=prompt_param,
    )


async def completion_request(state: Any, body: p.CompletionRequest,
                             default_max_tokens: int | None = p.COMPLETION_DEFAULT_MAX_TOKENS) -> GenerationRequest:
    """Tokenize (off the loop) and admit-check a completion body; AdmissionError says what is wrong."""
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, str):
        tokens = await off_loop(state, encode_text, state.tokenizer, prompt, state.max_model_len)
    else:
        tokens = [int(t) for t in prompt]
    limit = body.max_tokens if body.max_tokens is not None else default_max_tokens
    return sampling_request(state, body, tokens, limit)


async def chat_request(state: Any, body: p.ChatCompletionRequest) -> GenerationRequest:
    """Render the chat template and tokenize (off the loop), then admit-check; AdmissionError says what is wrong."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    tokens = await off_loop(state, encode_chat, state.tokenizer, messages, state.max_model_len)
    return sampling_request(state, body, tokens, body.token_limit(), "messages")
