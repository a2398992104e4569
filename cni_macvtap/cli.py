"""Entry point of the `macvtap` executable: a thin client for `macvtap daemon`, or the daemon itself.

The hot path (a CNI verb) imports only the standard library: it hands the call to the daemon over
its unix socket and, when no daemon answers, runs the same code in-process (cni_macvtap.plugin).
"""

from __future__ import annotations

import os
import sys

DEFAULT_SOCKET = "/run/edgevirt/macvtap.sock"
USAGE = """usage: macvtap                          CNI plugin (CNI_* in the environment, config on stdin)
       macvtap daemon [--socket PATH] [--workers N]
                                        resident daemon (default socket /run/edgevirt/macvtap.sock)
"""


def socket_path(stdin: bytes) -> str:
    """daemonSocket from the config when it is a usable string, else the default.

    A plain scan handles the usual config; json (which imports re, ~7 ms) is only loaded when the
    key occurs more than once or its value has escapes.
    """
    key = b'"daemonSocket"'
    if key not in stdin:
        return DEFAULT_SOCKET
    value: object = None
    if stdin.count(key) == 1:
        rest = stdin.split(key, 1)[1].lstrip(b" \t\r\n")
        if rest.startswith(b":"):
            rest = rest[1:].lstrip(b" \t\r\n")
            if rest.startswith(b'"') and b'"' in rest[1:]:
                raw = rest[1:].split(b'"', 1)[0]
                if b"\\" not in raw:
                    value = raw.decode("utf-8", "replace")
    if value is None:
        import json

        try:
            doc = json.loads(stdin)
        except (ValueError, UnicodeDecodeError):
            return DEFAULT_SOCKET
        value = doc.get("daemonSocket") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value.startswith("/") and "\0" not in value else DEFAULT_SOCKET


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
    stdin = sys.stdin.buffer.read()
    env = dict(os.environ)
    from .client import call

    reply = None if os.environ.get("MACVTAP_NO_DAEMON") else call(socket_path(stdin), env, stdin)
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
