"""Renders the C header of the native client from cni_macvtap.defaults and cni_macvtap.wire, so the C
and Python sides share one definition of the default socket, the limits and the wire constants.

deploy/cni/install-plugin runs ``render()`` and compiles macvtap-client.c with ``-include`` of the result.
"""

from __future__ import annotations

import sys

from . import defaults, wire


def c_string(value: str) -> str:
    """A C string literal for value (printable ASCII kept, everything else as octal escapes)."""
    out = []
    for byte in value.encode():
        ch = chr(byte)
        if ch in '"\\?':
            out.append("\\" + ch)
        elif 0x20 <= byte < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def render() -> str:
    """The header text."""
    lines = [
        "/* Generated from cni_macvtap/defaults.py and wire.py by cni_macvtap.cheader: do not edit. */",
        f"#define MACVTAP_DEFAULT_SOCKET {c_string(defaults.DEFAULT_SOCKET)}",
        f"#define MACVTAP_MAX_STDIN {defaults.MAX_STDIN}u",
        f"#define MACVTAP_MAX_ENV {defaults.MAX_ENV}u",
        f"#define MACVTAP_MAX_REPLY {defaults.MAX_REPLY}u",
        f"#define MACVTAP_WIRE_MAGIC {c_string(wire.MAGIC.decode())}",
        f"#define MACVTAP_WIRE_FALLBACK ({wire.FALLBACK})",
        f"#define MACVTAP_CLIENT_TIMEOUT_S {wire.CLIENT_TIMEOUT_S}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
