"""The client/daemon protocol: one binary frame each way per connection (stdlib only, no json/re).

Request:  "MVT1" | u64 caller netns inode | u32 env length | u32 stdin length | env | stdin
          env is "KEY=VALUE" entries separated by NUL bytes.
Reply:    "MVT1" | i32 exit code (-1: run it yourself) | u32 stdout len | u32 stderr len | stdout | stderr
Only C modules (_struct, _socket) are imported, so the thin client starts in milliseconds.
"""

from __future__ import annotations

import _socket
import struct

MAGIC = b"MVT1"
MAX_FRAME = 16 * 1024 * 1024
FALLBACK = -1
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


def recv_exact(sock: _socket.socket, n: int) -> bytes:
    """Read exactly n bytes or raise ProtocolError."""
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def send_request(sock: _socket.socket, netns: int, env: dict[str, str], stdin: bytes) -> None:
    """Client side: send one request."""
    blob = encode_env(env)
    sock.sendall(_REQ.pack(MAGIC, netns, len(blob), len(stdin)) + blob + stdin)


def recv_request(sock: _socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Daemon side: (caller netns inode, env, stdin)."""
    magic, netns, env_len, stdin_len = _REQ.unpack(recv_exact(sock, _REQ.size))
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if env_len + stdin_len > MAX_FRAME:
        raise ProtocolError(f"request of {env_len + stdin_len} bytes is larger than {MAX_FRAME}")
    env = decode_env(recv_exact(sock, env_len))
    return netns, env, recv_exact(sock, stdin_len)


def send_reply(sock: _socket.socket, code: int, stdout: bytes, stderr: str) -> None:
    """Daemon side: send one reply (code FALLBACK asks the client to run the call itself)."""
    err = stderr.encode("utf-8", "replace")
    sock.sendall(_REP.pack(MAGIC, code, len(stdout), len(err)) + stdout + err)


def recv_reply(sock: _socket.socket) -> tuple[int, bytes, str]:
    """Client side: (exit code, stdout, stderr text)."""
    magic, code, out_len, err_len = _REP.unpack(recv_exact(sock, _REP.size))
    if magic != MAGIC or out_len + err_len > MAX_FRAME:
        raise ProtocolError("malformed reply")
    out = recv_exact(sock, out_len)
    return code, out, recv_exact(sock, err_len).decode("utf-8", "replace")
