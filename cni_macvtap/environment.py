"""The CNI_* environment of one invocation, validated the way libcni's skel validates it (stdlib only)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import INVALID_ENVIRONMENT, CNIError

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
CONTAINER_ID_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")  # always fullmatch: "$" would allow "\n"
CONTAINER_ID_MAX = 255  # a path component (deviceDir/<id>/..., stateDir/<network>/<id>/...)
IFNAME_MAX = 15

# Which variables each verb needs (same table as containernetworking/cni pkg/skel).
_REQUIRED = {
    "CNI_CONTAINERID": ("ADD", "DEL", "CHECK"),
    "CNI_NETNS": ("ADD", "CHECK"),
    "CNI_IFNAME": ("ADD", "DEL", "CHECK"),
    "CNI_PATH": ("ADD", "DEL", "CHECK", "GC", "STATUS"),
}


@dataclass(frozen=True)
class Invocation:
    """One plugin call: the verb, its CNI_* variables, the raw stdin and the caller's full environment."""

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: tuple[str, ...] = ()
    stdin: bytes = b""
    environ: Mapping[str, str] = field(default_factory=dict)

    def cni_args(self) -> dict[str, str]:
        """CNI_ARGS as a dict ("K=V;K2=V2"); a malformed pair is an environment error."""
        return parse_cni_args(self.args)


def validate_ifname(name: str) -> None:
    """Reject names the kernel and libcni reject (length 1-15, no '/', ':' or whitespace, not '.'/'..')."""
    if not name:
        raise CNIError(INVALID_ENVIRONMENT, "CNI_IFNAME is empty: set it to the interface name to create")
    if len(name) > IFNAME_MAX:
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_IFNAME {name!r} is longer than {IFNAME_MAX} characters: use a shorter interface name",
        )
    if name in (".", ".."):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_IFNAME {name!r} is not a valid interface name")
    for ch in name:
        if ch in "/:" or ch.isspace():
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_IFNAME {name!r} contains {ch!r}: interface names may not contain '/', ':' or spaces",
            )


def has_control_chars(value: str) -> bool:
    """True when value contains a C0 control character or DEL (a newline, a tab, an escape...)."""
    return any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value)


def validate_container_id(container_id: str) -> None:
    """libcni's rule (letters, digits, _ . -, not starting with _ . -) plus a path component's length."""
    if not CONTAINER_ID_RE.fullmatch(container_id):
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"invalid characters in CNI_CONTAINERID {container_id!r}: use letters, digits, _ . -",
        )
    if len(container_id) > CONTAINER_ID_MAX:
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID is {len(container_id)} characters long: use at most {CONTAINER_ID_MAX}",
        )


def validate_netns(path: str) -> None:
    """CNI_NETNS, when given, is an absolute path (a relative one would depend on the daemon's cwd)."""
    if not path.startswith("/") or has_control_chars(path):
        raise CNIError(
            INVALID_ENVIRONMENT,
            f"CNI_NETNS {path!r} is not an absolute path: give the network namespace's path, "
            "e.g. /run/netns/<name>",
        )


def parse_cni_args(raw: str) -> dict[str, str]:
    """Parse CNI_ARGS ("IgnoreUnknown=1;K8S_POD_NAME=x;MAC=..."); unknown keys are kept, not rejected."""
    out: dict[str, str] = {}
    if not raw:
        return out
    for pair in raw.split(";"):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_ARGS: invalid pair {pair!r}: expected KEY=VALUE pairs joined by ';'",
            )
        out[key] = value
    return out


def from_environ(environ: Mapping[str, str], stdin: bytes) -> Invocation:
    """Build and validate an Invocation from an environment mapping, as skel.PluginMain does."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(INVALID_ENVIRONMENT, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CNIError(
            INVALID_ENVIRONMENT, f"unknown CNI_COMMAND: {command}: use one of {', '.join(COMMANDS)}"
        )
    missing = [var for var, verbs in _REQUIRED.items() if command in verbs and not environ.get(var)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT, f"required env variables [{','.join(missing)}] missing")
    container_id = environ.get("CNI_CONTAINERID", "")
    if command in _REQUIRED["CNI_CONTAINERID"]:
        validate_container_id(container_id)
    ifname = environ.get("CNI_IFNAME", "")
    if command in _REQUIRED["CNI_IFNAME"]:
        validate_ifname(ifname)
    netns = environ.get("CNI_NETNS", "")
    if netns and command in ("ADD", "DEL", "CHECK"):
        validate_netns(netns)
    inv = Invocation(
        command=command,
        container_id=container_id,
        netns=netns,
        ifname=ifname,
        args=environ.get("CNI_ARGS", ""),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
        stdin=stdin,
        environ=dict(environ),
    )
    inv.cni_args()  # validate early: a malformed CNI_ARGS is an environment error for every verb
    return inv
