"""CNI spec versions we speak and the conversion of results between them (stdlib only)."""

from __future__ import annotations

import ipaddress
from typing import Any

from .errors import DECODING_FAILURE, INCOMPATIBLE_VERSION, CNIError

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"


def parse(version: str) -> tuple[int, int, int]:
    """'1.0.0' -> (1, 0, 0); anything else is a decode error naming cniVersion."""
    parts = version.split(".") if isinstance(version, str) else []
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CNIError(DECODING_FAILURE, f'cniVersion {version!r} is not a version like "1.0.0"')
    return int(parts[0]), int(parts[1]), int(parts[2])


def at_least(version: str, minimum: str) -> bool:
    """True when version >= minimum."""
    return parse(version) >= parse(minimum)


def require_supported(version: object) -> str:
    """Return the version if we speak it, else the spec's incompatible-version error."""
    if not isinstance(version, str) or not version:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            'cniVersion is missing: set "cniVersion" to one of ' + ", ".join(SUPPORTED),
        )
    if version not in SUPPORTED:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: config is {version!r}, plugin supports {list(SUPPORTED)}",
        )
    return version


def version_info() -> dict[str, Any]:
    """The VERSION verb's answer."""
    return {"cniVersion": LATEST, "supportedVersions": list(SUPPORTED)}


def normalize_result(raw: dict[str, Any]) -> dict[str, Any]:
    """Bring an IPAM or prevResult (0.3.x, 0.4.0 or 1.x) into the 1.x shape we work with internally."""
    if not isinstance(raw, dict):
        raise CNIError(DECODING_FAILURE, "result is not a JSON object")
    out: dict[str, Any] = {
        "interfaces": [dict(i) for i in raw.get("interfaces") or [] if isinstance(i, dict)],
        "ips": [],
        "routes": [dict(r) for r in raw.get("routes") or [] if isinstance(r, dict)],
    }
    for ip in raw.get("ips") or []:
        if not isinstance(ip, dict) or "address" not in ip:
            raise CNIError(DECODING_FAILURE, f"result ips entry {ip!r} has no address")
        entry = {k: v for k, v in ip.items() if k != "version"}
        out["ips"].append(entry)
    if isinstance(raw.get("dns"), dict) and raw["dns"]:
        out["dns"] = dict(raw["dns"])
    return out


def encode_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """Render an internal (1.x-shaped) result in the requested spec version."""
    legacy = not at_least(version, "1.0.0")
    interfaces = []
    for iface in result.get("interfaces", []):
        item = {k: v for k, v in iface.items() if v not in (None, "")}
        if legacy:
            item.pop("mtu", None)
            item.pop("socketPath", None)
            item.pop("pciID", None)
        elif not at_least(version, "1.1.0"):
            item.pop("socketPath", None)
            item.pop("pciID", None)
        interfaces.append(item)
    ips = []
    for ip in result.get("ips", []):
        item = dict(ip)
        if legacy:
            addr = ipaddress.ip_interface(item["address"])
            item = {"version": str(addr.version), **item}
        ips.append(item)
    out: dict[str, Any] = {"cniVersion": version}
    if interfaces:
        out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if result.get("routes"):
        out["routes"] = result["routes"]
    out["dns"] = result.get("dns") or {}
    return out
