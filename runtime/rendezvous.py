"""The group's rendezvous store: a key-value store that only the group's own ranks can reach.

torch.distributed needs a store to start: gloo and NCCL exchange their peers' addresses (and NCCL
its unique id) through it, and every `new_group` does again. torch's TCPStore answers anyone who
connects, so any process that could reach MASTER_PORT could read the group's addresses, overwrite
them, or make a rank wait forever. This store is served by global rank 0 on the rank address and
admits only peers that prove they hold the group secret:

1. The server greets a connection with `GREETING` and a 16-byte random nonce.
2. The client sends its own nonce and `HMAC-SHA256(secret, "client" | server nonce | client nonce)`.
3. The server checks it with `hmac.compare_digest` and answers with the server proof
   `HMAC(secret, "server" | ...)`, so a rank never trusts an impostor rank 0 either.
4. Every later frame carries `HMAC(session key, direction | sequence number | payload)`; the
   session key is derived from both nonces, so frames can be neither forged nor replayed.

Anything else (a bare connect, junk, a wrong proof, silence past HANDSHAKE_TIMEOUT_S, more than
MAX_PENDING strangers at once) is logged as `event=store_stranger` and closed: it never reaches the
data and never blocks a rank. The client is a `torch.distributed.Store` subclass, so
`init_process_group(store=...)` and torch's PrefixStore use it like a TCPStore.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

GREETING = b"largemodel-store/1\n"
NONCE = 16
TAG = hashlib.sha256().digest_size
HANDSHAKE_TIMEOUT_S = 5.0
MAX_PENDING = 16  # unauthenticated connections at once; more are closed at accept
MAX_FRAME = 1 << 20  # bytes of one request or answer (the group's values are addresses and ids)
MAX_KEYS = 1 << 16
CONNECT_RETRY_S = 0.2

SET, GET, ADD, COMPARE_SET, WAIT, CHECK, DELETE, NUM_KEYS = range(1, 9)
OK, TIMEOUT, ERROR = range(3)
_TO_SERVER, _TO_CLIENT = b"c", b"s"


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


def _pack(*fields: bytes) -> bytes:
    return struct.pack("!H", len(fields)) + b"".join(struct.pack("!I", len(f)) + f for f in fields)


def _unpack(data: bytes) -> list[bytes]:
    if len(data) < 2:
        raise ValueError("short message")
    (count,), at, fields = struct.unpack_from("!H", data), 2, []
    for _ in range(count):
        if at + 4 > len(data):
            raise ValueError("short message")
        (size,) = struct.unpack_from("!I", data, at)
        at += 4
        if at + size > len(data):
            raise ValueError("short message")
        fields.append(data[at:at + size])
        at += size
    if at != len(data):
        raise ValueError("trailing bytes")
    return fields


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return bytes(data)


class _Channel:
    """One authenticated connection: length-prefixed frames, each MAC'd with the session key."""

    def __init__(self, sock: socket.socket, key: bytes, send_dir: bytes, recv_dir: bytes) -> None:
        self.sock, self.key, self.send_dir, self.recv_dir = sock, key, send_dir, recv_dir
        self.sent = self.received = 0

    def send(self, payload: bytes) -> None:
        tag = _mac(self.key, self.send_dir, struct.pack("!Q", self.sent), payload)
        self.sent += 1
        self.sock.sendall(struct.pack("!I", len(payload) + TAG) + payload + tag)

    def recv(self) -> bytes:
        (size,) = struct.unpack("!I", _recv_exact(self.sock, 4))
        if not TAG <= size <= MAX_FRAME + TAG:
            raise ValueError(f"frame of {size} bytes")
        body = _recv_exact(self.sock, size)
        payload, tag = body[:-TAG], body[-TAG:]
        expected = _mac(self.key, self.recv_dir, struct.pack("!Q", self.received), payload)
        if not hmac.compare_digest(expected, tag):
            raise ValueError("bad frame MAC")
        self.received += 1
        return payload


class StoreServer:
    """Rank 0's side: the data, one thread per authenticated rank connection, strangers dropped."""

    def __init__(self, listener: socket.socket, secret: bytes) -> None:
        self.listener, self.secret = listener, secret
        self.data: dict[bytes, bytes] = {}
        self.changed = threading.Condition()
        self.pending = threading.BoundedSemaphore(MAX_PENDING)
        self.strangers = 0  # connections dropped without authenticating (tests and logs)
        self.sessions = 0
        self.closed = False
        self.thread = threading.Thread(target=self._accept_loop, name="rendezvous-store", daemon=True)

    @classmethod
    def serve(cls, host: str, port: int, secret: bytes) -> StoreServer:
        """Listen on `host:port` ("" = every interface) and start serving in daemon threads."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        server = cls(sock, secret)
        server.thread.start()
        log.info("event=store_listening host=%s port=%d", host or "*", port)
        return server

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                conn, addr = self.listener.accept()
            except OSError:
                return
            where = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if not self.pending.acquire(blocking=False):
                self._drop(conn, where, "too many unauthenticated connections")
                continue
            threading.Thread(target=self._session, args=(conn, where), name="rendezvous-session",
                             daemon=True).start()

    def _drop(self, conn: socket.socket, where: str, why: str) -> None:
        self.strangers += 1
        log.warning("event=store_stranger peer=%s reason=%r", where, why)
        conn.close()

    def _handshake(self, conn: socket.socket) -> _Channel:
        server_nonce = os.urandom(NONCE)
        conn.sendall(GREETING + server_nonce)
        hello = _recv_exact(conn, NONCE + TAG)
        client_nonce, proof = hello[:NONCE], hello[NONCE:]
        if not hmac.compare_digest(proof, _mac(self.secret, b"client", server_nonce, client_nonce)):
            raise ValueError("wrong proof of the group secret")
        conn.sendall(_mac(self.secret, b"server", server_nonce, client_nonce))
        key = _mac(self.secret, b"session", server_nonce, client_nonce)
        return _Channel(conn, key, _TO_CLIENT, _TO_SERVER)

    def _session(self, conn: socket.socket, where: str) -> None:
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            channel = self._handshake(conn)
        except (OSError, ValueError) as err:
            self._drop(conn, where, str(err) or type(err).__name__)
            return
        finally:
            self.pending.release()
        conn.settimeout(None)  # a rank may stay quiet for as long as the group runs
        self.sessions += 1
        log.info("event=store_peer peer=%s", where)
        try:
            while True:
                request = channel.recv()
                channel.send(self._answer(request))
        except (OSError, ConnectionError):
            pass  # the rank closed its store or exited
        except ValueError as err:  # an authenticated peer sent a broken frame: its session ends
            log.warning("event=store_bad_frame peer=%s error=%s", where, err)
        finally:
            conn.close()

    def _answer(self, request: bytes) -> bytes:
        try:
            op, deadline_ms, *args = _unpack(request)
            code = op[0] if len(op) == 1 else 0
            deadline = time.monotonic() + int.from_bytes(deadline_ms, "big") / 1000.0
            return self._run(code, deadline, args)
        except (ValueError, IndexError) as err:
            return _pack(bytes([ERROR]), str(err).encode())

    def _wait_for(self, keys: list[bytes], deadline: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: all(k in self.data for k in keys),
                                         max(0.0, deadline - time.monotonic()))

    def _run(self, op: int, deadline: float, args: list[bytes]) -> bytes:
        ok = bytes([OK])
        if op in (GET, WAIT):
            keys = args[:1] if op == GET else args
            if not self._wait_for(keys, deadline):
                return _pack(bytes([TIMEOUT]), b", ".join(keys))
            with self.changed:
                return _pack(ok, self.data[keys[0]]) if op == GET else _pack(ok)
        with self.changed:
            if op in (SET, ADD, COMPARE_SET) and args[0] not in self.data and len(self.data) >= MAX_KEYS:
                return _pack(bytes([ERROR]), b"store full")
            if op == SET:
                self.data[args[0]] = args[1]
                answer = _pack(ok)
            elif op == ADD:
                value = int(self.data.get(args[0], b"0")) + int(args[1])
                self.data[args[0]] = str(value).encode()
                answer = _pack(ok, self.data[args[0]])
            elif op == COMPARE_SET:  # TCPStore's rule: a missing key matches an empty expected value
                key, expected, desired = args[0], args[1], args[2]
                current = self.data.get(key)
                if (current is None and expected == b"") or current == expected:
                    self.data[key] = desired
                    current = desired
                answer = _pack(ok, expected if current is None else current)
            elif op == CHECK:
                answer = _pack(ok, b"1" if all(k in self.data for k in args) else b"0")
            elif op == DELETE:
                answer = _pack(ok, b"1" if self.data.pop(args[0], None) is not None else b"0")
            elif op == NUM_KEYS:
                answer = _pack(ok, str(len(self.data)).encode())
            else:
                return _pack(bytes([ERROR]), f"unknown operation {op}".encode())
            self.changed.notify_all()
            return answer


def _bytes(value: str | bytes | bytearray | list[int]) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class GroupStore(dist.Store):
    """A rank's client of the group's StoreServer, usable wherever torch takes a Store."""

    def __init__(self, host: str, port: int, secret: bytes, timeout: timedelta) -> None:
        super().__init__()
        self.default_timeout = timeout
        super().set_timeout(timeout)
        self.host, self.port, self.secret = host, port, secret
        self.lock = threading.Lock()
        self.channel = self._connect(time.monotonic() + timeout.total_seconds())

    def _connect(self, deadline: float) -> _Channel:
        """Connect and authenticate, retrying while rank 0 is not up yet, until `deadline`."""
        last = "no attempt"
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=HANDSHAKE_TIMEOUT_S)
            except OSError as err:
                last = str(err)
            else:
                try:
                    return self._handshake(sock)
                except (OSError, ValueError) as err:
                    sock.close()
                    if isinstance(err, PermissionError):
                        raise
                    last = str(err)
            if time.monotonic() >= deadline:
                raise dist.DistStoreError(f"rendezvous store {self.host}:{self.port} not reachable: {last}")
            time.sleep(CONNECT_RETRY_S)

    def _handshake(self, sock: socket.socket) -> _Channel:
        greeting = _recv_exact(sock, len(GREETING) + NONCE)
        if not greeting.startswith(GREETING):
            raise ValueError("not a largemodel rendezvous store")
        server_nonce, client_nonce = greeting[len(GREETING):], os.urandom(NONCE)
        sock.sendall(client_nonce + _mac(self.secret, b"client", server_nonce, client_nonce))
        try:
            proof = _recv_exact(sock, TAG)
        except ConnectionError:
            raise PermissionError("the rendezvous store refused this rank's group secret") from None
        if not hmac.compare_digest(proof, _mac(self.secret, b"server", server_nonce, client_nonce)):
            raise PermissionError("the rendezvous store does not hold the group secret")
        sock.settimeout(None)
        key = _mac(self.secret, b"session", server_nonce, client_nonce)
        return _Channel(sock, key, _TO_SERVER, _TO_CLIENT)

    def _call(self, op: int, *args: bytes, timeout: timedelta | None = None) -> bytes:
        wait = (timeout or self.default_timeout).total_seconds()
        deadline_ms = int(min(max(wait, 0.0), 2**31) * 1000).to_bytes(8, "big")
        with self.lock:
            self.channel.sock.settimeout(wait + 30.0)  # the server answers TIMEOUT itself before this
            try:
                self.channel.send(_pack(bytes([op]), deadline_ms, *args))
                status, *fields = _unpack(self.channel.recv())
            except (OSError, ValueError) as err:
                raise dist.DistStoreError(f"rendezvous store {self.host}:{self.port}: {err}") from None
        if status == bytes([TIMEOUT]):
            raise dist.DistStoreError(f"rendezvous store: timed out after {wait:.0f} s waiting for "
                                      f"{fields[0].decode(errors='replace')}")
        if status != bytes([OK]):
            raise dist.DistStoreError(f"rendezvous store: {b''.join(fields).decode(errors='replace')}")
        return fields[0] if fields else b""

    def set_timeout(self, timeout: timedelta) -> None:
        self.default_timeout = timeout
        super().set_timeout(timeout)

    def set(self, key: str, value: str | bytes) -> None:  # type: ignore[override]
        self._call(SET, _bytes(key), _bytes(value))

    def get(self, key: str) -> bytes:  # type: ignore[override]
        return self._call(GET, _bytes(key))

    def add(self, key: str, value: int) -> int:  # type: ignore[override]
        return int(self._call(ADD, _bytes(key), str(int(value)).encode()))

    def compare_set(self, key: str, expected_value: str | bytes,  # type: ignore[override]
                    desired_value: str | bytes) -> bytes:
        return self._call(COMPARE_SET, _bytes(key), _bytes(expected_value), _bytes(desired_value))

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:  # type: ignore[override]
        self._call(WAIT, *(_bytes(k) for k in keys), timeout=timeout)

    def check(self, keys: list[str]) -> bool:  # type: ignore[override]
        return self._call(CHECK, *(_bytes(k) for k in keys)) == b"1"

    def delete_key(self, key: str) -> bool:  # type: ignore[override]
        return self._call(DELETE, _bytes(key)) == b"1"

    def num_keys(self) -> int:  # type: ignore[override]
        return int(self._call(NUM_KEYS))

    def close(self) -> None:
        with self.lock:
            self.channel.sock.close()
