"""CNI result documents: checking one read from outside (prevResult, an IPAM plugin's output) and
bringing it into the 1.x shape used inside, and rendering a result in any spec version (stdlib only).

A document of the wrong shape raises ResultShapeError saying where and what is wrong; the caller
turns it into the CNI error that fits (7 for prevResult, 101 for an IPAM result).
"""

from __future__ import annotations

import ipaddress
from typing import Any

from . import versions

_IFACE_STRINGS = ("name", "mac", "sandbox", "socketPath", "pciID")


class ResultShapeError(ValueError):
    """A result document that is not shaped like a CNI result."""


def _list_of_objects(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ResultShapeError(f"{key} is {value!r}, expected a list of objects")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ResultShapeError(f"{key}[{i}] is {item!r}, expected an object")
    return [dict(item) for item in value]


def _check_ip(where: str, value: Any, with_prefix: bool) -> None:
    try:
        if not isinstance(value, str):
            raise ValueError
        ipaddress.ip_interface(value) if with_prefix else ipaddress.ip_address(value)
    except ValueError:
        shape = 'an address with prefix like "10.1.0.5/24"' if with_prefix else 'an address like "10.1.0.1"'
        raise ResultShapeError(f"{where} is {value!r}, expected {shape}") from None


def _interfaces(raw: dict[str, Any]) -> list[dict[str, Any]]:
    out = _list_of_objects(raw, "interfaces")
    for i, iface in enumerate(out):
        if not isinstance(iface.get("name"), str):
            raise ResultShapeError(f"interfaces[{i}].name is {iface.get('name')!r}, expected a string")
        for key in _IFACE_STRINGS[1:]:
            if iface.get(key) is not None and not isinstance(iface[key], str):
                raise ResultShapeError(f"interfaces[{i}].{key} is {iface[key]!r}, expected a string")
        mtu = iface.get("mtu")
        if mtu is not None and (not isinstance(mtu, int) or isinstance(mtu, bool) or mtu < 0):
            raise ResultShapeError(f"interfaces[{i}].mtu is {mtu!r}, expected a non-negative integer")
    return out


def _ips(raw: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, ip in enumerate(_list_of_objects(raw, "ips")):
        _check_ip(f"ips[{i}].address", ip.get("address"), with_prefix=True)
        if ip.get("gateway") is not None:
            _check_ip(f"ips[{i}].gateway", ip["gateway"], with_prefix=False)
        idx = ip.get("interface")
        if idx is not None and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
            raise ResultShapeError(f"ips[{i}].interface is {idx!r}, expected an index into interfaces")
        out.append({k: v for k, v in ip.items() if k != "version"})
    return out


def _routes(raw: dict[str, Any]) -> list[dict[str, Any]]:
    out = _list_of_objects(raw, "routes")
    for i, route in enumerate(out):
        dst = route.get("dst")
        try:
            if not isinstance(dst, str):
                raise ValueError
            ipaddress.ip_network(dst, strict=False)
        except ValueError:
            raise ResultShapeError(f"routes[{i}].dst is {dst!r}, expected a network like 0.0.0.0/0") from None
        if route.get("gw") is not None:
            _check_ip(f"routes[{i}].gw", route["gw"], with_prefix=False)
    return out


def normalize(raw: Any) -> dict[str, Any]:
    """Check a 0.3.x, 0.4.0 or 1.x result and bring it into the internal 1.x shape."""
    if not isinstance(raw, dict):
        raise ResultShapeError(f"the result is {type(raw).__name__}, expected an object")
    out: dict[str, Any] = {"interfaces": _interfaces(raw), "ips": _ips(raw), "routes": _routes(raw)}
    dns = raw.get("dns")
    if dns is not None and not isinstance(dns, dict):
        raise ResultShapeError(f"dns is {dns!r}, expected an object")
    if dns:
        out["dns"] = dict(dns)
    return out


def _encode_interface(iface: dict[str, Any], version: str) -> dict[str, Any]:
    item = {k: v for k, v in iface.items() if v not in (None, "")}
    if not versions.at_least(version, "1.1.0"):
        item.pop("socketPath", None)
        item.pop("pciID", None)
    if not versions.at_least(version, "1.0.0"):
        item.pop("mtu", None)
    return item


def encode(result: dict[str, Any], version: str) -> dict[str, Any]:
    """Render an internal (1.x-shaped) result in the requested spec version."""
    legacy = not versions.at_least(version, "1.0.0")
    ips = []
    for ip in result.get("ips", []):
        item = dict(ip)
        if legacy:
            item = {"version": str(ipaddress.ip_interface(item["address"]).version), **item}
        ips.append(item)
    out: dict[str, Any] = {"cniVersion": version}
    interfaces = [_encode_interface(i, version) for i in result.get("interfaces", [])]
    if interfaces:
        out["interfaces"] = interfaces
    if ips:
        out["ips"] = ips
    if result.get("routes"):
        out["routes"] = result["routes"]
    out["dns"] = result.get("dns") or {}
    return out
