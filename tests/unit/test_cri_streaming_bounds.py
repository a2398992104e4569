"""What a hostile client cannot make the streaming server (Attach) hold: each attack of
streaming_attacks.py against a server in this process, refused as SPDY/HTTP say, the limit named and
counted, and the memory the whole process allocated meanwhile (tracemalloc, every thread) kept under
a small bound. The same attacks, bigger, against a server in a child process whose resident memory
is read from /proc are in test_cri_streaming_process.py; a good attach session is in
test_cri_streaming.py. The bombs here inflate to at most 60 MiB, so that a regression costs this
process hundreds of MiB, not GiBs."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import select
import socket
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

import pytest
import streaming_attacks as attacks
from helpers.ptys import console_pty
from hypothesis import given, settings
from hypothesis import strategies as st
from spdy_client import Client, bomb_block, compressed_block, control_frame, data_frame, syn_stream_frame

from cri_shim import spdy
from cri_shim.console_fanout import ConsoleFanout
from cri_shim.streaming import StreamingLimits, StreamingServer, open_pty

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
#: what one attack may make the process allocate at its peak (the limits allow ~1.5 MiB per connection)
BOUND = 4 * MiB


@contextlib.contextmanager
def traced_peak() -> Iterator[list[int]]:
    """[bytes]: the peak the process allocated inside the block above what it held at its start."""
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    out = [0]
    try:
        yield out
    finally:
        out[0] = tracemalloc.get_traced_memory()[1] - base
        if started_here:
            tracemalloc.stop()


@pytest.fixture
def console():
    """(the guest side, the path): a pty whose master plays the VM (QEMU holds the master)."""
    with console_pty() as c:
        yield c


@pytest.fixture
def make_server() -> Iterator[Callable[..., StreamingServer]]:
    servers: list[StreamingServer] = []

    def make(**limits: object) -> StreamingServer:
        servers.append(StreamingServer(limits=StreamingLimits(**limits)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def url_for(server: StreamingServer, path: str, tty: bool = True) -> str:
    consoles = ConsoleFanout(open_pty)
    return server.attach_url(lambda: consoles.tap(path), "vm", stdin=True, stdout=True, stderr=False, tty=tty)


def goaway_status(frames: attacks.Frames) -> int | None:
    for kind, _, _, data in frames:
        if kind == spdy.GOAWAY:
            return int(struct.unpack_from(">I", data, 4)[0])
    return None


def rst_streams(frames: attacks.Frames) -> list[tuple[int, int]]:
    """(stream id, status) of each RST_STREAM."""
    return [
        (ident, struct.unpack_from(">I", data, 4)[0])
        for kind, ident, _, data in frames
        if kind == spdy.RST_STREAM
    ]


def read_guest(guest: int, until: bytes, limit: float = 10) -> bytes:
    """What the console's guest side got, once ``until`` is in it (or ``limit`` seconds passed;
    EIO: the console side is not open yet)."""
    got, end = b"", time.monotonic() + limit
    while until not in got and (left := end - time.monotonic()) > 0:
        if select.select([guest], [], [], left)[0]:
            try:
                got += os.read(guest, 4096)
            except OSError as e:
                assert e.errno == errno.EIO, e
                time.sleep(0.05)
    return got


def wait_until(condition: Callable[[], bool], what: str, limit: float = 30) -> None:
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"still not so after {limit} s: {what}"
        time.sleep(0.05)


# --- the header block: inflated no further than its limit ---


def test_a_header_bomb_stops_at_the_header_block_limit(make_server, console):
    server = make_server()
    block = bomb_block(60 * MiB)  # ~60 KiB that inflate to 60 MiB: fits a control frame
    assert len(block) < spdy.MAX_CONTROL_FRAME_BYTES
    url = url_for(server, console[1])
    with traced_peak() as peak:
        frames = attacks.send_bomb(url, 60 * MiB)
    assert peak[0] < BOUND, f"{peak[0] / MiB:.1f} MiB"
    assert goaway_status(frames) == spdy.GOAWAY_PROTOCOL_ERROR
    assert server.limit_hits["max_header_block"] == 1


def test_the_inflater_alone_never_goes_past_its_limit():
    """Connection.read_frame on a block inflating to 60 MiB with a control frame big enough: the
    limit is the header block's, 64 KiB, whatever the frame limit."""
    limits = spdy.FrameLimits(max_control_frame=MiB)
    frame = syn_stream_frame(1, bomb_block(60 * MiB))
    a, b = socket.socketpair()
    try:
        conn = spdy.Connection(a, rfile=io.BytesIO(frame), limits=limits)
        with traced_peak() as peak, pytest.raises(spdy.LimitExceeded, match="max_header_block") as e:
            conn.read_frame()
        assert peak[0] < 512 << 10, f"{peak[0]} bytes"
        assert e.value.limit == "max_header_block"
    finally:
        a.close()
        b.close()


def test_a_block_exactly_at_the_limit_is_accepted_and_one_byte_more_is_not():
    """The limit is inclusive, and the error names the option."""
    limits = spdy.FrameLimits(max_header_block=22 + 100)  # count, name length, name, value length
    for extra, ok in ((0, True), (1, False)):
        deflate = zlib.compressobj(zdict=spdy.SPDY3_HEADER_DICTIONARY)
        value = b"v" * (100 + extra)
        raw = struct.pack(">II", 1, 10) + b"streamtype" + struct.pack(">I", len(value)) + value
        block = deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)
        conn = spdy.Connection(socket.socket(), rfile=io.BytesIO(syn_stream_frame(1, block)), limits=limits)
        try:
            if ok:
                assert conn.read_frame().headers == {"streamtype": value.decode()}
            else:
                with pytest.raises(spdy.LimitExceeded, match=r"\(max_header_block\)"):
                    conn.read_frame()
        finally:
            conn.sock.close()


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack(">I", 65), r"65 headers: over the limit of 64 \(max_headers\)"),
        (struct.pack(">II", 1, 300) + b"n" * 300, r"name of 300 bytes: over the limit of 256"),
        (struct.pack(">II", 1, 1) + b"n" + struct.pack(">I", 20000) + b"v" * 20000, r"\(max_header_value\)"),
        (struct.pack(">II", 1, 50) + b"n", "runs past the block's end"),
        (struct.pack(">II", 1, 0) + struct.pack(">I", 0), "empty name"),
        (b"\x00\x00", "no header count"),
        (struct.pack(">II", 1, 2) + b"\xff\xfe" + struct.pack(">I", 0), "malformed header block"),
    ],
)
def test_malformed_or_oversized_header_blocks_are_named(raw, match):
    with pytest.raises(spdy.ProtocolError, match=match):
        spdy.decode_headers(raw)


# --- frames: refused by their length, before their body is read ---


def test_a_huge_data_frame_header_is_refused_before_its_body(make_server, console):
    """A DATA frame claiming 16 MiB and never sending them: the server cannot be waiting for the
    body (it would wait until the stream creation deadline, an hour here), it answers at once."""
    server = make_server(stream_creation_timeout=3600.0)
    url = url_for(server, console[1])
    with traced_peak() as peak:
        frames = attacks.huge_frame(url, length=0xFFFFFF, body=0)
    assert peak[0] < BOUND, f"{peak[0] / MiB:.1f} MiB"
    assert rst_streams(frames) == [(1, spdy.FRAME_TOO_LARGE)]
    assert goaway_status(frames) == spdy.GOAWAY_PROTOCOL_ERROR
    assert server.limit_hits["max_data_frame"] == 1


def test_a_big_control_frame_is_refused_with_goaway(make_server, console):
    """A SYN_STREAM of 200 KiB (an incompressible header value): over max_control_frame, refused by
    its length (GOAWAY only: the header compression state is lost with it)."""
    server = make_server(stream_creation_timeout=3600.0)
    c = Client(url_for(server, console[1]))
    try:
        deflate = zlib.compressobj(zdict=spdy.SPDY3_HEADER_DICTIONARY)
        block = compressed_block(deflate, {"streamtype": os.urandom(100 << 10).hex()})
        c.sock.sendall(syn_stream_frame(1, block)[:1000])  # the length is in the first 8 bytes
        frames = c.frames_until_closed()
    finally:
        c.close()
    assert goaway_status(frames) == spdy.GOAWAY_PROTOCOL_ERROR and rst_streams(frames) == []
    assert server.limit_hits["max_control_frame"] == 1


# --- before the streams are complete: what is kept is capped ---


def test_a_flood_of_early_data_is_cut_at_max_pending(make_server, console):
    server = make_server()
    url = url_for(server, console[1])
    with traced_peak() as peak:
        sent, _ = attacks.flood_early_data(url, total=64 * MiB)
    assert peak[0] < BOUND, f"{peak[0] / MiB:.1f} MiB"
    assert sent < 64 * MiB, "the server read the whole flood"
    assert server.limit_hits["max_pending"] == 1


def test_early_stdin_over_max_pending_stream_resets_the_stream(make_server, console):
    server = make_server()
    c = Client(url_for(server, console[1]))
    try:
        c.create("error")
        c.create("stdin")  # stdout and resize never come
        for _ in range(3):
            c.send("stdin", b"k" * (30 << 10))  # 90 KiB > 64 KiB
        frames = c.frames_until_closed()
    finally:
        c.close()
    assert rst_streams(frames) == [(c.ids["stdin"], spdy.FLOW_CONTROL_ERROR)]
    assert goaway_status(frames) == spdy.GOAWAY_PROTOCOL_ERROR
    assert server.limit_hits["max_pending_stream"] == 1


def test_early_stdin_within_the_limit_still_reaches_the_console(make_server, console):
    """What a good client may do (stdin right after its stream, before the last stream) is kept."""
    guest, path = console
    server = make_server()
    c = Client(url_for(server, path))
    try:
        c.create("error")
        c.create("stdin")
        c.send("stdin", b"early\r")
        c.create("stdout")
        c.create("resize")
        assert read_guest(guest, b"early\r") == b"early\r"
    finally:
        c.close()
    assert not server.limit_hits


def test_more_streams_than_max_streams_end_the_session(make_server, console):
    server = make_server()
    c = Client(url_for(server, console[1]))
    try:
        for _ in range(9):
            c.create("junk")  # not a remote-command stream: answered, never counted
        frames = c.frames_until_closed()
    finally:
        c.close()
    assert [k for k, _, _, _ in frames].count(spdy.SYN_REPLY) == 8
    assert rst_streams(frames) == [(17, spdy.REFUSED_STREAM)]
    assert goaway_status(frames) == spdy.GOAWAY_PROTOCOL_ERROR
    assert server.limit_hits["max_streams"] == 1


def test_streams_not_complete_in_time_end_the_connection(make_server, console):
    """A slow-loris after the upgrade: a byte a second of the next frame does not extend the
    stream creation deadline."""
    server = make_server(stream_creation_timeout=2.0)
    c = Client(url_for(server, console[1]))
    try:
        c.create("error")
        assert c.frame()[0] == spdy.SYN_REPLY
        frame, sent = data_frame(1, b"z" * 100), 0
        while attacks.closed_by_server(c.sock, wait=0.25) is None:
            assert sent < len(frame), "the server waited for the whole slow frame"
            c.sock.sendall(frame[sent : sent + 1])
            sent += 1
    finally:
        c.close()
    assert server.limit_hits["stream_creation_timeout"] == 1


# --- connections: deadlines, head size, how many ---


def test_a_slow_loris_gets_408_at_the_handshake_deadline(make_server, console):
    server = make_server(handshake_timeout=2.0)
    sent, answer = attacks.slow_loris(url_for(server, console[1]), interval=0.25, give_up_after=60)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"(handshake_timeout)" in answer
    assert sent < 100, "the server let the slow request run on"
    assert server.limit_hits["handshake_timeout"] == 1


def test_an_idle_connection_gets_408_at_the_handshake_deadline(make_server):
    server = make_server(handshake_timeout=1.0)
    (sock,) = attacks.open_idle(server.base_url, 1)
    try:
        answer = attacks.closed_by_server(sock, wait=30)
    finally:
        sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 ")


def test_a_request_head_over_the_limit_gets_431(make_server, console):
    server = make_server()
    (sock,) = attacks.open_idle(server.base_url, 1)
    try:
        pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(80))  # 80 KiB
        sock.sendall(b"POST " + urlparse(url_for(server, console[1])).path.encode() + b" HTTP/1.1\r\n" + pad)
        answer = attacks.closed_by_server(sock, wait=30)
    finally:
        sock.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 431 "), answer
    assert server.limit_hits["max_request_head"] == 1


def test_idle_connections_beyond_max_handshakes_push_out_the_oldest_and_attach_still_works(
    make_server, console
):
    """50 idle connections against max_handshakes=8: never more than 8 held (threads bounded), and a
    good client still gets through while they are there."""
    guest, path = console
    server = make_server(max_handshakes=8)
    threads_before = threading.active_count()
    with traced_peak() as peak:
        socks = attacks.open_idle(server.base_url, 50)
        try:
            wait_until(lambda: sum(attacks.closed_by_server(s) is None for s in socks) <= 8, "at most 8 open")
            wait_until(
                lambda: threading.active_count() <= threads_before + 8, "one thread per held connection"
            )
            c = Client(url_for(server, path))
            try:
                for t in ("error", "stdin", "stdout", "resize"):
                    c.create(t)
                assert [c.frame()[0] for _ in range(4)] == [spdy.SYN_REPLY] * 4
                os.write(guest, b"still here")
                assert b"still here" in c.read_stream("stdout", b"still here")
            finally:
                c.close()
        finally:
            for s in socks:
                s.close()
    assert peak[0] < BOUND, f"{peak[0] / MiB:.1f} MiB"
    assert server.limit_hits["max_handshakes"] >= 42


def test_sessions_beyond_max_sessions_get_503_and_keep_their_token(make_server, console):
    _, path = console
    server = make_server(max_sessions=1)
    first = Client(url_for(server, path))
    try:
        first.create("error")
        assert first.frame()[0] == spdy.SYN_REPLY
        url = url_for(server, path)
        refused = Client(url)
        assert refused.status_line.startswith("HTTP/1.1 503") and "(max_sessions)" in refused.body()
        refused.close()
    finally:
        first.close()

    def served() -> bool:
        c = Client(url)
        c.close()
        return c.status_line.startswith("HTTP/1.1 101")

    wait_until(served, "the same token is served once the first session is gone")
    assert server.limit_hits["max_sessions"] >= 1


def test_an_idle_session_ends_with_a_failure_status_and_traffic_keeps_it(make_server, console):
    _, path = console
    server = make_server(idle_timeout=2.0)
    c = Client(url_for(server, path))
    try:
        for t in ("error", "stdin", "stdout", "resize"):
            c.create(t)
        assert [c.frame()[0] for _ in range(4)] == [spdy.SYN_REPLY] * 4
        for i in range(15):  # 3 s of pings 0.2 s apart: longer than the idle timeout, never idle
            c.ping(i)
            assert c.frame()[:2] == (spdy.PING, i)
            time.sleep(0.2)
        frames = c.frames_until_closed()  # now silent: the server ends it
    finally:
        c.close()
    err = [f for f in frames if f[0] == 0 and f[1] == c.ids["error"]]
    status = json.loads(err[0][3])
    assert status["status"] == "Failure" and "(idle_timeout)" in status["message"]
    assert server.limit_hits["idle_timeout"] == 1


def test_limits_must_be_positive_and_the_error_names_the_field():
    with pytest.raises(ValueError, match=r"StreamingLimits\.max_sessions must be above 0"):
        StreamingLimits(max_sessions=0)
    with pytest.raises(ValueError, match=r"FrameLimits\.max_data_frame must be above 0"):
        spdy.FrameLimits(max_data_frame=-1)


def test_limit_hits_are_logged_at_most_once_per_interval(make_server, caplog):
    server = make_server()
    with caplog.at_level("WARNING", logger="cri_shim.streaming"):
        for _ in range(5):
            server.limit_hit("max_handshakes", "a test hit (max_handshakes)")
    assert server.limit_hits["max_handshakes"] == 5
    assert [r.getMessage() for r in caplog.records] == ["streaming: a test hit (max_handshakes)"]


# --- the frame parser, fuzzed ---


def valid_frames() -> bytes:
    """One of each frame a session may see, header blocks sharing one compression stream."""
    deflate = zlib.compressobj(zdict=spdy.SPDY3_HEADER_DICTIONARY)
    return b"".join(
        [
            syn_stream_frame(1, compressed_block(deflate, {"streamtype": "error"})),
            syn_stream_frame(3, compressed_block(deflate, {"streamtype": "stdin", "x-extra": "a\x00b"})),
            data_frame(3, b"hello"),
            data_frame(3, b"", fin=True),
            control_frame(spdy.PING, struct.pack(">I", 7)),
            control_frame(spdy.SETTINGS, struct.pack(">III", 1, 0x01000004, 1000)),
            control_frame(spdy.WINDOW_UPDATE, struct.pack(">II", 1, 100)),
            control_frame(spdy.HEADERS, struct.pack(">I", 1) + compressed_block(deflate, {"a": "b"})),
            control_frame(spdy.RST_STREAM, struct.pack(">II", 3, spdy.CANCEL)),
            control_frame(spdy.GOAWAY, struct.pack(">II", 3, 0)),
        ]
    )


VALID = valid_frames()
WORDS = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x00FFFFFF, 0x01000000, 0x7FFFFFFF, 0x80000000, 0x80030001, 0xFFFFFFFF]
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(1, 255)),
    st.tuples(st.just("word"), st.integers(0, len(VALID) - 4), st.sampled_from(WORDS)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, len(VALID) - 1), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, len(VALID) - 1), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, object]]) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        pos = min(pos, max(len(b) - 1, 0))
        if op == "flip" and b:
            b[pos] ^= int(arg)  # type: ignore[call-overload]
        elif op == "word" and len(b) >= pos + 4:
            b[pos : pos + 4] = struct.pack(">I", arg)
        elif op == "insert":
            b[pos:pos] = arg  # type: ignore[assignment]
        elif op == "delete":
            del b[pos : pos + int(arg)]  # type: ignore[call-overload]
        elif op == "truncate":
            del b[pos:]
    return bytes(b)


@settings(max_examples=int(os.environ.get("CRI_STREAMING_FUZZ_EXAMPLES", "200")), deadline=None)
@given(st.lists(mutation, min_size=1, max_size=8))
def test_the_frame_parser_survives_mutated_frames(ops):
    """Whatever the bytes: frames within the limits, or ProtocolError (or EOFError at the end);
    never another exception, never more frames than the bytes allow."""
    data = mutate(VALID, ops)
    lim = spdy.FrameLimits()
    a, b = socket.socketpair()
    try:
        conn = spdy.Connection(a, rfile=io.BytesIO(data), limits=lim)
        for _ in range(len(data) // 8 + 1):
            try:
                f = conn.read_frame()
            except (spdy.ProtocolError, EOFError):
                break
            assert len(f.data) <= max(lim.max_data_frame, lim.max_control_frame)
            assert len(f.headers) <= lim.max_headers
            assert all(
                len(k) <= lim.max_header_name and len(v) <= lim.max_header_value for k, v in f.headers.items()
            )
        else:
            pytest.fail("more frames than 8-byte headers in the input")
    finally:
        a.close()
        b.close()
