"""A property test of gRPC Generate: every message gets OK or INVALID_ARGUMENT, exactly as HTTP answers.

Hypothesis builds GenerateRequests over the whole field space (both or neither of prompt and
messages, unknown roles, NaN and infinite floats, uint32 and uint64 extremes, long stop lists);
the same request is sent as JSON to the HTTP API. gRPC must accept it exactly when HTTP does
(issue 14, defect 3), never answer INTERNAL or UNKNOWN, and the group must serve afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from largemodel.runtime.grpc_server import load_stubs
from tests.support.world import RunningServer, post_json

pb2, pb2_grpc = load_stubs()

_text = st.text(max_size=24)
_floats = st.none() | st.floats(width=32) | st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5, -1.0])
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", ""]),
                                  "content": _text})


@st.composite
def generate_requests(draw: st.DrawFn) -> dict[str, Any]:
    """GenerateRequest fields as a dict (unset optional fields left out)."""
    shape = draw(st.sampled_from(["prompt", "messages", "both", "neither"]))
    fields: dict[str, Any] = {
        "max_tokens": draw(st.sampled_from([0, 1, 3]) | st.integers(0, 2**32 - 1)),
        "stop": draw(st.lists(st.text(max_size=300), max_size=20)),
        "ignore_eos": draw(st.booleans()),
    }
    if shape in ("prompt", "both"):
        fields["prompt"] = draw(_text)
    if shape in ("messages", "both"):
        fields["messages"] = draw(st.lists(_message, max_size=4))
    for name, value in (("temperature", draw(_floats)), ("top_p", draw(_floats)),
                        ("top_k", draw(st.none() | st.integers(0, 2**32 - 1))),
                        ("seed", draw(st.none() | st.integers(0, 2**64 - 1)))):
        if value is not None:
            fields[name] = value
    return fields


def _http_body(fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The HTTP request gRPC's fields stand for (0 / empty = unset, as the proto says)."""
    body = {k: v for k, v in fields.items() if k in ("temperature", "top_p", "top_k", "seed", "ignore_eos")}
    if fields["max_tokens"]:
        body["max_tokens"] = fields["max_tokens"]
    if fields["stop"]:
        body["stop"] = fields["stop"]
    prompt, messages = fields.get("prompt", ""), fields.get("messages", [])
    if bool(prompt) == bool(messages):
        return "", body  # HTTP has no request with both or neither: gRPC must refuse it
    if prompt:
        if not fields["max_tokens"]:
            # gRPC's 0 is "up to the context limit", which any prompt that fits allows; so does 1.
            body["max_tokens"] = 1
        return "/v1/completions", {**body, "prompt": prompt}
    return "/v1/chat/completions", {**body, "messages": messages}


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb2_grpc.GenerationStub(channel)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(fields=generate_requests())
def test_grpc_accepts_exactly_what_http_accepts(server: RunningServer, stub: Any, fields: dict[str, Any]) -> None:
    grpc_fields = dict(fields)
    if "messages" in grpc_fields:
        grpc_fields["messages"] = [pb2.ChatMessage(**m) for m in grpc_fields["messages"]]
    request = pb2.GenerateRequest(**grpc_fields)
    try:
        replies = list(stub.Generate(request, timeout=60))
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code, replies = err.code(), []
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, fields)
    if code == grpc.StatusCode.OK:
        assert replies and replies[-1].finish_reason in ("stop", "length")
    path, body = _http_body(fields)
    if not path:
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        return
    # NaN and Infinity travel as Python's json writes them (NaN, Infinity), which the server parses.
    status, answer = post_json(f"{server.base_url}{path}", body)
    assert status in (200, 400), (status, answer)
    assert (status == 200) == (code == grpc.StatusCode.OK), (status, answer, code, fields)


def test_the_group_serves_after_the_fuzzing(server: RunningServer, stub: Any) -> None:
    replies = list(stub.Generate(pb2.GenerateRequest(prompt="hello", max_tokens=3, ignore_eos=True), timeout=60))
    assert replies[-1].finish_reason == "length" and replies[-1].usage.completion_tokens == 3
    assert server.proc.poll() is None
