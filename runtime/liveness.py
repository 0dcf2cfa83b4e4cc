"""A TCP link between the pod supervisors of one rank group, so a dead pod stops the others.

Inside a pod the supervisor sees its ranks die. Across pods nothing does: an idle rank waits in
recv and only notices a lost peer at its next message. So each stage pod's supervisor keeps a
TCP connection to the stage-0 pod's supervisor on MASTER_PORT+1. When a supervisor exits after a
failure its socket closes without the closing "ok" line, and the other side stops its own ranks
at once. A clean shutdown sends "ok" first, letting the ranks leave by themselves.

Only peers of the group count. The stage-0 side binds the rank address (the pod IP, or loopback
for `largemodel run`) and greets every connection with a fresh random challenge; a stage pod
answers `<node_rank> <HMAC-SHA256(group secret, challenge and node_rank)>`. A connection that
closes, sends anything else, or does not answer within HANDSHAKE_TIMEOUT_S is a stranger: it is
logged and dropped and never read as a stage leaving, so a port scanner cannot stop the group.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import socket
import time
from dataclasses import dataclass, field

from largemodel.envcontract import RankEnv

log = logging.getLogger(__name__)

CLEAN = b"ok\n"
GREETING = b"largemodel-liveness/1 "
RETRY_S = 0.5
POLL_S = 0.05
HANDSHAKE_TIMEOUT_S = 5.0
MAX_PENDING = 16  # unauthenticated connections held at once; more are closed at accept
MAX_HELLO = 128  # bytes of an answer; a longer line is not one


def answer(secret: bytes, challenge: bytes, node_rank: int) -> str:
    """The MAC a stage pod sends back for `challenge` (hex)."""
    return hmac.new(secret, b"liveness|" + challenge + b"|" + str(node_rank).encode(), hashlib.sha256).hexdigest()


@dataclass
class _Pending:
    """A connection that has been challenged and has not answered yet."""

    challenge: bytes
    deadline: float
    addr: str
    buffer: bytes = b""


@dataclass
class LivenessLink:
    """Stage-0 side: a listening socket and one connection per stage pod; others: one connection."""

    env: RankEnv
    secret: bytes = b""
    bind_host: str = ""
    listener: socket.socket | None = None
    peers: dict[socket.socket, int] = field(default_factory=dict)  # authenticated connection -> node rank
    pending: dict[socket.socket, _Pending] = field(default_factory=dict)
    upstream: socket.socket | None = None
    next_try: float = 0.0
    clean_peers: set[int] = field(default_factory=set)
    strangers: int = 0  # connections dropped without authenticating (tests and logs)

    @classmethod
    def open(cls, env: RankEnv, secret: bytes | None = None, bind_host: str = "") -> LivenessLink:
        """Listen on `bind_host` (stage 0) or prepare to connect (other stages) without blocking."""
        if not secret:
            log.warning("event=liveness_no_secret detail=no group secret is set; peers prove only that they "
                        "speak the protocol")
        link = cls(env, secret or b"", bind_host)
        if env.node_rank == 0:
            link.listener = socket.create_server((bind_host, env.liveness_port), reuse_port=False)
            link.listener.setblocking(False)
            log.info("event=liveness_listening host=%s port=%d", bind_host or "*", env.liveness_port)
        return link

    def _connect(self) -> None:
        if self.upstream is not None or time.monotonic() < self.next_try:
            return
        self.next_try = time.monotonic() + RETRY_S
        try:
            sock = socket.create_connection((self.env.master_addr, self.env.liveness_port), timeout=2)
        except OSError:
            return  # the stage-0 pod may not be up yet: the rendezvous has its own timeout
        try:
            line = _read_line(sock, len(GREETING) + 64)
            if not line.startswith(GREETING):
                raise OSError("not a liveness greeting")
            challenge = line[len(GREETING):]
            sock.sendall(f"{self.env.node_rank} {answer(self.secret, challenge, self.env.node_rank)}\n".encode())
        except OSError as err:
            # Not up yet, or a half-open connection: try again; the rendezvous bounds how long.
            log.info("event=liveness_handshake_retry master=%s error=%s", self.env.master_addr, err)
            sock.close()
            return
        sock.settimeout(None)
        self.upstream = sock
        log.info("event=liveness_connected master=%s", self.env.master_addr)

    def poll(self) -> str | None:
        """Wait up to POLL_S for news; return why the group is broken, or None while it is whole."""
        if self.listener is None:
            self._connect()
        self._expire_pending()
        readable = [s for s in [self.listener, self.upstream, *self.peers, *self.pending] if s is not None]
        if not readable:
            time.sleep(POLL_S)
            return None
        ready, _, _ = select.select(readable, [], [], POLL_S)
        for sock in ready:
            if sock is self.listener:
                self._accept()
                continue
            try:
                data = sock.recv(MAX_HELLO)
            except OSError:
                data = b""
            if sock in self.pending:
                self._handshake(sock, data)
                continue
            if sock not in self.peers and sock is not self.upstream:
                continue  # dropped earlier in this round
            if data.endswith(CLEAN):
                self._forget(sock, clean=True)
                continue
            if not data:
                who = "stage-0 pod" if sock is self.upstream else f"stage pod {self.peers.get(sock, -1)}"
                self._forget(sock, clean=False)
                return f"{who} left the group"
        return None

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, addr = self.listener.accept()
        except OSError:
            return
        where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if len(self.pending) >= MAX_PENDING:
            self._drop(conn, where, "too many unauthenticated connections")
            return
        challenge = os.urandom(16).hex().encode()
        try:
            conn.setblocking(False)
            conn.send(GREETING + challenge + b"\n")
        except OSError:
            self._drop(conn, where, "closed before the greeting")
            return
        self.pending[conn] = _Pending(challenge, time.monotonic() + HANDSHAKE_TIMEOUT_S, where)

    def _handshake(self, sock: socket.socket, data: bytes) -> None:
        """Read a pending connection's answer: a peer joins `peers`, anything else is dropped."""
        state = self.pending[sock]
        if not data:
            self._drop(sock, state.addr, "closed without authenticating")
            return
        state.buffer += data
        if b"\n" not in state.buffer:
            if len(state.buffer) > MAX_HELLO:
                self._drop(sock, state.addr, "answer too long")
            return
        line, rest = state.buffer.split(b"\n", 1)
        node = _authenticated_node(line, self.secret, state.challenge, self.env.nnodes)
        if node is None:
            self._drop(sock, state.addr, "failed authentication")
            return
        del self.pending[sock]
        self.peers[sock] = node
        log.info("event=liveness_peer node_rank=%d addr=%s", node, state.addr)
        if rest.endswith(CLEAN):
            self._forget(sock, clean=True)

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for sock, state in list(self.pending.items()):
            if now > state.deadline:
                self._drop(sock, state.addr, "did not authenticate in time")

    def _drop(self, sock: socket.socket, addr: str, why: str) -> None:
        self.pending.pop(sock, None)
        self.strangers += 1
        log.warning("event=liveness_stranger addr=%s reason=%s action=drop", addr, why.replace(" ", "_"))
        sock.close()

    def _forget(self, sock: socket.socket, clean: bool) -> None:
        if sock is self.upstream:
            self.upstream = None
            self.next_try = float("inf")  # never reconnect: the group is finished either way
        else:
            node = self.peers.pop(sock, -1)
            if clean:
                self.clean_peers.add(node)
        sock.close()

    def close(self, clean: bool) -> None:
        """Tell the other side how this pod ended (clean: 'ok'), then close every socket."""
        for sock in [self.upstream, *self.peers]:
            if sock is None:
                continue
            try:
                if clean:
                    sock.sendall(CLEAN)
            except OSError:
                pass
            sock.close()
        for sock in self.pending:
            sock.close()
        self.upstream, self.peers, self.pending = None, {}, {}
        if self.listener is not None:
            self.listener.close()
            self.listener = None


def _read_line(sock: socket.socket, limit: int) -> bytes:
    """One newline-terminated line (without it) from a blocking socket with a timeout set."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(limit)
        if not chunk:
            raise OSError("connection closed")
        data += chunk
        if len(data) > limit:
            raise OSError("line too long")
    return data.split(b"\n", 1)[0]


def _authenticated_node(line: bytes, secret: bytes, challenge: bytes, nnodes: int) -> int | None:
    """The node rank an answer proves, or None when it proves nothing."""
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 6:
        return None
    node = int(parts[0])
    if not 0 < node < nnodes:
        return None
    expected = answer(secret, challenge, node).encode()
    return node if hmac.compare_digest(expected, parts[1]) else None
