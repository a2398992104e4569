"""A minimal SPDY/3.1 remote-command client for the streaming-server tests (just enough of
moby/spdystream's client side: upgrade, create streams, send/receive frames), plus the frame and
header-block builders the attack tests use. The real clients (crictl attach, kubectl attach through
kubelet) are exercised in tests/e2e/test_cri_kvm.py."""

from __future__ import annotations

import functools
import socket
import struct
import time
import zlib
from urllib.parse import urlparse

from cri_shim import spdy


def control_frame(kind: int, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">HHI", 0x8000 | spdy.VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    flags = spdy.FLAG_FIN if fin else 0
    return struct.pack(">II", stream_id, (flags << 24) | len(data)) + data


def syn_stream_frame(stream_id: int, block: bytes) -> bytes:
    """A SYN_STREAM with an already compressed header block."""
    return control_frame(spdy.SYN_STREAM, struct.pack(">IIBB", stream_id, 0, 0, 0) + block)


def compressed_block(deflate: zlib._Compress, headers: dict[str, str]) -> bytes:
    return deflate.compress(spdy.encode_headers(headers)) + deflate.flush(zlib.Z_SYNC_FLUSH)


@functools.lru_cache(maxsize=4)
def bomb_block(inflated_size: int) -> bytes:
    """A header block that inflates to ``inflated_size`` bytes (one header whose value is zeros):
    about 1000:1, so 256 MiB come from ~260 KiB. Built in 1 MiB steps so the builder itself stays
    small."""
    deflate = zlib.compressobj(zdict=spdy.SPDY3_HEADER_DICTIONARY)
    value_len = inflated_size - 4 - 4 - len(b"streamtype") - 4
    head = struct.pack(">II", 1, len(b"streamtype")) + b"streamtype" + struct.pack(">I", value_len)
    out = [deflate.compress(head)]
    chunk = b"\x00" * (1 << 20)
    left = value_len
    while left > 0:
        out.append(deflate.compress(chunk[: min(left, len(chunk))]))
        left -= len(chunk)
    out.append(deflate.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(out)


class Client:
    """Upgrade to SPDY/3.1 with the remote-command protocol, then create streams and exchange frames."""

    def __init__(
        self, url: str, protocols: tuple[str, ...] = ("v4.channel.k8s.io",), timeout: float = 10
    ) -> None:
        u = urlparse(url)
        assert u.hostname and u.port
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        hdrs = "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
        self.sock.sendall(
            f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\n"
            f"Upgrade: SPDY/3.1\r\n{hdrs}Content-Length: 0\r\n\r\n".encode()
        )
        self.rfile = self.sock.makefile("rb")
        self.status_line = self.rfile.readline().decode()
        self.headers: dict[str, str] = {}
        while (line := self.rfile.readline().decode().strip()) != "":
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.deflate = zlib.compressobj(zdict=spdy.SPDY3_HEADER_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=spdy.SPDY3_HEADER_DICTIONARY)
        self.next_id = 1
        self.ids: dict[str, int] = {}

    def body(self) -> str:
        n = int(self.headers.get("content-length", "0"))
        return self.rfile.read(n).decode()

    def create(self, stream_type: str, **headers: str) -> int:
        """Open a stream of ``stream_type`` (more headers: e.g. port-forward's port, requestID)."""
        sid, self.next_id = self.next_id, self.next_id + 2
        block = compressed_block(self.deflate, {"streamType": stream_type, **headers})
        self.sock.sendall(syn_stream_frame(sid, block))
        self.ids[stream_type] = sid
        return sid

    def send_to(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        self.sock.sendall(data_frame(stream_id, data, fin))

    def send(self, stream_type: str, data: bytes, fin: bool = False) -> None:
        self.sock.sendall(data_frame(self.ids[stream_type], data, fin))

    def ping(self, ping_id: int) -> None:
        self.sock.sendall(control_frame(spdy.PING, struct.pack(">I", ping_id)))

    def frame(self) -> tuple[int, int, int, bytes]:
        """(kind or 0 for DATA, stream id or ping id, flags, data); raises EOFError at the end."""
        head = self.rfile.read(8)
        if len(head) < 8:
            raise EOFError("server closed the connection")
        first, fl = struct.unpack(">II", head)
        data = self.rfile.read(fl & 0xFFFFFF)
        if first & 0x80000000:
            kind = first & 0xFFFF
            ident = struct.unpack_from(">I", data, 0)[0] & 0x7FFFFFFF
            if kind == spdy.SYN_REPLY:
                self.inflate.decompress(data[4:])
            return kind, ident, fl >> 24, data
        return 0, first, fl >> 24, data

    def frames_until_closed(self) -> list[tuple[int, int, int, bytes]]:
        frames = []
        try:
            while True:
                frames.append(self.frame())
        except (EOFError, OSError):
            return frames

    def read_stream(self, stream_type: str, until: bytes, timeout: float = 10) -> bytes:
        got = b""
        deadline = time.monotonic() + timeout
        while until not in got and time.monotonic() < deadline:
            kind, sid, _, data = self.frame()
            if kind == 0 and sid == self.ids[stream_type]:
                got += data
        return got

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()
