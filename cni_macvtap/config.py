"""The plugin's network configuration: decoding stdin and validating every key (stdlib only)."""

from __future__ import annotations

import grp
import json
import pwd
import re
from dataclasses import dataclass, field
from typing import Any

from . import versions
from .defaults import DEFAULT_DEVICE_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR, MAX_STDIN
from .environment import Invocation, validate_ifname
from .errors import DECODING_FAILURE, INVALID_CONFIG, INVALID_ENVIRONMENT, IO_FAILURE, CNIError

MODES = ("bridge", "vepa", "private", "passthru")
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")  # fullmatch = Go's ^...$
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


@dataclass(frozen=True)
class NetConf:
    """A validated macvtap network configuration (plus the raw document, which IPAM receives verbatim)."""

    cni_version: str
    name: str
    master: str | None
    mode: str
    mtu: int | None
    mac: str | None
    ipam_type: str | None
    tap_uid: int
    tap_gid: int
    tap_mode: int
    device_dir: str
    state_dir: str
    prev_result: dict[str, Any] | None
    valid_attachments: tuple[tuple[str, str], ...]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def decode(stdin: bytes) -> dict[str, Any]:
    """stdin -> JSON object, or the spec's I/O (too large) or decoding error."""
    if len(stdin) > MAX_STDIN:
        raise CNIError(
            IO_FAILURE,
            f"the network configuration on stdin is larger than {MAX_STDIN} bytes: shorten it",
        )
    try:
        doc = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODING_FAILURE, f"error parsing network configuration on stdin: {exc}") from None
    if not isinstance(doc, dict):
        raise CNIError(DECODING_FAILURE, "network configuration on stdin must be a JSON object")
    return doc


def config_version(doc: dict[str, Any]) -> str | None:
    """The cniVersion of a decoded config if it is one we speak (used to shape error output)."""
    v = doc.get("cniVersion")
    return v if isinstance(v, str) and v in versions.SUPPORTED else None


def _bad(key: str, problem: str, fix: str) -> CNIError:
    return CNIError(INVALID_CONFIG, f"invalid config: {key!r} {problem}: {fix}")


def _opt_str(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise _bad(key, f"is {value!r}", "give a non-empty string or leave it out")
    return value


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mac(value: Any, where: str, code: int = INVALID_CONFIG) -> str:
    if not isinstance(value, str) or not MAC_RE.fullmatch(value):
        raise CNIError(code, f"invalid {where} {value!r}: use a MAC address like 02:00:00:00:00:01")
    first = int(value[:2], 16)
    if first & 1:
        raise CNIError(
            code, f"invalid {where} {value!r}: a multicast MAC cannot be a NIC address; clear bit 0"
        )
    if value.replace(":", "") == "0" * 12:
        raise CNIError(code, f"invalid {where} {value!r}: the all-zero MAC is not usable")
    return value.lower()


def _owner(doc: dict[str, Any], key: str, lookup: Any, default: int) -> int:
    value = doc.get(key)
    if value is None:
        return default
    if _int(value):
        if not 0 <= value < 2**32 - 1:
            raise _bad(key, f"is {value}", "give a numeric id between 0 and 4294967294 or a name")
        return value
    if isinstance(value, str) and value:
        if value.isdigit():
            return int(value)
        try:
            return lookup(value)
        except KeyError:
            raise _bad(
                key, f"names {value!r}, which does not exist on this host", "create it or use an id"
            ) from None
    raise _bad(key, f"is {value!r}", "give a user/group name or numeric id")


def _tap_mode(value: Any) -> int:
    if value is None:
        return 0o600
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        mode = int(value, 8)
    elif _int(value):
        mode = value
    else:
        raise _bad("tapMode", f"is {value!r}", 'give an octal string such as "0660"')
    if not 0 <= mode <= 0o7777:
        raise _bad("tapMode", f"is {value!r}", 'give permission bits between "0000" and "7777"')
    return mode


def _abs_path(doc: dict[str, Any], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise _bad(key, f"is {value!r}", "give an absolute path")
    return value.rstrip("/") or "/"


def _attachments(doc: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    key = "cni.dev/valid-attachments"
    value = doc.get(key)
    if value is None:  # libcni omits an empty list (omitempty): no attachment is valid
        return ()
    if not isinstance(value, list):
        raise _bad(key, f"is {value!r}", 'give a list of {"containerID": ..., "ifname": ...} objects')
    out = []
    for item in value:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise _bad(key, f"has entry {item!r}", 'each entry needs string "containerID" and "ifname"')
        out.append((item["containerID"], item["ifname"]))
    return tuple(out)


def parse(inv: Invocation, doc: dict[str, Any]) -> NetConf:
    """Validate a decoded config for one invocation; every error names the key and the fix."""
    version = versions.require_supported(doc.get("cniVersion"))
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise _bad("name", f"is {name!r}", "give the network a name matching ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
    master = _opt_str(doc, "master")
    if master is not None:
        try:
            validate_ifname(master)
        except CNIError as exc:
            raise _bad(
                "master", f"is not an interface name ({exc.msg})", "name an existing host link"
            ) from None
    mode = doc.get("mode", "bridge")
    if mode not in MODES:
        raise _bad("mode", f"is {mode!r}", "use one of " + ", ".join(MODES))
    mtu = doc.get("mtu")
    if mtu is not None and (not _int(mtu) or not 68 <= mtu <= 65535):
        raise _bad("mtu", f"is {mtu!r}", "give an integer between 68 and the master's MTU, or leave it out")
    mac = None
    if doc.get("mac") is not None:
        mac = _mac(doc["mac"], "config 'mac'")
    mac_arg = inv.cni_args().get("MAC")
    if mac_arg:
        mac = _mac(mac_arg, "CNI_ARGS MAC", INVALID_ENVIRONMENT)
    runtime = doc.get("runtimeConfig")
    if runtime is not None and not isinstance(runtime, dict):
        raise _bad("runtimeConfig", f"is {runtime!r}", "give an object")
    if runtime and runtime.get("mac") not in (None, ""):
        mac = _mac(runtime["mac"], "runtimeConfig 'mac'")
    ipam = doc.get("ipam")
    ipam_type = None
    if ipam is not None and ipam != {}:
        if not isinstance(ipam, dict):
            raise _bad("ipam", f"is {ipam!r}", 'give an object with "type", e.g. {"type": "host-local", ...}')
        ipam_type = ipam.get("type")
        if not isinstance(ipam_type, str) or not NAME_RE.fullmatch(ipam_type):
            raise _bad("ipam.type", f"is {ipam_type!r}", "name an IPAM plugin on CNI_PATH, e.g. host-local")
    prev = doc.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise _bad("prevResult", f"is {prev!r}", "give the result object of the previous ADD")
    if doc.get("daemonSocket") is not None:
        _abs_path(doc, "daemonSocket", DEFAULT_SOCKET)
    return NetConf(
        cni_version=version,
        name=name,
        master=master,
        mode=mode,
        mtu=mtu,
        mac=mac,
        ipam_type=ipam_type,
        tap_uid=_owner(doc, "tapOwner", lambda n: pwd.getpwnam(n).pw_uid, 0),
        tap_gid=_owner(doc, "tapGroup", lambda n: grp.getgrnam(n).gr_gid, 0),
        tap_mode=_tap_mode(doc.get("tapMode")),
        device_dir=_abs_path(doc, "deviceDir", DEFAULT_DEVICE_DIR),
        state_dir=_abs_path(doc, "stateDir", DEFAULT_STATE_DIR),
        prev_result=prev,
        valid_attachments=_attachments(doc),
        raw=doc,
    )
