"""The shim's streaming server (Attach) against a pty standing in for a VM's serial console, with a
minimal SPDY/3.1 client written here. The real clients (crictl attach, kubectl attach through
kubelet) are exercised in tests/e2e/test_cri_kvm.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import time
import zlib
from urllib.parse import urlparse

import pytest

from cri_shim import spdy
from cri_shim.streaming import StreamingServer, open_pty


class Client:
    """Just enough of moby/spdystream's client side: upgrade, create streams, send/receive data."""

    def __init__(self, url: str, protocols: tuple[str, ...] = ("v4.channel.k8s.io",)) -> None:
        u = urlparse(url)
        self.sock = socket.create_connection((u.hostname, u.port), timeout=10)
        hdrs = "".join(f"X-Stream-Protocol-Version: {p}\r\n" for p in protocols)
        self.sock.sendall(
            f"POST {u.path} HTTP/1.1\r\nHost: {u.netloc}\r\nConnection: Upgrade\r\n"
            f"Upgrade: SPDY/3.1\r\n{hdrs}Content-Length: 0\r\n\r\n".encode()
        )
        self.rfile = self.sock.makefile("rb")
        self.status_line = self.rfile.readline().decode()
        self.headers = {}
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

    def create(self, stream_type: str) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        block = self.deflate.compress(spdy.encode_headers({"streamType": stream_type}))
        block += self.deflate.flush(zlib.Z_SYNC_FLUSH)
        payload = struct.pack(">IIBB", sid, 0, 0, 0) + block
        self.sock.sendall(struct.pack(">HHI", 0x8003, spdy.SYN_STREAM, len(payload)) + payload)
        self.ids[stream_type] = sid
        return sid

    def send(self, stream_type: str, data: bytes, fin: bool = False) -> None:
        flags = spdy.FLAG_FIN if fin else 0
        self.sock.sendall(struct.pack(">II", self.ids[stream_type], (flags << 24) | len(data)) + data)

    def ping(self, ping_id: int) -> None:
        self.sock.sendall(struct.pack(">HHII", 0x8003, spdy.PING, 4, ping_id))

    def frame(self) -> tuple[int, int, int, bytes]:
        """(kind or 0 for DATA, stream id or ping id, flags, data)."""
        first, fl = struct.unpack(">II", self.rfile.read(8))
        data = self.rfile.read(fl & 0xFFFFFF)
        if first & 0x80000000:
            kind = first & 0xFFFF
            ident = struct.unpack_from(">I", data, 0)[0] & 0x7FFFFFFF
            if kind == spdy.SYN_REPLY:
                self.inflate.decompress(data[4:])
            return kind, ident, fl >> 24, data
        return 0, first, fl >> 24, data

    def read_stream(self, stream_type: str, until: bytes, timeout: float = 10) -> bytes:
        got = b""
        deadline = time.monotonic() + timeout
        while until not in got and time.monotonic() < deadline:
            kind, sid, _, data = self.frame()
            if kind == 0 and sid == self.ids[stream_type]:
                got += data
        return got


@pytest.fixture
def server():
    s = StreamingServer()
    yield s
    s.close()


@pytest.fixture
def console():
    """(the guest side, the path): a pty whose master plays the VM (QEMU holds the master)."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.close(slave)
    yield master, path
    with contextlib.suppress(OSError):
        os.close(master)


def opener(path: str):
    return lambda: open_pty(path)


def test_attach_bridges_console_both_ways_and_answers_ping(server, console):
    guest, path = console
    url = server.attach_url(opener(path), "vm1", stdin=True, stdout=True, stderr=True, tty=True)
    c = Client(url)
    assert c.status_line.startswith("HTTP/1.1 101"), c.status_line
    assert c.headers["x-stream-protocol-version"] == "v4.channel.k8s.io"
    for t in ("error", "stdin", "stdout", "resize"):  # with a TTY there is no stderr stream
        c.create(t)
    replies = [c.frame() for _ in range(4)]
    assert [(k, sid) for k, sid, _, _ in replies] == [(spdy.SYN_REPLY, sid) for sid in (1, 3, 5, 7)]
    c.send("resize", json.dumps({"Width": 80, "Height": 24}).encode())
    os.write(guest, b"login: ")
    assert b"login: " in c.read_stream("stdout", b"login: ")
    c.send("stdin", b"root\r")
    deadline, got = time.monotonic() + 5, b""
    while b"root\r" not in got and time.monotonic() < deadline:
        got += os.read(guest, 100)
    assert got == b"root\r"
    c.ping(7)
    kind, ident, _, _ = c.frame()
    assert (kind, ident) == (spdy.PING, 7)
    c.sock.close()  # detach: the console stays for the next attach


def test_console_end_reports_success_on_the_error_stream(server, console):
    guest, path = console
    url = server.attach_url(opener(path), "vm2", stdin=False, stdout=True, stderr=False, tty=False)
    c = Client(url)
    c.create("error")
    c.create("stdout")
    assert [c.frame()[0] for _ in range(2)] == [spdy.SYN_REPLY, spdy.SYN_REPLY]
    os.write(guest, b"bye\n")
    assert b"bye" in c.read_stream("stdout", b"bye")
    os.close(guest)  # the VM stops: QEMU closes its side of the pty
    frames = []
    while True:
        try:
            frames.append(c.frame())
        except struct.error:
            break
    err = [f for f in frames if f[0] == 0 and f[1] == c.ids["error"]]
    assert err and json.loads(err[0][3]) == {"metadata": {}, "status": "Success"}
    assert err[0][2] & spdy.FLAG_FIN


def test_tokens_are_single_use_and_bad_requests_are_named(server, console):
    _, path = console
    url = server.attach_url(opener(path), "vm3", stdin=False, stdout=True, stderr=False, tty=False)
    first = Client(url, protocols=("v9.channel.k8s.io",))
    assert first.status_line.startswith("HTTP/1.1 403") and "server supports" in first.body()
    again = Client(url)
    assert again.status_line.startswith("HTTP/1.1 404") and "expired attach token" in again.body()
    bad = Client(server.base_url + "/exec/x")
    assert bad.status_line.startswith("HTTP/1.1 404")
