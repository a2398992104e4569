"""SPDY/3.1 framing, server side: what Kubernetes' remote-command streams (attach) run over.

kubelet proxies ``kubectl attach`` (and ``crictl attach`` talks directly) to the URL a CRI runtime
returns from ``Attach``, upgrading the HTTP connection to SPDY/3.1 (moby/spdystream on the client
side). A connection carries several client-initiated streams (error, stdin, stdout, stderr, resize);
this module reads and writes the frames that needs: SYN_STREAM / SYN_REPLY with zlib-compressed
header blocks (the SPDY/3 dictionary), DATA (with FIN), RST_STREAM, PING, GOAWAY; SETTINGS and
WINDOW_UPDATE are read and ignored (spdystream does no flow control).

Whatever the peer sends is bounded before it costs memory (``FrameLimits``): a frame's length is
checked against the limit of its kind before its body is read, a header block is inflated at most to
its limit (a zlib bomb stops there), and the header count and sizes are checked while decoding. A
frame over a limit raises ``LimitExceeded``; ``Connection.refuse`` then answers as SPDY/3.1 says
(RST_STREAM FRAME_TOO_LARGE for the stream when the error is one stream's, GOAWAY PROTOCOL_ERROR) and
closes the session: the shared header-compression state cannot be trusted past a refused frame.
"""

from __future__ import annotations

import contextlib
import io
import select
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
#: RST_STREAM status codes used here
PROTOCOL_ERROR, REFUSED_STREAM, CANCEL, FLOW_CONTROL_ERROR, FRAME_TOO_LARGE = 1, 3, 5, 7, 11
#: GOAWAY status codes
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR = 0, 1
#: the largest frame SPDY can express (24-bit length); what we send stays under it
MAX_FRAME = 1 << 24

# Limits on what a peer may send. The remote-command clients (client-go over spdystream, through
# kubelet's proxy, which copies bytes unchanged) write stdin in frames of at most 32 KiB and open each
# stream with one header ("streamtype") of a few dozen bytes: these leave a wide margin for them and
# bound what one connection can make us hold.
#: a DATA frame's body (32x the 32 KiB chunks of client-go's stdin copy)
MAX_DATA_FRAME_BYTES = 1 << 20
#: a control frame's body (a SYN_STREAM's compressed header block is in it)
MAX_CONTROL_FRAME_BYTES = 64 << 10
#: a header block once inflated (HTTP servers allow 8 KiB (nginx) to 1 MiB (Go) of headers)
MAX_HEADER_BLOCK_BYTES = 64 << 10
#: headers in one block, and the size of one name and one value
MAX_HEADERS = 64
MAX_HEADER_NAME_BYTES = 256
MAX_HEADER_VALUE_BYTES = 16 << 10
#: how long and how much ``Connection.close(linger)`` reads and discards after our last frames
LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


@dataclass(frozen=True)
class FrameLimits:
    """What one peer may send, in bytes (see the constants above for the reasons)."""

    max_data_frame: int = MAX_DATA_FRAME_BYTES
    max_control_frame: int = MAX_CONTROL_FRAME_BYTES
    max_header_block: int = MAX_HEADER_BLOCK_BYTES
    max_headers: int = MAX_HEADERS
    max_header_name: int = MAX_HEADER_NAME_BYTES
    max_header_value: int = MAX_HEADER_VALUE_BYTES

    def __post_init__(self) -> None:
        check_positive(self, "FrameLimits")


def check_positive(limits: object, kind: str) -> None:
    """Every number of a limits dataclass must be above zero: a clear error naming the field."""
    for name, value in vars(limits).items():
        if isinstance(value, int | float) and not value > 0:
            raise ValueError(f"{kind}.{name} must be above 0 (got {value!r})")


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
    """The peer sent something that is not SPDY/3 (a session error). ``stream_id`` and ``status``
    name the RST_STREAM to send first when one stream is at fault (0: none)."""

    def __init__(self, message: str, *, stream_id: int = 0, status: int = 0) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.status = status


class LimitExceeded(ProtocolError):
    """The peer went over one of our limits; ``limit`` is the name of the option."""

    def __init__(self, limit: str, message: str, *, stream_id: int = 0, status: int = 0) -> None:
        super().__init__(message, stream_id=stream_id, status=status)
        self.limit = limit


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


def data_frame(stream_id: int, data: bytes, fin: bool = False) -> bytes:
    """One DATA frame (``data`` under MAX_FRAME)."""
    return struct.pack(">II", stream_id, ((FLAG_FIN if fin else 0) << 24) | len(data)) + data


def _field(block: bytes, off: int, what: str, limit: int, option: str) -> tuple[bytes, int]:
    """The length-prefixed string at ``off`` and the offset after it."""
    if off + 4 > len(block):
        raise ProtocolError(f"malformed header block: {what} length cut off at byte {off}")
    (n,) = struct.unpack_from(">I", block, off)
    if n > limit:
        raise LimitExceeded(option, f"header {what} of {n} bytes: over the limit of {limit} ({option})")
    if off + 4 + n > len(block):
        raise ProtocolError(f"malformed header block: {what} of {n} bytes runs past the block's end")
    return block[off + 4 : off + 4 + n], off + 4 + n


def decode_headers(block: bytes, limits: FrameLimits | None = None) -> dict[str, str]:
    """A decompressed SPDY/3 header block as {lower-case name: first value}."""
    lim = limits or FrameLimits()
    if len(block) < 4:
        raise ProtocolError("malformed header block: no header count")
    (n,) = struct.unpack_from(">I", block, 0)
    if n > lim.max_headers:
        raise LimitExceeded("max_headers", f"{n} headers: over the limit of {lim.max_headers} (max_headers)")
    off, out = 4, {}
    try:
        for _ in range(n):
            name, off = _field(block, off, "name", lim.max_header_name, "max_header_name")
            value, off = _field(block, off, "value", lim.max_header_value, "max_header_value")
            if not name:
                raise ProtocolError("malformed header block: a header with an empty name")
            out[name.decode().lower()] = value.decode().split("\x00")[0]
    except UnicodeDecodeError as e:
        raise ProtocolError(f"malformed header block: {e}") from e
    return out


class Connection:
    """A SPDY/3.1 session on a connected socket, server side. Reads are for one thread; writes are
    serialized by a lock, so any thread may send. ``last_sent`` is when a write last completed."""

    def __init__(
        self,
        sock: socket.socket,
        rfile: BinaryIO | io.BufferedIOBase | None = None,
        *,
        limits: FrameLimits | None = None,
    ) -> None:
        self.sock = sock
        self.limits = limits or FrameLimits()
        self._rfile = rfile or sock.makefile("rb")
        self._wlock = threading.Lock()
        self._close_lock = threading.Lock()
        self._inflate = zlib.decompressobj(zdict=SPDY3_HEADER_DICTIONARY)
        self._deflate = zlib.compressobj(zdict=SPDY3_HEADER_DICTIONARY)
        self.closed = False
        self.last_stream_id = 0  # the highest stream the peer opened: GOAWAY's last-good-stream-id
        self.last_sent = time.monotonic()

    def _read(self, n: int) -> bytes:
        b = self._rfile.read(n)
        if b is None or len(b) < n:
            raise EOFError("connection closed")
        return b

    def read_frame(self) -> Frame:
        """The next frame; its length is checked against ``limits`` before its body is read."""
        first, flags_len = struct.unpack(">II", self._read(8))
        flags, length = flags_len >> 24, flags_len & 0xFFFFFF
        if not first & 0x80000000:
            sid, cap = first & 0x7FFFFFFF, self.limits.max_data_frame
            if length > cap:
                raise LimitExceeded(
                    "max_data_frame",
                    f"DATA frame of {length} bytes on stream {sid}: over the limit of {cap} (max_data_frame)",
                    stream_id=sid,
                    status=FRAME_TOO_LARGE,
                )
            return Frame(0, flags, sid, self._read(length) if length else b"")
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise ProtocolError(f"SPDY version {version}, want {VERSION}")
        cap = self.limits.max_control_frame
        if length > cap:  # no RST_STREAM: the compression state would be out of step anyway
            raise LimitExceeded(
                "max_control_frame",
                f"control frame (type {kind}) of {length} bytes: over the limit of {cap} (max_control_frame)",
            )
        return self._control(kind, flags, self._read(length) if length else b"")

    def _control(self, kind: int, flags: int, body: bytes) -> Frame:
        length = len(body)
        if kind == SYN_STREAM:
            if length < 10:
                raise ProtocolError("short SYN_STREAM")
            sid = struct.unpack_from(">I", body, 0)[0] & 0x7FFFFFFF
            self.last_stream_id = max(self.last_stream_id, sid)
            return Frame(
                kind, flags, sid, headers=decode_headers(self._inflate_block(body[10:]), self.limits)
            )
        if kind in (RST_STREAM, WINDOW_UPDATE) and length >= 8:
            sid, value = struct.unpack_from(">II", body, 0)
            return Frame(kind, flags, sid & 0x7FFFFFFF, value=value)
        if kind in (PING, GOAWAY) and length >= 4:
            return Frame(kind, flags, value=struct.unpack_from(">I", body, 0)[0])
        if kind in (HEADERS, SYN_REPLY) and length >= 4:
            sid = struct.unpack_from(">I", body, 0)[0] & 0x7FFFFFFF
            self._inflate_block(body[4:])  # keep the shared zlib stream in step
            return Frame(kind, flags, sid)
        return Frame(kind, flags, data=body)  # SETTINGS and anything else: ignored by the caller

    def _inflate_block(self, compressed: bytes) -> bytes:
        """Inflate one header block, never past ``max_header_block`` (+1 byte to tell "exactly at
        the limit" from "over it"): a bomb costs us the limit, not what it would inflate to."""
        cap = self.limits.max_header_block
        try:
            block = self._inflate.decompress(compressed, cap + 1)
        except zlib.error as e:
            raise ProtocolError(f"header block: {e}") from e
        if len(block) > cap or self._inflate.unconsumed_tail:
            raise LimitExceeded(
                "max_header_block", f"header block inflates past the limit of {cap} bytes (max_header_block)"
            )
        return block

    def _frame(self, kind: int, flags: int, payload: bytes) -> bytes:
        return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload

    def send(self, data: bytes) -> None:
        """Send whole frames (blocking, bounded by the socket's timeout)."""
        with self._wlock:
            if self.closed:
                raise EOFError("connection closed")
            self.sock.sendall(data)
            self.last_sent = time.monotonic()

    def syn_reply(self, stream_id: int, headers: dict[str, str] | None = None, fin: bool = False) -> None:
        with self._wlock:  # the compressor is stateful: compress and send in one critical section
            block = self._deflate.compress(encode_headers(headers or {})) + self._deflate.flush(
                zlib.Z_SYNC_FLUSH
            )
            frame = self._frame(SYN_REPLY, FLAG_FIN if fin else 0, struct.pack(">I", stream_id) + block)
            if not self.closed:
                self.sock.sendall(frame)
                self.last_sent = time.monotonic()

    def data(self, stream_id: int, data: bytes, fin: bool = False) -> None:
        for off in range(0, max(len(data), 1), MAX_FRAME - 1):
            last = off + MAX_FRAME - 1 >= len(data)
            self.send(data_frame(stream_id, data[off : off + MAX_FRAME - 1], fin and last))

    def ping(self, ping_id: int) -> None:
        self.send(self._frame(PING, 0, struct.pack(">I", ping_id)))

    def rst_stream(self, stream_id: int, status: int) -> None:
        self.send(self._frame(RST_STREAM, 0, struct.pack(">II", stream_id, status)))

    def goaway(self, last_stream_id: int = 0, status: int = GOAWAY_OK) -> None:
        self.send(self._frame(GOAWAY, 0, struct.pack(">II", last_stream_id, status)))

    def refuse(self, error: ProtocolError, linger: float = LINGER_SECONDS) -> None:
        """End the session for ``error`` as SPDY/3.1 says: RST_STREAM first if one stream is at
        fault, then GOAWAY PROTOCOL_ERROR; then close (lingering, see ``close``)."""
        frames = b""
        if error.stream_id and error.status:
            frames = self._frame(RST_STREAM, 0, struct.pack(">II", error.stream_id, error.status))
        frames += self._frame(GOAWAY, 0, struct.pack(">II", self.last_stream_id, GOAWAY_PROTOCOL_ERROR))
        self.send_nowait(frames)
        self.close(linger)

    def send_nowait(self, frames: bytes) -> None:
        """Best effort for last words: skipped if another writer holds the socket for a second or
        the peer's window is full (a peer that does not read must not hold us)."""
        if not self._wlock.acquire(timeout=1.0):
            return
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLOUT)
            if not self.closed and poller.poll(0):
                with contextlib.suppress(OSError):
                    self.sock.send(frames)
        finally:
            self._wlock.release()

    def close(self, linger: float = 0.0) -> None:
        """Close the socket (any thread, any time: a writer blocked on it gets an error). With
        ``linger``, half-close first and read and discard what the peer still sends (at most
        ``linger`` seconds and LINGER_BYTES), so our last frames reach it rather than a reset."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        if linger > 0:
            with contextlib.suppress(OSError):
                self._discard_input(linger)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _discard_input(self, linger: float) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        end, left, buf = time.monotonic() + linger, LINGER_BYTES, bytearray(64 << 10)
        while left > 0 and (wait := end - time.monotonic()) > 0:
            if not poller.poll(wait * 1000) or (n := self.sock.recv_into(buf)) == 0:
                return
            left -= n
