"""The client/daemon protocol: one binary frame each way per connection (stdlib only, no json/re).

Request:  "MVT1" | u64 caller netns inode | u32 env length | u32 stdin length | env | stdin
          env is "KEY=VALUE" entries separated by NUL bytes.
Reply:    "MVT1" | i32 exit code (-1: run it yourself) | u32 stdout len | u32 stderr len | stdout | stderr
Requests are bounded (defaults.MAX_ENV, defaults.MAX_STDIN) and the daemon reads one within a deadline.
Only C modules (_struct, _socket, time) are imported, so the thin client starts in milliseconds.
"""

from __future__ import annotations

import _socket
import struct
import time

from .defaults import MAX_ENV, MAX_REPLY, MAX_STDIN

MAGIC = b"MVT1"
FALLBACK = -1
CLIENT_TIMEOUT_S = 180
_REQ = struct.Struct("!4sQII")
_REP = struct.Struct("!4siII")


class ProtocolError(Exception):
    """A frame was truncated, too large or malformed."""


def encode_env(env: dict[str, str]) -> bytes:
    """Environment -> NUL-separated KEY=VALUE bytes (surrogateescape keeps odd bytes intact)."""
    return b"\0".join(
        f"{k}={v}".encode("utf-8", "surrogateescape") for k, v in env.items() if "\0" not in k + v
    )


def decode_env(blob: bytes) -> dict[str, str]:
    """The inverse of encode_env; a malformed entry is a ProtocolError."""
    env: dict[str, str] = {}
    if not blob:
        return env
    for item in blob.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise ProtocolError(f"malformed environment entry {item[:40]!r}")
        env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def recv_exact(sock: _socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Read exactly n bytes or raise ProtocolError; past the monotonic deadline, TimeoutError."""
    chunks = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def request_fits(env_blob: bytes, stdin: bytes) -> bool:
    """Whether a request is within the daemon's limits (a larger one runs in-process)."""
    return len(env_blob) <= MAX_ENV and len(stdin) <= MAX_STDIN


def send_request(sock: _socket.socket, netns: int, env: dict[str, str], stdin: bytes) -> None:
    """Client side: send one request (the caller checked request_fits)."""
    blob = encode_env(env)
    sock.sendall(_REQ.pack(MAGIC, netns, len(blob), len(stdin)) + blob + stdin)


def recv_request(sock: _socket.socket, deadline: float | None = None) -> tuple[int, dict[str, str], bytes]:
    """Daemon side: (caller netns inode, env, stdin); sizes are checked before anything is read."""
    magic, netns, env_len, stdin_len = _REQ.unpack(recv_exact(sock, _REQ.size, deadline))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if env_len > MAX_ENV or stdin_len > MAX_STDIN:
        raise ProtocolError(
            f"request larger than the limits (env {env_len} > {MAX_ENV} or stdin {stdin_len} > {MAX_STDIN})"
        )
    env = decode_env(recv_exact(sock, env_len, deadline))
    return netns, env, recv_exact(sock, stdin_len, deadline)


def send_reply(sock: _socket.socket, code: int, stdout: bytes, stderr: str) -> None:
    """Daemon side: send one reply (code FALLBACK asks the client to run the call itself)."""
    err = stderr.encode("utf-8", "replace")[:MAX_REPLY]
    sock.sendall(_REP.pack(MAGIC, code, len(stdout), len(err)) + stdout + err)


def recv_reply(sock: _socket.socket) -> tuple[int, bytes, str]:
    """Client side: (exit code, stdout, stderr text)."""
    magic, code, out_len, err_len = _REP.unpack(recv_exact(sock, _REP.size))
    if magic != MAGIC or out_len > MAX_REPLY or err_len > MAX_REPLY:
        raise ProtocolError("malformed reply")
    out = recv_exact(sock, out_len)
    return code, out, recv_exact(sock, err_len).decode("utf-8", "replace")
