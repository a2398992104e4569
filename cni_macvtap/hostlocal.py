"""host-local IPAM served in-process by the daemon, byte-compatible with the reference plugin's store.

Only the common subset is served here: IPv4 ranges given as network addresses, optional rangeStart,
rangeEnd and gateway, routes with dst/gw, dataDir, and CNI_ARGS without IP requests. Anything else
(IPv6, resolvConf, requested IPs, overlapping ranges, odd CNI_ARGS, ...) returns None from
``supported`` and the real binary is executed instead, so its validation and errors stay the
reference's own. On disk it is exactly the reference's layout and locking:
``<dataDir>/<network>/<ip>`` holding "<containerID>\\r\\n<ifname>", ``last_reserved_ip.<rangeset index>``,
and flock(2) on ``<dataDir>/<network>/lock`` (so daemon and binary can share a network safely).
Allocation follows the reference's round-robin iterator: after the last reserved IP, skipping the
gateway, wrapping around the range set.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import INTERNAL_ERROR, CNIError

DEFAULT_DATA_DIR = "/var/lib/cni/networks"
LAST_IP_PREFIX = "last_reserved_ip."
LINE_BREAK = "\r\n"
_IPAM_KEYS = {"type", "ranges", "subnet", "rangeStart", "rangeEnd", "gateway", "routes", "dataDir"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}


@dataclass(frozen=True)
class Range:
    """One canonical IPv4 range of a range set."""

    subnet: ipaddress.IPv4Network
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address

    def contains(self, ip: ipaddress.IPv4Address) -> bool:
        return ip in self.subnet and self.start <= ip <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


@dataclass(frozen=True)
class Config:
    """The part of a host-local config we serve."""

    directory: str
    range_sets: tuple[tuple[Range, ...], ...]
    routes: tuple[dict[str, str], ...]


def _range(doc: Any) -> Range | None:
    if not isinstance(doc, dict) or set(doc) - {"subnet", "rangeStart", "rangeEnd", "gateway"}:
        return None
    try:
        subnet = ipaddress.IPv4Network(doc.get("subnet"), strict=True)
        if subnet.prefixlen > 30:
            return None
        first = subnet.network_address + 1
        last = subnet.broadcast_address - 1
        gateway = ipaddress.IPv4Address(doc["gateway"]) if "gateway" in doc else first
        start = ipaddress.IPv4Address(doc["rangeStart"]) if "rangeStart" in doc else first
        end = ipaddress.IPv4Address(doc["rangeEnd"]) if "rangeEnd" in doc else last
    except (ValueError, TypeError, ipaddress.AddressValueError, ipaddress.NetmaskValueError):
        return None
    if gateway not in subnet or start not in subnet or end not in subnet or start > end:
        return None
    return Range(subnet, start, end, gateway)


def supported(conf: Mapping[str, Any], environ: Mapping[str, str]) -> Config | None:
    """The served subset of this config and environment, or None to run the real binary."""
    ipam = conf.get("ipam")
    name = conf.get("name")
    if not isinstance(ipam, dict) or ipam.get("type") != "host-local" or not isinstance(name, str):
        return None
    if set(ipam) - _IPAM_KEYS or "ips" in (conf.get("runtimeConfig") or {}) or "args" in conf:
        return None
    args = [p.partition("=") for p in environ.get("CNI_ARGS", "").split(";") if p]
    keys = {k for k, _, _ in args}
    if "IP" in keys or (
        keys - {"IgnoreUnknown"} and not any(k == "IgnoreUnknown" and v in _TRUE for k, _, v in args)
    ):
        return None
    if "ranges" in ipam:
        if any(k in ipam for k in ("subnet", "rangeStart", "rangeEnd", "gateway")):
            return None
        raw_sets = ipam["ranges"]
        if not isinstance(raw_sets, list) or not raw_sets:
            return None
    elif "subnet" in ipam:
        raw_sets = [[{k: ipam[k] for k in ("subnet", "rangeStart", "rangeEnd", "gateway") if k in ipam}]]
    else:
        return None
    sets: list[tuple[Range, ...]] = []
    for raw in raw_sets:
        if not isinstance(raw, list) or not raw:
            return None
        ranges = [_range(r) for r in raw]
        if any(r is None for r in ranges):
            return None
        sets.append(tuple(r for r in ranges if r is not None))
    flat = [r for s in sets for r in s]
    for i, a in enumerate(flat):  # the reference rejects overlaps: let it say so
        for b in flat[i + 1 :]:
            if a.start <= b.end and b.start <= a.end:
                return None
    routes = ipam.get("routes") or []
    if not isinstance(routes, list):
        return None
    for route in routes:
        if not isinstance(route, dict) or set(route) - {"dst", "gw"} or not isinstance(route.get("dst"), str):
            return None
        try:
            ipaddress.IPv4Network(route["dst"], strict=True)
            if "gw" in route:
                ipaddress.IPv4Address(route["gw"])
        except (ValueError, TypeError):
            return None
    data_dir = ipam.get("dataDir") or DEFAULT_DATA_DIR
    if not isinstance(data_dir, str) or not data_dir.startswith("/") or "/" in name or name in (".", ".."):
        return None
    return Config(os.path.join(data_dir, name), tuple(sets), tuple(dict(r) for r in routes))


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(directory, "lock"), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o750)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _entries(directory: str) -> Iterator[tuple[str, str]]:
    for root, _dirs, files in os.walk(directory):
        for fname in sorted(files):
            path = os.path.join(root, fname)
            try:
                with open(path, "rb") as f:  # bytes: "\r\n" must not become "\n"
                    yield path, f.read().decode("utf-8", "surrogateescape").strip()
            except OSError:
                continue


def _owned(directory: str, container_id: str, ifname: str) -> list[tuple[str, bool]]:
    """(path, new-format?) of every reservation of this attachment."""
    key = container_id.strip() + LINE_BREAK + ifname
    old = container_id.strip()
    return [(p, data == key) for p, data in _entries(directory) if data in (key, old)]


def _reserve(directory: str, container_id: str, ifname: str, ip: ipaddress.IPv4Address, index: int) -> bool:
    path = os.path.join(directory, str(ip))
    try:
        fd = os.open(path, os.O_RDWR | os.O_EXCL | os.O_CREAT, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, (container_id.strip() + LINE_BREAK + ifname).encode("utf-8", "surrogateescape"))
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    last = os.path.join(directory, f"{LAST_IP_PREFIX}{index}")
    fd = os.open(last, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, str(ip).encode())
    finally:
        os.close(fd)
    return True


def _candidates(directory: str, ranges: tuple[Range, ...], set_index: int) -> Iterator[tuple[Range, Any]]:
    """The reference's RangeIter: round robin from the last reserved IP + 1, skipping gateways."""
    last = None
    try:
        with open(os.path.join(directory, f"{LAST_IP_PREFIX}{set_index}")) as f:
            last = ipaddress.IPv4Address(f.read().strip())
    except (OSError, ValueError):
        last = None
    idx, cur, start_ip = 0, None, None
    if last is not None and any(r.contains(last) for r in ranges):
        idx = next(i for i, r in enumerate(ranges) if r.contains(last))
        cur = last
    while True:
        r = ranges[idx]
        if cur is None:
            cur = start_ip = r.start
        elif cur == r.end:
            idx = (idx + 1) % len(ranges)
            r = ranges[idx]
            cur = r.start
            if start_ip is None:
                start_ip = cur
            elif cur == start_ip:
                return
        else:
            cur = cur + 1
            if start_ip is None:
                start_ip = cur
            elif cur == start_ip:
                return
        if cur != r.gateway:
            yield r, cur


def _fail(msg: str) -> CNIError:
    return CNIError(INTERNAL_ERROR, f"IPAM plugin host-local ADD failed: {msg}")


def add(cfg: Config, container_id: str, ifname: str) -> dict[str, Any]:
    """Allocate one address per range set; the result in the 1.x shape.

    Like the reference: an attachment that already holds an address of a range set is refused, and
    when a range set cannot be served, every earlier range set's allocator releases the attachment.
    """
    ips: list[dict[str, Any]] = []
    with _locked(cfg.directory):
        for index, ranges in enumerate(cfg.range_sets):
            for path, _ in _owned(cfg.directory, container_id, ifname):
                held = _as_ip(os.path.basename(path))
                if held is not None and any(r.contains(held) for r in ranges):
                    for _ in range(index):
                        _release(cfg.directory, container_id, ifname)
                    raise _fail(
                        f"failed to allocate for range {index}: {held} has been allocated to {container_id}, "
                        "duplicate allocation is not allowed"
                    )
            for r, ip in _candidates(cfg.directory, ranges, index):
                if _reserve(cfg.directory, container_id, ifname, ip, index):
                    ips.append({"address": f"{ip}/{r.subnet.prefixlen}", "gateway": str(r.gateway)})
                    break
            else:
                for _ in range(index):
                    _release(cfg.directory, container_id, ifname)
                raise _fail(
                    f"failed to allocate for range {index}: no IP addresses available in range set: "
                    + ",".join(str(r) for r in ranges)
                )
    return {"ips": ips, "routes": [dict(r) for r in cfg.routes], "dns": {}}


def _as_ip(name: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(name)
    except ValueError:
        return None


def _release(directory: str, container_id: str, ifname: str) -> None:
    """The reference's ReleaseByID: the new-format reservations, else the legacy id-only ones."""
    owned = _owned(directory, container_id, ifname)
    new = [p for p, is_new in owned if is_new]
    for path in new or [p for p, _ in owned]:
        _unlink(path)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def delete(cfg: Config, container_id: str, ifname: str) -> None:
    """Release this attachment's reservations, once per range set like the reference."""
    with _locked(cfg.directory):
        for _ in cfg.range_sets:
            _release(cfg.directory, container_id, ifname)


def check(cfg: Config, container_id: str, ifname: str) -> None:
    """The reference's CHECK: some reservation of this attachment exists."""
    with _locked(cfg.directory):
        if not _owned(cfg.directory, container_id, ifname):
            raise CNIError(
                INTERNAL_ERROR,
                f"IPAM plugin host-local CHECK failed: host-local: Failed to find address added by container "
                f"{container_id}",
            )
