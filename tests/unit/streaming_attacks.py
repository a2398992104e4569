"""The attacks on the streaming server that the bounds tests replay (in-process and against a child
process): a header-block decompression bomb, a flood of early data frames, a huge frame length,
idle connections and a slow-loris. Each returns what the server did about it, never raises for a
server that hangs up."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import time
from urllib.parse import urlparse

from spdy_client import Client, bomb_block, data_frame, syn_stream_frame

from cri_shim import spdy

Frames = list[tuple[int, int, int, bytes]]


def send_bomb(url: str, inflated_size: int) -> Frames:
    """Upgrade, then one SYN_STREAM whose header block inflates to ``inflated_size`` bytes; the frames
    the server sent until it closed."""
    c = Client(url, timeout=60)
    try:
        assert c.status_line.startswith("HTTP/1.1 101"), c.status_line
        with contextlib.suppress(OSError):  # the server may hang up before it has read it all
            c.sock.sendall(syn_stream_frame(1, bomb_block(inflated_size)))
        return c.frames_until_closed()
    finally:
        c.close()


def flood_early_data(url: str, total: int, frame_size: int = 64 << 10) -> tuple[int, Frames]:
    """Upgrade, open only the error stream (so the streams are never complete), then send data frames
    on it until ``total`` bytes or the server hangs up: (bytes the server let through, its frames)."""
    c = Client(url, timeout=60)
    sent = 0
    try:
        c.create("error")
        chunk = data_frame(1, b"x" * frame_size)
        try:
            while sent < total:
                c.sock.sendall(chunk)
                sent += frame_size
        except OSError:
            pass
        return sent, c.frames_until_closed()
    finally:
        c.close()


def huge_frame(url: str, length: int = 0xFFFFFF, body: int = 0) -> Frames:
    """Upgrade, open the error stream, then a DATA frame header claiming ``length`` bytes followed by
    ``body`` bytes of it: the frames the server sent until it closed."""
    c = Client(url, timeout=60)
    try:
        c.create("error")
        try:
            c.sock.sendall(struct.pack(">II", 1, length))
            left = body
            while left > 0:
                n = min(left, 1 << 20)
                c.sock.sendall(b"y" * n)
                left -= n
        except OSError:
            pass
        return c.frames_until_closed()
    finally:
        c.close()


def open_idle(base_url: str, n: int) -> list[socket.socket]:
    """``n`` connections that send nothing (a refused connect, the listen queue being full for a
    moment, is tried again)."""
    u = urlparse(base_url)
    assert u.hostname and u.port
    socks: list[socket.socket] = []
    refused = 0
    while len(socks) < n:
        try:
            socks.append(socket.create_connection((u.hostname, u.port), timeout=10))
        except ConnectionRefusedError:
            refused += 1
            assert refused < 1000, "the server keeps refusing connections"
            time.sleep(0.01)
    return socks


def closed_by_server(sock: socket.socket, wait: float = 0.0) -> bytes | None:
    """What the server sent before it closed ``sock`` (b"" for a silent close), None if it is open."""
    got = b""
    while True:
        r, _, _ = select.select([sock], [], [], wait)
        if not r:
            return None
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return got
        if not data:
            return got
        got += data


def slow_loris(url: str, interval: float, give_up_after: float) -> tuple[int, bytes | None]:
    """Send the upgrade request one byte per ``interval``: (bytes sent before the server hung up,
    what it answered, None if it still had not after ``give_up_after`` seconds)."""
    u = urlparse(url)
    assert u.hostname and u.port
    request = (
        f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        "X-Stream-Protocol-Version: v4.channel.k8s.io\r\n" + "X-Padding: " + "p" * 400 + "\r\n\r\n"
    ).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    end = time.monotonic() + give_up_after
    sent = 0
    try:
        while sent < len(request) and time.monotonic() < end:
            answer = closed_by_server(sock, wait=interval)
            if answer is not None:
                return sent, answer
            try:
                sock.sendall(request[sent : sent + 1])
            except OSError:
                return sent, b""
            sent += 1
        return sent, None
    finally:
        sock.close()


def good_session(url: str, text: bytes = b"hello\r") -> bytes:
    """A well-behaved attach (error, stdin, stdout, resize streams with a TTY): sends ``text`` and
    returns what came back on stdout once the echo guest's answer (upper-cased) is there."""
    c = Client(url, timeout=30)
    try:
        assert c.status_line.startswith("HTTP/1.1 101"), c.status_line
        for t in ("error", "stdin", "stdout", "resize"):
            c.create(t)
        replies = [c.frame() for _ in range(4)]
        assert [r[0] for r in replies] == [spdy.SYN_REPLY] * 4, replies
        c.send("stdin", text)
        return c.read_stream("stdout", text.upper(), timeout=30)
    finally:
        c.close()
