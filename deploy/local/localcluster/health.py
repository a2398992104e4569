"""Readiness checks of the local cluster's components: HTTP(S) endpoints and unix sockets."""

from __future__ import annotations

import socket
import ssl
import urllib.request
from pathlib import Path

from .paths import Paths


def http_ok(url: str, timeout: float = 2.0) -> bool:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.status == 200


def https_ok(url: str, paths: Paths | None = None, client: str | None = None, timeout: float = 2.0) -> bool:
    """GET an https URL; with `client`, present that client certificate and verify with our CA,
    otherwise skip verification (component health endpoints serve self-signed certificates)."""
    if client and paths:
        ctx = ssl.create_default_context(cafile=str(paths.pki / "ca.crt"))
        ctx.load_cert_chain(str(paths.pki / f"{client}.crt"), str(paths.pki / f"{client}.key"))
    else:
        ctx = ssl._create_unverified_context()
    with urllib.request.urlopen(url, timeout=timeout, context=ctx) as resp:
        return resp.status == 200


def unix_ok(path: Path, timeout: float = 1.0) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
    return True


def unix_listening(path: Path, table: str | None = None) -> bool:
    """A stream socket listens on `path` (from /proc/net/unix, without connecting: a daemon that
    logs every connection that sends no request stays quiet)."""
    if table is None:
        table = Path("/proc/net/unix").read_text()
    for line in table.splitlines()[1:]:
        # Num RefCount Protocol Flags Type St Inode Path; flags 00010000 = accepting connections
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7] == str(path) and fields[3] == "00010000" and fields[4] == "0001":
            return True
    return False


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0
