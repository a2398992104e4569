"""The client/daemon protocol: one length-prefixed JSON frame each way per connection (stdlib only).

Request:  {"env": {...}, "stdin": <latin-1 text>, "netns": <inode of the caller's netns>}
Reply:    {"stdout": <latin-1 text>, "code": <exit code>, "stderr": <text>}  or  {"fallback": <reason>}
Bytes travel as latin-1 strings, which JSON round-trips exactly.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

MAX_FRAME = 16 * 1024 * 1024
_HDR = struct.Struct("!I")


class ProtocolError(Exception):
    """A frame was truncated, too large or not JSON."""


def send(sock: socket.socket, doc: dict[str, Any]) -> None:
    """Send one frame."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    sock.sendall(_HDR.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ProtocolError("connection closed mid-frame")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> dict[str, Any]:
    """Receive one frame."""
    (size,) = _HDR.unpack(_recv_exact(sock, _HDR.size))
    if size > MAX_FRAME:
        raise ProtocolError(f"frame of {size} bytes is larger than {MAX_FRAME}")
    try:
        doc = json.loads(_recv_exact(sock, size))
    except ValueError as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("frame is not a JSON object")
    return doc
