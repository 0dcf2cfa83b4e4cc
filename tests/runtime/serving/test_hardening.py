"""Issue 14: hostile and careless input against a real rank group, each numbered defect reproduced.

Every request here once either stopped the group, blocked the event loop, answered text/plain
500, or held a connection open without end. Now each gets a bounded, counted, OpenAI-style
answer and the group keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from starlette.testclient import TestClient

from largemodel.runtime.grpc_server import load_stubs
from largemodel.runtime.http_api import create_app
from tests.support.world import RunningServer, post_json

pb2, pb2_grpc = load_stubs()

HUGE = 2**63  # one past int64: what overflowed the engine's step plan


def _metric(server: RunningServer, name: str) -> float:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{") and line.split(" ")[0] == name)


def _requests_total(server: RunningServer, status: str) -> float:
    return _metric(server, f'largemodel_requests_total{{status="{status}"}}')


def _post_raw(server: RunningServer, path: str, data: bytes, timeout: float = 30) -> tuple[int, str, bytes]:
    request = urllib.request.Request(server.base_url + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def _still_serves(server: RunningServer) -> None:
    status, body = post_json(f"{server.base_url}/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert status == 200, body
    assert server.proc.poll() is None


# ---- defect 2: numbers that overflowed the engine's int64 step plan ----------------------------

@pytest.mark.parametrize("field", [
    {"top_k": HUGE}, {"top_k": 2**31}, {"seed": 2**64}, {"max_tokens": HUGE}, {"stop_token_ids": [HUGE]},
    {"prompt": [HUGE]}, {"prompt": [2**31]}, {"temperature": 1e308}, {"top_p": 1e-400},
])
def test_out_of_range_numbers_are_the_request_s_400_not_the_group_s_death(server: RunningServer,
                                                                         field: dict[str, Any]) -> None:
    body = {"prompt": "hello", "max_tokens": 2, **field}
    status, answer = post_json(f"{server.base_url}/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    _still_serves(server)


def test_non_finite_floats_are_refused(server: RunningServer) -> None:
    for raw in (b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "top_p": Infinity}',
                b'{"prompt": "hi", "temperature": -Infinity}'):
        status, ctype, data = _post_raw(server, "/v1/completions", raw)
        assert status == 400 and ctype.startswith("application/json"), data
    _still_serves(server)


def test_largest_allowed_top_k_runs(server: RunningServer) -> None:
    status, body = post_json(f"{server.base_url}/v1/completions",
                             {"prompt": "hello", "max_tokens": 2, "top_k": 2**31 - 1, "temperature": 1, "seed": 2**63 - 1})
    assert status == 200, body


def test_engine_refuses_what_it_cannot_encode_without_touching_the_group() -> None:
    """The engine's own guard, for any front end that skipped the API's bounds."""
    from largemodel.runtime.engine import Engine, EngineError, SamplingParams, SeqInput

    engine = Engine.__new__(Engine)  # validate() reads only the limits: no model, no group needed
    engine.max_batch_size, engine.max_model_len, engine.vocab_size = 2, 16, 10
    for sampling in (SamplingParams(top_k=HUGE), SamplingParams(seed=HUGE), SamplingParams(temperature=float("nan")),
                     SamplingParams(top_p=float("nan"))):
        with pytest.raises(EngineError):
            Engine.validate(engine, [SeqInput(slot=0, tokens=[1, 2], start_pos=0, sampling=sampling)])
    with pytest.raises(EngineError, match="vocabulary"):
        Engine.validate(engine, [SeqInput(slot=0, tokens=[HUGE], start_pos=0)])
    Engine.validate(engine, [SeqInput(slot=0, tokens=[1, 2], start_pos=0, sampling=SamplingParams(top_k=5, seed=7))])


# ---- defect 5: lone surrogates -----------------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": ["\ud800"]}),
    ("/v1/completions", {"prompt": "a\udfffb"}),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}),
])
def test_lone_surrogates_get_a_counted_json_400(server: RunningServer, path: str, body: dict[str, Any]) -> None:
    before = _requests_total(server, "invalid")
    status, ctype, data = _post_raw(server, path, json.dumps(body).encode())  # json.dumps escapes: \ud800
    assert status == 400, data
    assert ctype.startswith("application/json")
    error = json.loads(data)["error"]
    assert re.search("surrogate|unicode", error["message"]) and error["type"] == "invalid_request_error"
    assert _requests_total(server, "invalid") == before + 1
    _still_serves(server)


def test_unknown_routes_and_methods_are_json_and_counted(server: RunningServer) -> None:
    before = _requests_total(server, "invalid")
    status, ctype, data = _post_raw(server, "/v1/nope", b"{}")
    assert status == 404 and ctype.startswith("application/json") and "error" in json.loads(data)
    status, ctype, data = _post_raw(server, "/v1/models", b"{}")
    assert status == 405 and ctype.startswith("application/json")
    assert _requests_total(server, "invalid") == before + 2


# ---- defect 4: bounded work before any is done, tokenizing off the loop ------------------------

def test_oversized_bodies_are_refused_before_parsing(server: RunningServer) -> None:
    before = _requests_total(server, "invalid")
    # Refused on the declared length, before a byte of the body is read (the server then closes,
    # so a client still sending would see a reset: this one sends the head only).
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5242880\r\n\r\n")
        closed, data = _closed_within(sock, 5)
    assert closed and data.startswith(b"HTTP/1.1 413"), data[:200]
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"application/json" in head
    assert json.loads(payload)["error"]["code"] == "body_too_large"
    assert _requests_total(server, "invalid") == before + 1
    _still_serves(server)


def test_message_count_and_token_list_are_bounded(server: RunningServer) -> None:
    # 100k empty messages (3.3 MB) once blocked the event loop for seconds.
    many = json.dumps({"messages": [{"role": "user", "content": ""}] * 100_000}).encode()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post_raw, server, "/v1/chat/completions", many)
        # The health check answers meanwhile (the body is refused on its size or count, never tokenized).
        began = time.monotonic()
        with urllib.request.urlopen(server.base_url + "/healthz", timeout=10) as resp:
            assert resp.status == 200
        assert time.monotonic() - began < 3
        status, _ctype, data = pending.result(60)
    assert status == 400 and b"messages" in data, data[:300]
    ids = json.dumps({"prompt": [1] * 140_000, "max_tokens": 1}).encode()
    status, _ctype, data = _post_raw(server, "/v1/completions", ids)
    assert status == 400 and b"prompt" in data
    _still_serves(server)


def test_tokenizing_runs_off_the_event_loop() -> None:
    """admission.off_loop: a slow tokenizer call leaves the loop free, on the one tokenizer thread."""
    from largemodel.runtime.admission import off_loop

    class _State:
        tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        tokenizing, max_tokenizing = 0, 2

    def slow(x: int) -> str:
        time.sleep(0.4)
        return threading.current_thread().name

    async def main() -> tuple[list[str], float]:
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            for _ in range(40):
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - last)
                last = time.monotonic()

        names = await asyncio.gather(off_loop(_State, slow, 1), off_loop(_State, slow, 2), tick())
        return [n for n in names if isinstance(n, str)], max(gaps)

    names, worst_gap = asyncio.run(main())
    assert all(n.startswith("tokenize") for n in names) and len(names) == 2
    assert worst_gap < 0.2
    _State.tokenizer_pool.shutdown()


# ---- defect 6: read timeouts (the shared server runs with 2 s head and body timeouts) -----------

def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(closed by the server within `seconds`, what it sent first)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
        return True, data
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        return True, data


def test_idle_and_slowloris_connections_are_closed(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as idle:
        assert _closed_within(idle, 6)[0], "an idle connection stayed open"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        began = time.monotonic()
        closed = False
        while time.monotonic() - began < 8:
            try:
                slow.sendall(b"X-a: b\r\n")  # one header line per 0.5 s, never the blank line
            except OSError:
                closed = True
                break
            time.sleep(0.5)
        closed = closed or _closed_within(slow, 1)[0]
        assert closed and time.monotonic() - began < 8, "a slowloris head was not cut off"
    _still_serves(server)


def test_a_stalled_body_gets_408_and_the_connection_closes(server: RunningServer) -> None:
    before = _requests_total(server, "invalid")
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as stalled:
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        closed, data = _closed_within(stalled, 8)
    assert closed and data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"request_timeout"' in data
    assert _requests_total(server, "invalid") == before + 1


def test_the_pod_metrics_port_closes_idle_and_slow_connections(server: RunningServer) -> None:
    ports = [int(p) for p in re.findall(r"run.start_node stage=\d+ metrics_port=(\d+)", server.log_text())]
    assert ports
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=5) as idle:
        began = time.monotonic()
        assert _closed_within(idle, 12)[0], "the metrics port kept an idle connection"
        assert time.monotonic() - began < 12
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/healthz", timeout=10) as resp:
        assert resp.status == 200


def test_guarded_server_caps_connections_and_time() -> None:
    from http.server import BaseHTTPRequestHandler

    from largemodel.runtime.httpguard import GuardedHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = GuardedHTTPServer(("127.0.0.1", 0), Handler, read_timeout_s=10, connection_s=3, max_connections=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        began = time.monotonic()
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        for sock in held:  # a slowloris head: never finished, and each read is within the read timeout
            sock.sendall(b"GET / HTTP/1.1\r\n")
        while len(server._open) < 2 and time.monotonic() - began < 5:
            time.sleep(0.05)
        # Past the cap a connection is closed at once, long before the 3 s connection deadline.
        third = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _closed_within(third, 2)[0], "a connection past the cap was served"
        # The held ones are cut at their deadline although each read kept within the read timeout.
        for sock in held:
            assert _closed_within(sock, 6)[0]
        assert time.monotonic() - began < 8
        # The cut connections leave the count once their handler threads finish; only then is a
        # slot free (on a loaded machine that can trail the client seeing the close).
        settle = time.monotonic() + 5
        while len(server._open) >= 2 and time.monotonic() < settle:
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.read() == b"ok"
    finally:
        server.shutdown()
        server.server_close()


# ---- defect 3: gRPC accepts and refuses exactly what HTTP does ---------------------------------

def _grpc_status(server: RunningServer, request: Any) -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        try:
            list(pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_grpc_refuses_what_http_refuses(server: RunningServer) -> None:
    cases = [{"stop": ["x"] * 100_000}, {"stop": ["y" * 300]}, {"seed": 2**64 - 1}, {"top_p": 0.0},
             {"temperature": float("nan")}, {"top_k": 2**31}]
    started = time.monotonic()
    for fields in cases:
        status = _grpc_status(server, pb2.GenerateRequest(prompt="hi", max_tokens=2, **fields))
        assert status == grpc.StatusCode.INVALID_ARGUMENT, fields.keys()
    # The 100k stop list once cost 40 s of engine time; now it is refused at once.
    assert time.monotonic() - started < 20
    roles = pb2.GenerateRequest(messages=[pb2.ChatMessage(role="robot", content="hi")], max_tokens=2)
    assert _grpc_status(server, roles) == grpc.StatusCode.INVALID_ARGUMENT
    many = pb2.GenerateRequest(messages=[pb2.ChatMessage(role="user", content="")] * 3000, max_tokens=2)
    assert _grpc_status(server, many) == grpc.StatusCode.INVALID_ARGUMENT
    ok = pb2.GenerateRequest(prompt="hi", max_tokens=2, seed=2**63 - 1, top_k=2**31 - 1, temperature=1)
    assert _grpc_status(server, ok) == grpc.StatusCode.OK


# ---- (B) docs off unless asked, optional API key ----------------------------------------------

class _State:
    model_name, created, max_model_len = "m", 0, 16

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.invalid = 0

    def count_invalid(self) -> None:
        self.invalid += 1

    def count_error(self) -> None:
        self.invalid += 1


def test_docs_and_openapi_are_off_unless_asked() -> None:
    closed = TestClient(create_app(_State()))
    for path in ("/docs", "/redoc", "/openapi.json"):
        reply = closed.get(path)
        assert reply.status_code == 404 and "error" in reply.json(), path
    opened = TestClient(create_app(_State(), docs=True))
    assert opened.get("/openapi.json").status_code == 200
    assert opened.get("/docs").status_code == 200


def test_api_key_guards_v1_with_an_openai_401() -> None:
    state = _State(api_key="k-123")
    client = TestClient(create_app(state))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-123"}):
        reply = client.get("/v1/models", headers=headers)
        assert reply.status_code == 401
        assert reply.json()["error"]["type"] == "authentication_error"
        assert reply.json()["error"]["code"] == "invalid_api_key"
    assert state.invalid == 3
    assert client.get("/v1/models", headers={"Authorization": "Bearer k-123"}).json()["data"][0]["id"] == "m"


def test_grpc_api_key_is_checked_before_any_work() -> None:
    """With an API key, Generate without `authorization: Bearer <key>` metadata is UNAUTHENTICATED."""
    from largemodel.runtime.grpc_server import start_grpc_server
    from largemodel.runtime.local import free_port

    class _Scheduler:
        def submit(self, request: Any) -> Any:
            raise AssertionError("an unauthenticated call reached the scheduler")

    state = _State(api_key="k-123")
    state.scheduler = _Scheduler()  # type: ignore[attr-defined]
    port = free_port()

    async def main() -> list[grpc.StatusCode]:
        server, _health = await start_grpc_server(state, "127.0.0.1", port)
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb2_grpc.GenerationStub(channel)
                for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "k-123"),)):
                    try:
                        async for _ in stub.Generate(pb2.GenerateRequest(prompt="hi"), metadata=metadata, timeout=10):
                            pass
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as err:
                        codes.append(err.code())
        finally:
            await server.stop(0)
        return codes

    assert asyncio.run(main()) == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert state.invalid == 3


def test_a_chunked_body_past_the_cap_gets_413_without_a_declared_length(server: RunningServer) -> None:
    """No Content-Length to refuse on: the guard counts the chunks as they arrive and stops at the cap."""
    before = _requests_total(server, "invalid")
    chunk = b"[" + b"1," * (512 * 1024) + b"1]"  # ~1 MiB of JSON per chunk, 5 chunks past the 4 MiB cap
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(5):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before the last chunk: that is the point
        closed, data = _closed_within(sock, 10)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert json.loads(data.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"
    assert _requests_total(server, "invalid") == before + 1
    _still_serves(server)


def test_a_flood_waiting_for_the_tokenizer_is_refused_with_429() -> None:
    """More requests waiting for the one tokenizer thread than max_tokenizing: the next is a 429
    (QueueFullError with Retry-After), counted as rejected, while those already waiting finish."""
    from largemodel import metrics
    from largemodel.runtime.admission import off_loop
    from largemodel.runtime.generation import QueueFullError

    class _State:
        tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        tokenizing, max_tokenizing = 0, 2

    def slow(x: int) -> int:
        time.sleep(0.3)
        return x

    rejected = metrics.REQUESTS.labels(status=metrics.STATUS_REJECTED)
    before = rejected._value.get()

    async def main() -> list[Any]:
        waiting = [asyncio.ensure_future(off_loop(_State, slow, i)) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as err:
            await off_loop(_State, slow, 3)
        assert err.value.retry_after_s >= 1
        return list(await asyncio.gather(*waiting))

    assert asyncio.run(main()) == [0, 1]
    assert rejected._value.get() == before + 1
    assert _State.tokenizing == 0
    _State.tokenizer_pool.shutdown()


def test_api_key_against_a_real_group(tiny_model: Any, tmp_path: Any) -> None:
    """API_KEY_FILE as the operator mounts it, through `largemodel run` into the stage-0 rank: /v1 over
    HTTP and gRPC needs the bearer token (OpenAI 401 / UNAUTHENTICATED); health and metrics do not."""
    from tests.support.world import start_run, write_largemodel

    key_file = tmp_path / "apiKey"
    key_file.write_text("s3cret-key\n")
    running = start_run(write_largemodel(tmp_path / "tiny.yaml", "tiny", tiny_model), tmp_path / "run.log",
                        env={"API_KEY_FILE": str(key_file)})
    try:
        body = json.dumps({"prompt": "hello", "max_tokens": 2}).encode()

        def post(headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
            request = urllib.request.Request(running.base_url + "/v1/completions", data=body, method="POST",
                                             headers={"Content-Type": "application/json", **headers})
            try:
                with urllib.request.urlopen(request, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())

        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}):
            status, answer = post(headers)
            assert status == 401, (headers, answer)
            assert answer["error"]["type"] == "invalid_request_error" or answer["error"]["code"], answer
        status, answer = post({"Authorization": "Bearer s3cret-key"})
        assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer
        with urllib.request.urlopen(running.base_url + "/healthz", timeout=10) as resp:
            assert resp.status == 200
        with grpc.insecure_channel(f"127.0.0.1:{running.grpc_port}") as channel:
            stub = pb2_grpc.GenerationStub(channel)
            request = pb2.GenerateRequest(prompt="hello", max_tokens=2)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            chunks = list(stub.Generate(request, timeout=60, metadata=(("authorization", "Bearer s3cret-key"),)))
            assert chunks
    finally:
        assert running.stop() == 0, running.log_text()[-3000:]
