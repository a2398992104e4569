"""Entry point of the `macvtap` executable: a thin client for `macvtap daemon`, or the daemon itself.

The hot path (a CNI verb) imports only the standard library: it hands the call to the daemon over
its unix socket and, when no daemon answers, runs the same code in-process (cni_macvtap.plugin).
stdin is read up to defaults.MAX_STDIN + 1 bytes, so a larger config is refused without reading it all.
"""

from __future__ import annotations

import os
import sys

from .defaults import DEFAULT_SOCKET, MAX_STDIN

USAGE = f"""usage: macvtap                          CNI plugin (CNI_* in the environment, config on stdin)
       macvtap daemon [--socket PATH] [--workers N] [--max-connections N] [--request-timeout S]
                                        resident daemon (default socket {DEFAULT_SOCKET})
"""


def socket_path(stdin: bytes) -> str:
    """The top-level daemonSocket of the config when it is a usable string, else the default.

    A scan (cni_macvtap.jsonscan) handles the usual config; json (which imports re, ~7 ms) is only
    loaded when the scan is unsure (escapes, duplicate keys, a non-string value, broken JSON).
    """
    from .jsonscan import Unsure, top_level_string

    value: object
    try:
        raw = top_level_string(stdin, b"daemonSocket")
        value = None if raw is None else raw.decode("utf-8", "replace")
    except Unsure:
        import json

        try:
            doc = json.loads(stdin)
        except (ValueError, UnicodeDecodeError):
            return DEFAULT_SOCKET
        value = doc.get("daemonSocket") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value.startswith("/") and "\0" not in value else DEFAULT_SOCKET


def read_stdin() -> bytes:
    """At most MAX_STDIN + 1 bytes of stdin: enough to tell that a config is too large."""
    return sys.stdin.buffer.read(MAX_STDIN + 1) if sys.stdin is not None else b""


def main(argv: list[str] | None = None) -> int:
    """Run as CNI plugin (no arguments) or as `macvtap daemon`."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "daemon":
        from .daemon import main as daemon_main

        return daemon_main(args[1:])
    if args:
        sys.stderr.write(USAGE)
        return 0 if args[0] in ("-h", "--help") else 2
    if not os.environ.get("CNI_COMMAND") and sys.stdin.isatty():
        sys.stderr.write(USAGE)
        return 2
    stdin = read_stdin()
    env = dict(os.environ)
    reply = None
    if not os.environ.get("MACVTAP_NO_DAEMON") and len(stdin) <= MAX_STDIN:
        from .client import call

        reply = call(socket_path(stdin), env, stdin)
    if reply is None:
        from .plugin import run

        reply = run(env, stdin)
    out, code, err = reply
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    if err:
        sys.stderr.write(err)
    return code


if __name__ == "__main__":
    sys.exit(main())
