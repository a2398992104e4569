"""SPDY/3.1 framing, server side: what Kubernetes' remote-command streams (attach) run over.

kubelet proxies ``kubectl attach`` (and ``crictl attach`` talks directly) to the URL a CRI runtime
returns from ``Attach``, upgrading the HTTP connection to SPDY/3.1 (moby/spdystream on the client
side). A connection carries several client-initiated streams (error, stdin, stdout, stderr, resize);
this module reads and writes the frames that needs: SYN_STREAM / SYN_REPLY with zlib-compressed
header blocks (the SPDY/3 dictionary), DATA (with FIN), RST_STREAM, PING, GOAWAY; SETTINGS and
WINDOW_UPDATE are read and ignored (spdystream does no flow control).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
#: RST_STREAM status codes used here
PROTOCOL_ERROR, CANCEL = 1, 5
MAX_FRAME = 1 << 24

# The header-compression dictionary of the SPDY/3 draft (section 2.6.10.1), as spdystream uses it.
SPDY3_HEADER_DICTIONARY = (
    b"\x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\x00"
    b"\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-charset\x00"
    b"\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\raccept-ranges\x00"
    b"\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\rauthorization\x00\x00\x00\rcache-control"
    b"\x00\x00\x00\nconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10content-encoding\x00\x00"
    b"\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\x00\x10content-location\x00"
    b"\x00\x00\x0bcontent-md5\x00\x00\x00\rcontent-range\x00\x00\x00\x0ccontent-type\x00\x00\x00"
    b"\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\x00\x00\x07expires\x00\x00\x00\x04fro"
    b"m\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\x00\x00\x11if-modified-since\x00\x00\x00\r"
    b"if-none-match\x00\x00\x00\x08if-range\x00\x00\x00\x13if-unmodified-since\x00\x00\x00\rlast-m"
    b"odified\x00\x00\x00\x08location\x00\x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma\x00\x00"
    b"\x00\x12proxy-authenticate\x00\x00\x00\x13proxy-authorization\x00\x00\x00\x05range\x00\x00"
    b"\x00\x07referer\x00\x00\x00\x0bretry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00"
    b"\x00\x07trailer\x00\x00\x00\x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\nuser-ag"
    b"ent\x00\x00\x00\x04vary\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authent"
    b"icate\x00\x00\x00\x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200 OK"
    b"\x00\x00\x00\x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00"
    b"\x00\x00\nset-cookie\x00\x00\x00\nkeep-alive\x00\x00\x00\x06origin10010120120220520630030230"
    b"3304305306307402405406407408409410411412413414415416417502504505203 Non-Authoritative Inform"
    b"ation204 No Content301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not "
    b"Found500 Internal Server Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May "
    b"Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/htm"
    b"l,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javasc"
    b"ript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)


class ProtocolError(Exception):
    """The peer sent something that is not SPDY/3."""


@dataclass
class Frame:
    """One frame: ``kind`` is a control type (SYN_STREAM, ...) or 0 for DATA."""

    kind: int
    flags: int
    stream_id: int = 0
    data: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    value: int = 0  # PING id, RST_STREAM / GOAWAY status, WINDOW_UPDATE delta


def encode_headers(headers: dict[str, str]) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for k, v in headers.items():
        kb, vb = k.lower().encode(), v.encode()
        out += [struct.pack(">I", len(kb)), kb, struct.pack(">I", len(vb)), vb]
    return b"".join(out)


def decode_headers(block: bytes) -> dict[str, str]:
    try:
        (n,) = struct.unpack_from(">I", block, 0)
        off, out = 4, {}
        for _ in range(n):
            (kl,) = struct.unpack_from(">I", block, off)
            k = block[off + 4 : off + 4 + kl].decode()
            off += 4 + kl
            (vl,) = struct.unpack_from(">I", block, off)
            out[k] = block[off + 4 : off + 4 + vl].decode().split("\x00")[0]
            off += 4 + vl
        return out
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(f"malformed header block: {e}") from e


class Connection:
    """A SPDY/3.1 session on a connected socket, server side. Reads are for one thread; writes are
    serialized by a lock, so any thread may send."""

    def __init__(self, sock: socket.socket, rfile: BinaryIO | None = None) -> None:
        self.sock = sock
        self._rfile = rfile or sock.makefile("rb")
        self._wlock = threading.Lock()
        self._inflate = zlib.decompressobj(zdict=SPDY3_HEADER_DICTIONARY)
        self._deflate = zlib.compressobj(zdict=SPDY3_HEADER_DICTIONARY)
        self.closed = False

    def _read(self, n: int) -> bytes:
        b = self._rfile.read(n)
        if b is None or len(b) < n:
            raise EOFError("connection closed")
        return b

    def read_frame(self) -> Frame:
        head = self._read(8)
        first, flags_len = struct.unpack(">II", head)
        flags, length = flags_len >> 24, flags_len & 0xFFFFFF
        body = self._read(length) if length else b""
        if not first & 0x80000000:
            return Frame(0, flags, first & 0x7FFFFFFF, body)
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}, want {VERSION}")
        if kind == SYN_STREAM:
            if length < 10:
                raise ProtocolError("short SYN_STREAM")
            sid = struct.unpack_from(">I", body, 0)[0] & 0x7FFFFFFF
            try:
                block = self._inflate.decompress(body[10:])
            except zlib.error as e:
                raise ProtocolError(f"header block: {e}") from e
            return Frame(kind, flags, sid, headers=decode_headers(block))
        if kind in (RST_STREAM, WINDOW_UPDATE) and length >= 8:
            sid, value = struct.unpack_from(">II", body, 0)
            return Frame(kind, flags, sid & 0x7FFFFFFF, value=value)
        if kind == PING and length >= 4:
            return Frame(kind, flags, value=struct.unpack_from(">I", body, 0)[0])
        if kind == GOAWAY and length >= 4:
            return Frame(kind, flags, value=struct.unpack_from(">I", body, 0)[0])
        if kind in (HEADERS, SYN_REPLY) and length >= 4:
            sid = struct.unpack_from(">I", body, 0)[0] & 0x7FFFFFFF
            try:
                self._inflate.decompress(body[4:])  # keep the shared zlib stream in step
            except zlib.error as e:
                raise ProtocolError(f"header block: {e}") from e
            return Frame(kind, flags, sid)
        return Frame(kind, flags, data=body)  # SETTINGS and anything else: ignored by the caller

    def _control(self, kind: int, flags: int, payload: bytes) -> None:
        self._send(struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload)

    def _send(self, data: bytes) -> None:
        with self._wlock:
            if self.closed:
                raise EOFError("connection closed")
            self.sock.sendall(data)

    def syn_reply(self, stream_id: int, headers: dict[str, str] | None = None, fin: bool = False) -> None:
        with self._wlock:  # the compressor is stateful: compress and send in one critical section
            block = self._deflate.compress(encode_headers(headers or {})) + self._deflate.flush(
                zlib.Z_SYNC_FLUSH
            )
            payload = struct.pack(">I", stream_id) + block
            if not self.closed:
                self.sock.sendall(
                    struct.pack(
                        ">HHI", 0x8000 | VERSION, SYN_REPLY, ((FLAG_FIN if fin else 0) << 24) | len(payload)
                    )
                    + payload
                )

    def data(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        for off in range(0, max(len(data), 1), MAX_FRAME - 1):
            chunk = data[off : off + MAX_FRAME - 1]
            last = off + MAX_FRAME - 1 >= len(data)
            flags = FLAG_FIN if (fin and last) else 0
            self._send(struct.pack(">II", stream_id, (flags << 24) | len(chunk)) + chunk)

    def ping(self, ping_id: int) -> None:
        self._control(PING, 0, struct.pack(">I", ping_id))

    def rst_stream(self, stream_id: int, status: int) -> None:
        self._control(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def goaway(self, last_stream_id: int = 0) -> None:
        self._control(GOAWAY, 0, struct.pack(">II", last_stream_id, 0))

    def close(self) -> None:
        with self._wlock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
