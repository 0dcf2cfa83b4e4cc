"""Continuous batching changes nothing: 32 concurrent greedy requests get exactly their solo tokens,
and the scheduler really batched them (its batch-size histogram says so), not ran them one by one."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from largemodel.runtime.grpc_server import load_stubs
from tests.support.world import RunningServer

pb2, pb2_grpc = load_stubs()


def _batch_sizes(server: RunningServer) -> tuple[float, float]:
    """(engine submits, sequences in them) so far, from largemodel_batch_sequences on /metrics."""
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) if f.name == "largemodel_batch_sequences"
              for s in f.samples}
    return values["largemodel_batch_sequences_count"], values["largemodel_batch_sequences_sum"]
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

    counts: list[tuple[float, float]] = []

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            solo = [await _generate(stub, p, n) for p, n in zip(prompts, lengths, strict=True)]
            counts.append(_batch_sizes(server))
            together = await asyncio.gather(*(_generate(stub, p, n) for p, n in zip(prompts, lengths, strict=True)))
            counts.append(_batch_sizes(server))
            return solo, list(together)

    solo, together = asyncio.run(asyncio.wait_for(run(), 240))
    submits, sequences = counts[1][0] - counts[0][0], counts[1][1] - counts[0][1]
    # Every generated token is one sequence in one engine submit (the prefill yields the first).
    assert sequences == sum(lengths), (submits, sequences)
    # One by one, there would be one submit per sequence-step (submits == sequences); batched, a step
    # carries many (measured 122 submits for 448 here: the slots cap a batch, pp=2 splits it over lanes).
    assert submits <= sequences / 2, f"{submits:.0f} engine submits for {sequences:.0f} sequence-steps: not batched"
    assert [len(t) for t in solo] == lengths
    for i, (alone, batched) in enumerate(zip(solo, together, strict=True)):
        assert batched == alone, f"request {i} ({prompts[i]!r}) differs when batched"
