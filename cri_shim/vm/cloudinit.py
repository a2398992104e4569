"""cloud-init NoCloud seed ISO: user-data, meta-data, and network-config v2 from a CNI result.

The network config binds each interface to the guest NIC's MAC (``match: macaddress``), so it does
not depend on how the guest names its NICs. Addresses, gateways, routes and DNS come from the CNI
result (spec 1.x / 0.4.0 / 0.3.x shapes: ``ips[].address``, ``ips[].gateway``, ``ips[].interface``,
``routes[].dst|gw``, ``dns.nameservers|search``). The ISO is made with ``genisoimage -V cidata``
(the volume label NoCloud looks for), from files in a temporary directory (0700, never a shell); the
ISO is 0600 (the user-data may hold secrets).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import ValidationError, VMError
from .private import FILE_MODE
from .spec import check_mac

MAX_USER_DATA = 64 * 1024


@dataclasses.dataclass
class CloudInit:
    """What goes on the seed ISO."""

    instance_id: str
    hostname: str = ""
    user_data: str = "#cloud-config\n{}\n"
    network_config: dict[str, Any] | None = None


def network_config_from_cni(
    result: dict[str, Any], macs: list[str], field: str = "cniResult"
) -> dict[str, Any]:
    """cloud-init network-config v2 for the NICs with ``macs`` (index i <-> CNI interface i of the
    sandbox, or, when the result lists no interfaces, NIC i <-> ips with interface i/None)."""
    if not isinstance(result, dict):
        raise ValidationError(field, "is not a CNI result object", "pass the parsed JSON result of CNI ADD")
    macs = [check_mac(f"networks[{i}].mac", m) for i, m in enumerate(macs)]
    ethernets: dict[str, Any] = {}
    for n, mac in enumerate(macs):
        ethernets[f"eth{n}"] = {
            "match": {"macaddress": mac},
            "set-name": f"eth{n}",
            "dhcp4": False,
            "dhcp6": False,
        }
    nic_of_iface = _nic_of_iface(result.get("interfaces") or [], macs)
    gateways = _add_addresses(result.get("ips") or [], f"{field}.ips", macs, nic_of_iface, ethernets)
    _add_routes(result.get("routes") or [], f"{field}.routes", macs, gateways, ethernets)
    for n, gateway in gateways.items():
        routes = ethernets[f"eth{n}"].setdefault("routes", [])
        if not any(rt["to"] in ("0.0.0.0/0", "::/0") for rt in routes) and ":" not in gateway:
            routes.append({"to": "0.0.0.0/0", "via": gateway})
    dns = result.get("dns") or {}
    if dns.get("nameservers") and macs:
        ns: dict[str, Any] = {"addresses": [str(ipaddress.ip_address(a)) for a in dns["nameservers"]]}
        if dns.get("search"):
            ns["search"] = [str(s) for s in dns["search"]]
        ethernets["eth0"]["nameservers"] = ns
    return {"version": 2, "ethernets": ethernets}


def _nic_of_iface(interfaces: list[dict[str, Any]], macs: list[str]) -> dict[int | None, int]:
    """Which NIC each CNI interface index belongs to: the one whose MAC matches, else the i-th in
    a sandbox (None: the ips of a result without interfaces go to NIC 0)."""
    sandbox_ifaces = [i for i, itf in enumerate(interfaces) if itf.get("sandbox")] or list(
        range(len(interfaces))
    )
    nic_of_iface: dict[int | None, int] = {}
    for n, mac in enumerate(macs):
        match = [i for i, itf in enumerate(interfaces) if str(itf.get("mac", "")).lower() == mac]
        idx = match[0] if match else (sandbox_ifaces[n] if n < len(sandbox_ifaces) else None)
        nic_of_iface[idx] = n
    if not interfaces and macs:
        nic_of_iface = {None: 0}
    return nic_of_iface


def _add_addresses(
    ips: list[dict[str, Any]],
    field: str,
    macs: list[str],
    nic_of_iface: dict[int | None, int],
    ethernets: dict[str, Any],
) -> dict[int, str]:
    """Put every CNI ip on its NIC; returns the first gateway of each NIC."""
    gateways: dict[int, str] = {}
    for k, ip in enumerate(ips):
        f = f"{field}[{k}]"
        try:
            if "/" not in str(ip["address"]):
                raise ValueError("no prefix length")
            iface = ipaddress.ip_interface(ip["address"])
        except (KeyError, TypeError, ValueError):
            raise ValidationError(
                f"{f}.address", f"{ip!r} has no CIDR address", "CNI ips need address a.b.c.d/nn"
            ) from None
        n = nic_of_iface.get(ip.get("interface"), nic_of_iface.get(None, 0 if len(macs) == 1 else None))
        if n is None:
            continue
        eth = ethernets[f"eth{n}"]
        eth.setdefault("addresses", []).append(str(iface))
        if ip.get("gateway"):
            try:
                gw = ipaddress.ip_address(ip["gateway"])
            except ValueError:
                raise ValidationError(f"{f}.gateway", f"{ip['gateway']!r}", "use an IP address") from None
            gateways.setdefault(n, str(gw))
    return gateways


def _add_routes(
    routes: list[dict[str, Any]],
    field: str,
    macs: list[str],
    gateways: dict[int, str],
    ethernets: dict[str, Any],
) -> None:
    """CNI routes have no interface: put them on the first NIC with a gateway (else NIC 0)."""
    for k, r in enumerate(routes):
        try:
            dst = ipaddress.ip_network(r["dst"], strict=False)
        except (KeyError, TypeError, ValueError):
            raise ValidationError(
                f"{field}[{k}].dst", f"{r!r} has no destination", "routes need dst a.b.c.d/nn"
            ) from None
        if not macs:
            continue
        n = next(iter(gateways), 0)
        via = r.get("gw") or gateways.get(n)
        if not via:
            continue
        ethernets[f"eth{n}"].setdefault("routes", []).append(
            {"to": str(dst), "via": str(ipaddress.ip_address(via))}
        )


def render(ci: CloudInit) -> dict[str, str]:
    """The seed files' contents by file name."""
    if not isinstance(ci.user_data, str):
        raise ValidationError("cloudInit.userData", "is not a string", "give the user-data text")
    if len(ci.user_data.encode()) > MAX_USER_DATA:
        raise ValidationError("cloudInit.userData", f"is over {MAX_USER_DATA} bytes", "shorten it")
    if "\x00" in ci.user_data:
        raise ValidationError("cloudInit.userData", "contains NUL", "remove binary content")
    meta: dict[str, str] = {"instance-id": ci.instance_id}
    if ci.hostname:
        meta["local-hostname"] = ci.hostname
    files = {
        "user-data": ci.user_data,
        "meta-data": yaml.safe_dump(meta, default_flow_style=False, sort_keys=True),
    }
    if ci.network_config is not None:
        files["network-config"] = yaml.safe_dump(ci.network_config, default_flow_style=False, sort_keys=False)
    return files


def make_seed_iso(ci: CloudInit, dest: Path) -> Path:
    """Write the NoCloud seed ISO to ``dest`` atomically."""
    files = render(ci)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".seed-", dir=dest.parent) as tmp:
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        out = Path(tmp, "seed.iso")
        argv = ["genisoimage", "-quiet", "-output", str(out), "-volid", "cidata", "-joliet", "-rock"]
        r = subprocess.run(
            [*argv, *(str(Path(tmp, n)) for n in files)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if r.returncode != 0:
            raise VMError("genisoimage failed", detail=r.stderr.strip())
        os.chmod(out, FILE_MODE)  # the user-data may hold secrets
        os.replace(out, dest)
    return dest
