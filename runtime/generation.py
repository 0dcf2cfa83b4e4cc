"""What a generation request is, how the scheduler refuses one, and how its output reaches the client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from largemodel.runtime.engine import SamplingParams

FinishReason = str  # "stop" | "length" | "abort" | "error"


class AdmissionError(Exception):
    """A request the scheduler will not take; `status` is the HTTP status that says why."""

    status = 400
    code = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(AdmissionError):
    """Every batch slot is busy and the waiting queue is at serving.maxQueue."""

    status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnavailableError(AdmissionError):
    """The server is draining for shutdown, or its engine failed."""

    status = 503
    code = "unavailable"


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized request: what the HTTP and gRPC layers hand to the scheduler."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class Chunk:
    """Text and tokens produced by one step for one request; the last one has a finish_reason."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int


class RequestStream:
    """Async iterator over the chunks of one request; `cancel()` when the client goes away."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prompt_tokens: int) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[Chunk] = asyncio.Queue()
        self.prompt_tokens = prompt_tokens
        self.cancelled = False
        self.finished = False

    def push(self, chunk: Chunk) -> None:
        """Deliver a chunk; safe to call from the engine thread."""
        # After shutdown the loop may be closed: nobody is left to read the chunk.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)

    def cancel(self) -> None:
        """Stop generating for this request at the next step."""
        self.cancelled = True

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Chunk]:
        while not self.finished:
            chunk = await self._queue.get()
            if chunk.finish_reason is not None:
                self.finished = True
            yield chunk
