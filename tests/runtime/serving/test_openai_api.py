"""The OpenAI-compatible HTTP API through the real `openai` client against a pp=2 rank group."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.support.oracle import chat_ids, decode, greedy, text_ids
from tests.support.world import RunningServer, post_json

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a parser."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_matches_transformers_with_exact_usage(
    client: openai.OpenAI, server: RunningServer, tiny_model: Path
) -> None:
    reply = client.chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt = chat_ids(tiny_model, MESSAGES)
    assert reply.choices[0].message.content == decode(tiny_model, greedy(tiny_model, prompt, 12))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, server: RunningServer) -> None:
    args = {"model": server.model, "messages": MESSAGES, "max_tokens": 16, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    assert len({c.id for c in chunks}) == 1


def test_completion_streaming_and_not(client: openai.OpenAI, server: RunningServer, tiny_model: Path) -> None:
    prompt = "import json\ndef load("
    expected = decode(tiny_model, greedy(tiny_model, text_ids(tiny_model, prompt), 10))
    whole = client.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected
    assert whole.usage is not None and whole.usage.prompt_tokens == len(text_ids(tiny_model, prompt))
    streamed = client.completions.create(model=server.model, prompt=prompt, max_tokens=10, temperature=0,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_stop_string_cuts_output_in_both_modes(client: openai.OpenAI, server: RunningServer, tiny_model: Path) -> None:
    full = decode(tiny_model, greedy(tiny_model, chat_ids(tiny_model, MESSAGES), 24))
    start = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[start:start + 2]
    expected = full[: full.find(stop)]
    args = {"model": server.model, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "stop": [stop],
            "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.chat.completions.create(stream=True, **args))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_stop_token_ends_generation_and_is_counted(server: RunningServer, tiny_model: Path) -> None:
    prompt = text_ids(tiny_model, "class Parser:")
    ids = greedy(tiny_model, prompt, 8)
    stop_id = ids[3]
    cut = ids.index(stop_id)
    status, body = post_json(f"{server.base_url}/v1/completions", {
        "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop_token_ids": [stop_id], "ignore_eos": True})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert body["usage"]["completion_tokens"] == cut + 1  # type: ignore[index]
    assert body["choices"][0]["text"] == decode(tiny_model, ids[:cut])  # type: ignore[index]


def test_limits_and_bad_input_get_openai_errors(client: openai.OpenAI, server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=server.model, prompt=[5] * 300, max_tokens=1)
    assert "128" in too_long.value.message and "maxModelLen" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=server.model, messages=MESSAGES, max_tokens=1000)
    assert too_many.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert unknown.value.code == "model_not_found"
    status, body = post_json(f"{server.base_url}/v1/completions", {"prompt": "x", "max_tokens": "many"})
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    assert body["error"]["param"] == "max_tokens"  # type: ignore[index]
    status, body = post_json(f"{server.base_url}/v1/nope", {})
    assert status == 404 and "error" in body


def test_models_probes_metrics_and_openapi(client: openai.OpenAI, server: RunningServer) -> None:
    client.completions.create(model=server.model, prompt="x", max_tokens=12, extra_body={"ignore_eos": True})
    assert [m.id for m in client.models.list()] == [server.model]
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(server.base_url + path, timeout=10) as resp:
            assert resp.status == 200
    with urllib.request.urlopen(server.base_url + "/openapi.json", timeout=10) as resp:
        doc = json.loads(resp.read())
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(doc["paths"])
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['largemodel_requests_total{status="ok"}'] >= 1
    assert samples["largemodel_time_to_first_token_seconds_count"] >= 1
    assert samples["largemodel_generation_tokens_total"] >= 12
    assert samples["largemodel_queue_capacity"] == 24
