"""A TCP link between the pod supervisors of one rank group, so a dead pod stops the others.

Inside a pod the supervisor sees its ranks die. Across pods nothing does: an idle rank waits in
recv and only notices a lost peer at its next message. So each stage pod's supervisor keeps a
TCP connection to the stage-0 pod's supervisor on MASTER_PORT+1. When a supervisor exits after a
failure its socket closes without the closing "ok" line, and the other side stops its own ranks
at once. A clean shutdown sends "ok" first, letting the ranks leave by themselves.
"""

from __future__ import annotations

import logging
import select
import socket
import time
from dataclasses import dataclass, field

from largemodel.envcontract import RankEnv

log = logging.getLogger(__name__)

CLEAN = b"ok\n"
RETRY_S = 0.5
POLL_S = 0.05


def liveness_port(master_port: int) -> int:
    """The port the stage-0 supervisor listens on: right after the rendezvous port."""
    return master_port + 1


@dataclass
class LivenessLink:
    """Stage-0 side: a listening socket and one connection per stage pod; others: one connection."""

    env: RankEnv
    listener: socket.socket | None = None
    peers: dict[socket.socket, int] = field(default_factory=dict)  # connection -> node rank (-1 unknown yet)
    upstream: socket.socket | None = None
    next_try: float = 0.0
    clean_peers: set[int] = field(default_factory=set)

    @classmethod
    def open(cls, env: RankEnv) -> LivenessLink:
        """Listen (stage 0) or prepare to connect (other stages) without blocking."""
        link = cls(env)
        if env.node_rank == 0:
            link.listener = socket.create_server(("", liveness_port(env.master_port)), reuse_port=False)
            link.listener.setblocking(False)
        return link

    def _connect(self) -> None:
        if self.upstream is not None or time.monotonic() < self.next_try:
            return
        self.next_try = time.monotonic() + RETRY_S
        try:
            sock = socket.create_connection((self.env.master_addr, liveness_port(self.env.master_port)), timeout=2)
        except OSError:
            return  # the stage-0 pod may not be up yet: the rendezvous has its own timeout
        sock.sendall(f"{self.env.node_rank}\n".encode())
        self.upstream = sock
        log.info("event=liveness_connected master=%s", self.env.master_addr)

    def poll(self) -> str | None:
        """Wait up to POLL_S for news; return why the group is broken, or None while it is whole."""
        if self.listener is None:
            self._connect()
        readable = [s for s in [self.listener, self.upstream, *self.peers] if s is not None]
        if not readable:
            time.sleep(POLL_S)
            return None
        ready, _, _ = select.select(readable, [], [], POLL_S)
        for sock in ready:
            if sock is self.listener:
                conn, _addr = sock.accept()
                self.peers[conn] = -1
                continue
            try:
                data = sock.recv(64)
            except OSError:
                data = b""
            if data and data != CLEAN and sock in self.peers and self.peers[sock] < 0:
                self.peers[sock] = int(data.split(b"\n", 1)[0] or -1)
                data = data.split(b"\n", 1)[1]
                if not data:
                    continue
            if data.endswith(CLEAN):
                self._forget(sock, clean=True)
                continue
            if not data:
                who = "stage-0 pod" if sock is self.upstream else f"stage pod {self.peers.get(sock, -1)}"
                self._forget(sock, clean=False)
                return f"{who} left the group"
        return None

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
        self.upstream, self.peers = None, {}
        if self.listener is not None:
            self.listener.close()
            self.listener = None
