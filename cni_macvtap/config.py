"""The plugin's network configuration: decoding stdin and validating every key (stdlib only).

Every pattern is applied with fullmatch (a "$" would let a trailing newline through), paths must be
normalized absolute paths without control characters, and every error names the key and the fix.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import results, versions
from .defaults import DEFAULT_DEVICE_DIR, DEFAULT_SOCKET, DEFAULT_STATE_DIR, MAX_STDIN
from .environment import Invocation, has_control_chars, validate_ifname
from .errors import DECODING_FAILURE, INVALID_CONFIG, INVALID_ENVIRONMENT, IO_FAILURE, CNIError

MODES = ("bridge", "vepa", "private", "passthru")
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")  # always fullmatch
NAME_MAX = 255  # the network name is a path component under stateDir
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
TAP_MODE_RE = re.compile(r"0?[0-7]{3}")  # permission bits only: no setuid, setgid or sticky bit
ID_RE = re.compile(r"[0-9]+")  # ASCII digits: str.isdigit() also takes superscripts
ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
MAX_DEPTH = 64  # nesting of the config: json.loads and json.dumps recurse


@dataclass(frozen=True)
class MacChoice:
    """The MAC the NIC gets and where it came from (errors about it name that place)."""

    mac: str | None = None
    source: str = "config 'mac'"
    error_code: int = INVALID_CONFIG


@dataclass(frozen=True)
class NetConf:
    """A validated macvtap network configuration (plus the raw document, which IPAM receives verbatim)."""

    cni_version: str
    name: str
    master: str | None
    mode: str
    mtu: int | None
    mac: MacChoice
    ipam_type: str | None
    tap_uid: int
    tap_gid: int
    tap_mode: int
    device_dir: str
    state_dir: str
    prev_result: dict[str, Any] | None  # checked and normalized, for CHECK only
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
    except RecursionError:
        doc = None
    if doc is None or _depth(doc) > MAX_DEPTH:
        raise CNIError(
            DECODING_FAILURE, f"network configuration on stdin is nested deeper than {MAX_DEPTH} levels"
        )
    if not isinstance(doc, dict):
        raise CNIError(DECODING_FAILURE, "network configuration on stdin must be a JSON object")
    return doc


def _depth(doc: Any) -> int:
    """How deeply a decoded JSON document nests (iteratively: no recursion limit to hit)."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                todo.extend(
                    (child, level + 1) for child in (item.values() if isinstance(item, dict) else item)
                )
    return deepest


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


def _mac(value: Any, where: str, code: int) -> str:
    if not isinstance(value, str) or not MAC_RE.fullmatch(value):
        raise CNIError(code, f"invalid {where} {value!r}: use a MAC address like 02:00:00:00:00:01")
    if int(value[:2], 16) & 1:
        raise CNIError(
            code, f"invalid {where} {value!r}: a multicast MAC cannot be a NIC address; clear bit 0"
        )
    if value.replace(":", "") == "0" * 12:
        raise CNIError(code, f"invalid {where} {value!r}: the all-zero MAC is not usable")
    return value.lower()


def _mac_choice(inv: Invocation, doc: dict[str, Any], runtime: dict[str, Any]) -> MacChoice:
    """runtimeConfig.mac over CNI_ARGS MAC over the config's mac (every one given is validated)."""
    choice = MacChoice()
    if doc.get("mac") is not None:
        choice = MacChoice(_mac(doc["mac"], "config 'mac'", INVALID_CONFIG))
    mac_arg = inv.cni_args().get("MAC")
    if mac_arg:
        choice = MacChoice(
            _mac(mac_arg, "CNI_ARGS MAC", INVALID_ENVIRONMENT), "CNI_ARGS MAC", INVALID_ENVIRONMENT
        )
    if runtime.get("mac") not in (None, ""):
        choice = MacChoice(_mac(runtime["mac"], "runtimeConfig 'mac'", INVALID_CONFIG), "runtimeConfig 'mac'")
    return choice


def _owner(doc: dict[str, Any], key: str, lookup: Callable[[str], int]) -> int:
    value = doc.get(key)
    if value is None:
        return 0
    if isinstance(value, str) and ID_RE.fullmatch(value):
        value = int(value)
    if _int(value):
        if not 0 <= value <= ID_MAX:
            raise _bad(key, f"is {doc[key]!r}", f"give a numeric id between 0 and {ID_MAX} or a name")
        return int(value)
    if isinstance(value, str) and value and not has_control_chars(value):
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
    fix = 'give permission bits only, an octal string from "0000" to "0777" (no setuid, setgid or sticky bit)'
    if isinstance(value, str) and TAP_MODE_RE.fullmatch(value):
        return int(value, 8)
    if _int(value) and 0 <= value <= 0o777:
        return int(value)
    raise _bad("tapMode", f"is {value!r}", fix)


def _abs_path(doc: dict[str, Any], key: str, default: str) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value or has_control_chars(value):
        raise _bad(key, f"is {value!r}", "give an absolute path without control characters")
    trimmed = value.rstrip("/") or "/"
    if os.path.normpath(trimmed) != trimmed:
        raise _bad(key, f"is {value!r}", "give a normalized absolute path (no '.' or '..' parts, no '//')")
    return trimmed


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


def _prev_result(inv: Invocation, doc: dict[str, Any]) -> dict[str, Any] | None:
    prev = doc.get("prevResult")
    if inv.command != "CHECK" or prev is None:
        return None  # only CHECK reads it; DEL must not fail over a prevResult it does not need
    try:
        return results.normalize(prev)
    except results.ResultShapeError as exc:
        raise _bad("prevResult", f"cannot be decoded: {exc}", "give the result of the previous ADD") from None


def _name(doc: dict[str, Any]) -> str:
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > NAME_MAX:
        raise _bad(
            "name",
            f"is {name!r}",
            f"give the network a name of at most {NAME_MAX} characters matching ^[a-zA-Z0-9][a-zA-Z0-9_.-]*$",
        )
    return name


def _master(doc: dict[str, Any]) -> str | None:
    master = _opt_str(doc, "master")
    if master is not None:
        try:
            validate_ifname(master)
        except CNIError as exc:
            raise _bad(
                "master", f"is not an interface name ({exc.msg})", "name an existing host link"
            ) from None
    return master


def _ipam_type(doc: dict[str, Any]) -> str | None:
    ipam = doc.get("ipam")
    if ipam is None or ipam == {}:
        return None
    if not isinstance(ipam, dict):
        raise _bad("ipam", f"is {ipam!r}", 'give an object with "type", e.g. {"type": "host-local", ...}')
    ipam_type = ipam.get("type")
    if not isinstance(ipam_type, str) or not NAME_RE.fullmatch(ipam_type):
        raise _bad("ipam.type", f"is {ipam_type!r}", "name an IPAM plugin on CNI_PATH, e.g. host-local")
    return ipam_type


def parse(inv: Invocation, doc: dict[str, Any]) -> NetConf:
    """Validate a decoded config for one invocation; every error names the key and the fix."""
    version = versions.require_supported(doc.get("cniVersion"))
    name = _name(doc)
    master = _master(doc)
    mode = doc.get("mode", "bridge")
    if mode not in MODES:
        raise _bad("mode", f"is {mode!r}", "use one of " + ", ".join(MODES))
    mtu = doc.get("mtu")
    if mtu is not None and (not _int(mtu) or not 68 <= mtu <= 65535):
        raise _bad("mtu", f"is {mtu!r}", "give an integer between 68 and the master's MTU, or leave it out")
    runtime = doc.get("runtimeConfig")
    if runtime is not None and not isinstance(runtime, dict):
        raise _bad("runtimeConfig", f"is {runtime!r}", "give an object")
    if doc.get("daemonSocket") is not None:
        _abs_path(doc, "daemonSocket", DEFAULT_SOCKET)
    return NetConf(
        cni_version=version,
        name=name,
        master=master,
        mode=mode,
        mtu=mtu,
        mac=_mac_choice(inv, doc, runtime or {}),
        ipam_type=_ipam_type(doc),
        tap_uid=_owner(doc, "tapOwner", lambda n: pwd.getpwnam(n).pw_uid),
        tap_gid=_owner(doc, "tapGroup", lambda n: grp.getgrnam(n).gr_gid),
        tap_mode=_tap_mode(doc.get("tapMode")),
        device_dir=_abs_path(doc, "deviceDir", DEFAULT_DEVICE_DIR),
        state_dir=_abs_path(doc, "stateDir", DEFAULT_STATE_DIR),
        prev_result=_prev_result(inv, doc),
        valid_attachments=_attachments(doc),
        raw=doc,
    )
