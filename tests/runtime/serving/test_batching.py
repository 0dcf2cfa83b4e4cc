"""Continuous batching changes nothing: 32 concurrent greedy requests get exactly their solo tokens."""

from __future__ import annotations

import asyncio

import grpc

from largemodel.runtime.grpc_server import load_stubs
from tests.support.world import RunningServer

pb2, pb2_grpc = load_stubs()
WORDS = ["parser", "json", "logging", "wrap", "indent", "handler", "format", "argument"]


def _prompts() -> list[str]:
    # Different lengths, so prefills of different sizes join decodes already running.
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 7)) for i in range(32)]


async def _generate(stub: pb2_grpc.GenerationStub, prompt: str, max_tokens: int) -> list[int]:
    request = pb2.GenerateRequest(prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [t async for m in stub.Generate(request, timeout=120) for t in m.token_ids]


def test_concurrent_greedy_requests_equal_solo_runs(server: RunningServer) -> None:
    prompts = _prompts()
    # Varying lengths: sequences leave the batch at different steps while others keep going.
    lengths = [8 + (i % 4) * 4 for i in range(len(prompts))]

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            solo = [await _generate(stub, p, n) for p, n in zip(prompts, lengths, strict=True)]
            together = await asyncio.gather(*(_generate(stub, p, n) for p, n in zip(prompts, lengths, strict=True)))
            return solo, list(together)

    solo, together = asyncio.run(asyncio.wait_for(run(), 240))
    assert [len(t) for t in solo] == lengths
    for i, (alone, batched) in enumerate(zip(solo, together, strict=True)):
        assert batched == alone, f"request {i} ({prompts[i]!r}) differs when batched"
