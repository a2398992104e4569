"""The thin client's daemon call (stdlib only, and only C-level modules on the hot path).

It uses _socket directly because `import socket` pulls in enum and costs several milliseconds.
"""

from __future__ import annotations

import _socket
import os

from . import wire


def own_netns() -> int:
    """Inode of this process's network namespace (the daemon must be in the same one)."""
    return os.stat("/proc/self/ns/net").st_ino


def call(path: str, env: dict[str, str], stdin: bytes) -> tuple[bytes, int, str] | None:
    """(stdout, exit code, stderr) from the daemon, or None when the call must run in-process: no
    daemon answers, it hands the call back, or the request is beyond its limits."""
    if not wire.request_fits(wire.encode_env(env), stdin):
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(wire.CLIENT_TIMEOUT_S)
    try:
        try:
            sock.connect(path)
            wire.send_request(sock, own_netns(), env, stdin)
        except OSError:
            return None  # nobody listening (or not allowed to talk to it): do the work ourselves
        try:
            code, out, err = wire.recv_reply(sock)
        except (OSError, wire.ProtocolError) as exc:
            # The request reached the daemon, so we cannot know how far it got: the runtime must retry.
            from .errors import TRY_AGAIN, CNIError

            failure = CNIError(TRY_AGAIN, f"macvtap daemon at {path} failed mid-request ({exc}): try again")
            return failure.to_json(), 1, failure.msg + "\n"
        if code == wire.FALLBACK:
            return None
        return out, code, err
    finally:
        sock.close()
