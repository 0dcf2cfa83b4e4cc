"""gRPC: a real channel to `largemodel.v1.Generation/Generate` and the standard health service."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from largemodel.runtime.grpc_server import SERVICE_NAME, load_stubs
from tests.support.oracle import chat_ids, decode, greedy, text_ids
from tests.support.world import RunningServer

pb2, pb2_grpc = load_stubs()


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> grpc.Channel:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as ch:
        yield ch


def test_health_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_generate_streams_one_message_per_token(channel: grpc.Channel, tiny_model: Path) -> None:
    stub = pb2_grpc.GenerationStub(channel)
    prompt = "import logging\nlog = "
    request = pb2.GenerateRequest(prompt=prompt, max_tokens=10, temperature=0, ignore_eos=True)
    messages = list(stub.Generate(request, timeout=60))
    expected = greedy(tiny_model, text_ids(tiny_model, prompt), 10)
    assert len(messages) == 10
    assert [t for m in messages for t in m.token_ids] == expected
    assert "".join(m.text for m in messages) == decode(tiny_model, expected)
    assert [m.finish_reason for m in messages] == [""] * 9 + ["length"]
    usage = messages[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        len(text_ids(tiny_model, prompt)), 10, len(text_ids(tiny_model, prompt)) + 10)


def test_generate_chat_uses_the_chat_template(channel: grpc.Channel, tiny_model: Path) -> None:
    stub = pb2_grpc.GenerationStub(channel)
    chat = [{"role": "user", "content": "Hello"}]
    request = pb2.GenerateRequest(messages=[pb2.ChatMessage(**m) for m in chat], max_tokens=6, temperature=0,
                                  ignore_eos=True)
    messages = list(stub.Generate(request, timeout=60))
    assert [t for m in messages for t in m.token_ids] == greedy(tiny_model, chat_ids(tiny_model, chat), 6)
    assert messages[-1].usage.prompt_tokens == len(chat_ids(tiny_model, chat))


def test_generate_rejects_bad_requests(channel: grpc.Channel) -> None:
    stub = pb2_grpc.GenerationStub(channel)
    for request, needle in (
        (pb2.GenerateRequest(), "exactly one of prompt or messages"),
        (pb2.GenerateRequest(prompt="hi", max_tokens=5000), "maxModelLen"),
        (pb2.GenerateRequest(prompt="hi", temperature=7), "temperature"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in (err.value.details() or "")
