"""The group's rendezvous store admits only ranks holding the group secret (issue 14)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from largemodel.runtime import rendezvous
from largemodel.runtime.local import free_port
from largemodel.runtime.rendezvous import GREETING, NONCE, GroupStore, StoreServer
from tests.support.rank_world import child_env

SECRET = b"0123456789abcdef-group-secret"
SHORT = timedelta(seconds=5)


@pytest.fixture
def server() -> Iterator[StoreServer]:
    served = StoreServer.serve("127.0.0.1", 0, SECRET)
    yield served
    served.close()


def port_of(server: StoreServer) -> int:
    return int(server.listener.getsockname()[1])


def until(predicate: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.02)
    return False


def test_every_store_operation_torch_uses(server: StoreServer) -> None:
    """set/get/add/compare_set/wait/check/delete_key/num_keys behave as torch's TCPStore does."""
    store = GroupStore("127.0.0.1", port_of(server), SECRET, SHORT)
    other = GroupStore("127.0.0.1", port_of(server), SECRET, SHORT)
    store.set("a", "one")
    assert other.get("a") == b"one"
    store.set("b", b"\x00\xffbinary")
    assert other.get("b") == b"\x00\xffbinary"
    assert store.add("n", 2) == 2 and other.add("n", 5) == 7 and store.get("n") == b"7"
    assert store.compare_set("c", "", "first") == b"first"  # a missing key matches an empty expected value
    assert store.compare_set("c", "wrong", "second") == b"first"
    assert store.compare_set("c", "first", "second") == b"second"
    assert store.compare_set("missing", "x", "y") == b"x" and not store.check(["missing"])
    assert store.check(["a", "b"]) and not store.check(["a", "nope"])
    assert store.num_keys() == 4
    assert store.delete_key("a") and not store.delete_key("a")
    store.wait(["b", "c"])
    began = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="timed out"):
        store.wait(["never"], timedelta(seconds=0.3))
    assert time.monotonic() - began < 3
    # get blocks until another rank sets the key, as gloo's rendezvous needs
    pending = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from datetime import timedelta
        from largemodel.runtime.rendezvous import GroupStore
        time.sleep(0.5)
        GroupStore("127.0.0.1", {port_of(server)}, {SECRET!r}, timedelta(seconds=5)).set("late", "here")
    """)], env=child_env())
    try:
        assert other.get("late") == b"here"
    finally:
        pending.wait(timeout=30)
    # torch's PrefixStore wraps it the way init_process_group and new_group do
    prefixed = dist.PrefixStore("group1", store)
    prefixed.set("k", "v")
    assert other.get("group1/k") == b"v"


def test_a_wrong_secret_is_refused_at_once(server: StoreServer) -> None:
    began = time.monotonic()
    with pytest.raises(PermissionError, match="group secret"):
        GroupStore("127.0.0.1", port_of(server), b"not the secret", timedelta(seconds=30))
    assert time.monotonic() - began < 5  # refused, not retried until the rendezvous timeout
    assert until(lambda: server.strangers == 1)
    # nor does a rank trust an impostor rank 0 that lacks the secret
    impostor = StoreServer.serve("127.0.0.1", 0, b"impostor")
    try:
        with pytest.raises(PermissionError):
            GroupStore("127.0.0.1", port_of(impostor), SECRET, timedelta(seconds=30))
    finally:
        impostor.close()


def test_strangers_are_dropped_and_the_store_serves_on(server: StoreServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare connect, junk, a forged proof, silence, a flood: dropped, counted, no data reached."""
    monkeypatch.setattr(rendezvous, "HANDSHAKE_TIMEOUT_S", 0.5)
    store = GroupStore("127.0.0.1", port_of(server), SECRET, SHORT)
    store.set("addr", "10.0.0.1:1234")
    port = port_of(server)
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    for junk in (b"junk\n", b"\x00" * (NONCE + 32), bytes(range(256)), b"\xff" * 100_000):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            greeting = sock.recv(len(GREETING) + NONCE)
            assert greeting.startswith(GREETING)  # all a stranger ever learns
            try:
                sock.sendall(junk)
                assert sock.recv(64) == b""  # closed, nothing answered
            except (ConnectionResetError, BrokenPipeError):
                pass
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(rendezvous.MAX_PENDING + 4)]
    assert store.get("addr") == b"10.0.0.1:1234"  # a rank's own session is never stalled by them
    assert until(lambda: server.strangers >= 5 + len(silent), timeout_s=10)
    for sock in silent:
        sock.close()
    late = GroupStore("127.0.0.1", port, SECRET, SHORT)  # a pending slot frees once a stranger is gone
    assert late.get("addr") == b"10.0.0.1:1234"
    assert server.data.keys() == {b"addr"}


def test_a_forged_or_replayed_frame_ends_only_that_session(server: StoreServer) -> None:
    store = GroupStore("127.0.0.1", port_of(server), SECRET, SHORT)
    store.set("k", "v")
    sock = store.channel.sock
    payload = rendezvous._pack(bytes([rendezvous.SET]), (5000).to_bytes(8, "big"), b"k", b"forged")
    sock.sendall(struct.pack("!I", len(payload) + 32) + payload + os.urandom(32))
    assert sock.recv(16) == b""  # the server closed the session
    assert GroupStore("127.0.0.1", port_of(server), SECRET, SHORT).get("k") == b"v"


RANK_SCRIPT = """
import sys
from largemodel.runtime.parallel import init_distributed
import torch, torch.distributed as dist
rank, port, secret, timeout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode(), float(sys.argv[4])
ctx = init_distributed(rank, 2, 2, 1, "127.0.0.1", port, timeout_s=timeout, bind_host="127.0.0.1", secret=secret)
import gc
gc.collect()
# groups made after init_distributed returned (DeepSpeed makes its own), of one rank and of both
for ranks in ([0], [1], [0, 1]):
    made = dist.new_group(ranks)
t = torch.full((3,), float(rank + 1))
dist.all_reduce(t, group=made)
ctx.all_reduce(t)
dist.all_reduce(t)
print("RESULT", t.tolist(), flush=True)
dist.destroy_process_group()
"""


def _ranks(secrets: list[str], tmp_path: Path, host_timeout: float = 20.0) -> list[subprocess.CompletedProcess[str]]:
    """Two ranks; rank 0 hosts the store and waits `host_timeout` for the group, rank 1 joins within 20 s."""
    port = free_port()
    timeouts = [host_timeout, 20.0]
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(rank), str(port), secret, str(timeouts[rank])],
                              env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank, secret in enumerate(secrets)]
    done = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=90)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.timeout(200)
def test_a_gloo_group_starts_through_the_store_and_an_outsider_cannot_join(tmp_path: Path) -> None:
    """init_distributed's real path: two ranks with the secret form a tp=2 group; a rank without it fails fast."""
    good = _ranks(["s3cret", "s3cret"], tmp_path)
    assert [d.returncode for d in good] == [0, 0], "\n".join(d.stdout for d in good)
    assert all("RESULT [12.0, 12.0, 12.0]" in d.stdout for d in good)
    # Rank 0 waits for a group that never forms: a shorter bound than 20 s (rank 1, started with it,
    # reaches its store and is refused within seconds).
    bad = _ranks(["s3cret", "guess"], tmp_path, host_timeout=8.0)
    assert bad[1].returncode != 0 and "group secret" in bad[1].stdout, bad[1].stdout
    assert "event=store_stranger" in bad[0].stdout or bad[0].returncode != 0
