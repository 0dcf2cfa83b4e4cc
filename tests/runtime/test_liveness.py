"""The liveness link between a group's pod supervisors: peers authenticate, strangers change nothing.

Issue 14, defect 1: a bare connect+close to MASTER_PORT+1 was read as "stage pod -1 left the
group" and `junk\\n` raised ValueError in supervise(); either stopped every rank.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from largemodel import envcontract
from largemodel.envcontract import EnvContractError, RankEnv
from largemodel.runtime import liveness
from largemodel.runtime.liveness import LivenessLink
from largemodel.runtime.local import free_port_pair

SECRET = b"s3cret-of-this-group"


def _env(port: int, node_rank: int) -> RankEnv:
    return RankEnv(master_addr="127.0.0.1", master_port=port, nnodes=2, node_rank=node_rank, nproc_per_node=1,
                   world_size=2, tp=1, pp=2, group_index=0, model_uri="file:///m", model_dtype="float32",
                   micro_batches=1, engine="native")


def _poll_for(link: LivenessLink, seconds: float) -> str | None:
    """Poll like supervise() does for `seconds`; the first breakage, or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        broken = link.poll()
        if broken:
            return broken
    return None


def _connect(peer: LivenessLink, leader: LivenessLink) -> None:
    """A stage pod connects while the stage-0 supervisor polls, as both do in supervise()."""
    thread = threading.Thread(target=peer._connect)
    thread.start()
    deadline = time.monotonic() + 5
    while thread.is_alive() and time.monotonic() < deadline:
        assert leader.poll() is None
    thread.join(1)
    assert peer.upstream is not None


@pytest.fixture
def leader() -> Iterator[LivenessLink]:
    link = LivenessLink.open(_env(free_port_pair(), 0), SECRET, "127.0.0.1")
    try:
        yield link
    finally:
        link.close(clean=False)


def _port(link: LivenessLink) -> int:
    return link.env.liveness_port


def test_listens_on_the_rank_address_only(leader: LivenessLink) -> None:
    assert leader.listener is not None
    assert leader.listener.getsockname()[0] == "127.0.0.1"


def test_strangers_are_dropped_and_never_break_the_group(leader: LivenessLink,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "HANDSHAKE_TIMEOUT_S", 0.5)
    port = _port(leader)
    # A port scanner: connect and close.
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert _poll_for(leader, 0.3) is None
    # Junk, a forged answer, an over-long line, binary garbage.
    for payload in (b"junk\n", b"1 " + b"0" * 64 + b"\n", b"1" * 500, b"\xff\x00\x13\n", b"-1 x\n", b"7 abc\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(payload)
            assert _poll_for(leader, 0.3) is None
    # Silent: connects and says nothing; dropped once the handshake time is up.
    silent = socket.create_connection(("127.0.0.1", port), timeout=2)
    assert _poll_for(leader, 1.0) is None
    assert not leader.pending
    silent.close()
    assert _poll_for(leader, 0.2) is None
    assert leader.strangers >= 8 and not leader.peers


def test_a_peer_with_the_wrong_secret_is_a_stranger(leader: LivenessLink) -> None:
    impostor = LivenessLink.open(_env(leader.env.master_port, 1), b"not the secret")
    try:
        _connect(impostor, leader)
        assert _poll_for(leader, 0.5) is None
        assert not leader.peers and leader.strangers == 1
        # The impostor, not the group, learns it was refused.
        assert _poll_for(impostor, 2) == "stage-0 pod left the group"
    finally:
        impostor.close(clean=False)


def test_an_authenticated_peer_that_dies_stops_the_group(leader: LivenessLink) -> None:
    peer = LivenessLink.open(_env(leader.env.master_port, 1), SECRET)
    _connect(peer, leader)
    assert _poll_for(leader, 0.5) is None
    assert list(leader.peers.values()) == [1]
    peer.close(clean=False)
    assert _poll_for(leader, 2) == "stage pod 1 left the group"


def test_an_authenticated_peer_that_finishes_cleanly_leaves_quietly(leader: LivenessLink) -> None:
    peer = LivenessLink.open(_env(leader.env.master_port, 1), SECRET)
    _connect(peer, leader)
    assert _poll_for(leader, 0.5) is None
    peer.close(clean=True)
    assert _poll_for(leader, 0.5) is None
    assert leader.clean_peers == {1}


def test_rank_bind_host_and_group_secret_from_the_env(tmp_path: object) -> None:
    from pathlib import Path

    assert envcontract.rank_bind_host({}) == ""
    assert envcontract.rank_bind_host({"BIND_HOST": "0.0.0.0"}) == ""
    assert envcontract.rank_bind_host({"BIND_HOST": "127.0.0.1"}) == "127.0.0.1"
    assert envcontract.rank_bind_host({"BIND_HOST": "0.0.0.0", "POD_IP": "10.1.2.3"}) == "10.1.2.3"
    assert envcontract.group_secret({}) is None
    assert envcontract.group_secret({"GROUP_SECRET": "abc"}) == b"abc"
    secret_file = Path(str(tmp_path)) / "secret"
    secret_file.write_bytes(b"from-file\n")
    assert envcontract.group_secret({"GROUP_SECRET_FILE": str(secret_file), "GROUP_SECRET": "x"}) == b"from-file"
    with pytest.raises(EnvContractError, match="GROUP_SECRET_FILE"):
        envcontract.group_secret({"GROUP_SECRET_FILE": str(secret_file) + ".missing"})
