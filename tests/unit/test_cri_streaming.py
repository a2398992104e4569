"""The shim's streaming server (Attach) against a pty standing in for a VM's serial console, with the
minimal SPDY/3.1 client of spdy_client.py. The real clients (crictl attach, kubectl attach through
kubelet) are exercised in tests/e2e/test_cri_kvm.py. What a hostile client cannot do is in
test_cri_streaming_bounds.py."""

from __future__ import annotations

import json
import os
import time

import pytest
from helpers.ptys import console_pty
from spdy_client import Client

from cri_shim import spdy
from cri_shim.console_fanout import ConsoleFanout
from cri_shim.streaming import StreamingServer, open_pty


@pytest.fixture
def server():
    s = StreamingServer()
    yield s
    s.close()


@pytest.fixture
def console():
    """(the guest side, the path): a pty whose master plays the VM (QEMU holds the master)."""
    with console_pty() as c:
        yield c


def opener(path: str):
    consoles = ConsoleFanout(open_pty)
    return lambda: consoles.tap(path)


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
    assert b"root\r" in got, got  # the console line discipline may add to it under load
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
    frames = c.frames_until_closed()
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
