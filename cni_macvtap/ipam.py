"""IPAM delegation: run the plugin named by ipam.type from CNI_PATH, as the CNI spec prescribes.

The delegate gets the same environment (CNI_COMMAND possibly changed) and the full network config
on stdin; its result or error comes back on stdout.

One compatibility step: spec 1.1.0 changed nothing an IPAM plugin sees, but older IPAM plugins (Debian
12 ships containernetworking-plugins 1.1.1, which stops at 1.0.0) reject a 1.1.0 config with code 1.
When that happens the same config is passed again with "cniVersion": "1.0.0" (the result format is
identical) and the plugin is remembered, so the daemon pays the extra exec once.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from . import hostroot
from .errors import INCOMPATIBLE_VERSION, IPAM_FAILURE, NOT_AVAILABLE, CNIError

TIMEOUT_S = 120
DOWNGRADE = {"1.1.0": "1.0.0"}

_needs_downgrade: dict[tuple[str, float], bool] = {}
_guard = threading.Lock()


HOST_ROOT = ""  # `macvtap daemon --host-root`: the node's root mounted there (a DaemonSet's container)


def find_plugin(name: str, path: Sequence[str]) -> str:
    """Absolute path of an executable called name in the absolute CNI_PATH directories (a relative one
    would resolve against the daemon's working directory, not the caller's: it is skipped). With
    HOST_ROOT set, the directories are the node's, looked up under that root (symlinks included)."""
    for d in path:
        if not d.startswith("/"):
            continue
        candidate = os.path.join(d, name)
        if HOST_ROOT:
            try:
                candidate = hostroot.resolve(HOST_ROOT, candidate)
            except OSError:
                continue
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(
        IPAM_FAILURE,
        f"failed to find IPAM plugin {name!r} in CNI_PATH {list(path)}"
        + (f" (the node's, under {HOST_ROOT})" if HOST_ROOT else "")
        + ": install it there or fix ipam.type",
    )


IN_PROCESS = False  # `macvtap daemon` turns this on: host-local is then served by cni_macvtap.hostlocal


def delegate(
    name: str, command: str, environ: Mapping[str, str], path: Sequence[str], stdin: bytes
) -> dict[str, Any] | None:
    """IPAM for ADD, DEL and CHECK: in-process host-local when enabled and the config is in the served
    subset (same on-disk state, same results), else the plugin binary from CNI_PATH."""
    if IN_PROCESS and name == "host-local" and command in ("ADD", "DEL", "CHECK"):
        from . import hostlocal

        try:
            doc = json.loads(stdin)
        except ValueError:
            doc = None
        cfg = hostlocal.supported(doc, environ) if isinstance(doc, dict) else None
        if cfg is not None:
            find_plugin(name, path)  # same "not on CNI_PATH" failure as without the daemon
            cid, ifname = environ.get("CNI_CONTAINERID", ""), environ.get("CNI_IFNAME", "")
            if command == "ADD":
                return hostlocal.add(cfg, cid, ifname)
            if command == "DEL":
                hostlocal.delete(cfg, cid, ifname)
            else:
                hostlocal.check(cfg, cid, ifname)
            return None
    return exec_plugin(name, command, environ, path, stdin)


def _with_version(stdin: bytes, version: str) -> bytes:
    doc = json.loads(stdin)
    doc["cniVersion"] = version
    return json.dumps(doc).encode()


def exec_plugin(
    name: str, command: str, environ: Mapping[str, str], path: Sequence[str], stdin: bytes
) -> dict[str, Any] | None:
    """Run the IPAM plugin for one verb; the parsed stdout JSON on success (None when empty)."""
    binary = find_plugin(name, path)
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        version = None
    older = DOWNGRADE.get(version) if isinstance(version, str) else None
    key = (binary, os.stat(binary).st_mtime)
    if older and _needs_downgrade.get(key):
        return _run(name, binary, command, environ, _with_version(stdin, older))
    try:
        return _run(name, binary, command, environ, stdin)
    except CNIError as exc:
        if not older or exc.code != INCOMPATIBLE_VERSION:
            raise
    with _guard:
        _needs_downgrade[key] = True
    return _run(name, binary, command, environ, _with_version(stdin, older))


def _run(
    name: str, binary: str, command: str, environ: Mapping[str, str], stdin: bytes
) -> dict[str, Any] | None:
    env = dict(environ)
    env["CNI_COMMAND"] = command
    try:
        proc = subprocess.run(
            [binary], input=stdin, env=env, capture_output=True, timeout=TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CNIError(IPAM_FAILURE, f"running IPAM plugin {name} ({command}) failed: {exc}") from None
    out = proc.stdout.strip()
    if proc.returncode != 0:
        try:
            err = json.loads(out)
            code = int(err.get("code", IPAM_FAILURE))
            msg = str(err.get("msg", "")) or proc.stderr.decode(errors="replace").strip()
            details = str(err.get("details", ""))
        except (ValueError, AttributeError, TypeError):
            code, msg, details = IPAM_FAILURE, (out or proc.stderr).decode(errors="replace").strip(), ""
        if command == "STATUS" and code not in (50, 51):
            code = NOT_AVAILABLE
        raise CNIError(code, f"IPAM plugin {name} {command} failed: {msg}", details)
    if not out:
        return None
    try:
        doc = json.loads(out)
    except ValueError:
        raise CNIError(
            IPAM_FAILURE, f"IPAM plugin {name} {command} printed invalid JSON: {out[:200]!r}"
        ) from None
    if not isinstance(doc, dict):
        raise CNIError(
            IPAM_FAILURE, f"IPAM plugin {name} {command} printed {type(doc).__name__}, not an object"
        )
    return doc


def supports(name: str, environ: Mapping[str, str], path: Sequence[str], version: str) -> bool:
    """Does the IPAM plugin list version among its supportedVersions (VERSION verb)?"""
    try:
        info = exec_plugin(name, "VERSION", environ, path, b"{}")
    except CNIError:
        return False
    supported = info.get("supportedVersions") if info else None
    return isinstance(supported, list) and version in supported
