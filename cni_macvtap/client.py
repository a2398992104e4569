"""The thin client's daemon call (stdlib only): pass one invocation to `macvtap daemon` if it answers."""

from __future__ import annotations

import os
import socket

from . import wire
from .errors import TRY_AGAIN, CNIError

TIMEOUT_S = 180.0


def own_netns() -> int:
    """Inode of this process's network namespace (the daemon must be in the same one)."""
    return os.stat("/proc/self/ns/net").st_ino


def call(path: str, env: dict[str, str], stdin: bytes) -> tuple[bytes, int, str] | None:
    """(stdout, exit code, stderr) from the daemon, or None when no daemon is there to answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT_S)
    try:
        try:
            sock.connect(path)
            wire.send(sock, {"env": env, "stdin": stdin.decode("latin-1"), "netns": own_netns()})
        except OSError:
            return None  # nobody listening (or not allowed to talk to it): do the work ourselves
        try:
            reply = wire.recv(sock)
        except (OSError, wire.ProtocolError) as exc:
            # The request reached the daemon, so we cannot know how far it got: the runtime must retry.
            err = CNIError(TRY_AGAIN, f"macvtap daemon at {path} failed mid-request ({exc}): try again")
            return err.to_json(), 1, err.msg + "\n"
        if "fallback" in reply:
            return None
        return (
            str(reply.get("stdout", "")).encode("latin-1"),
            int(reply.get("code", 1)),
            str(reply.get("stderr", "")),
        )
    finally:
        sock.close()
