"""The plugin's verbs (ADD, DEL, CHECK, VERSION, STATUS, GC) over a validated invocation.

``run()`` is the single entry used both by the resident daemon and by the standalone executable,
so both give byte-identical answers. pyroute2 is imported only when a verb needs netlink.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import traceback
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from . import config, devnode, ipam, state, versions
from .environment import Invocation, from_environ
from .errors import (
    CHECK_FAILED,
    INCOMPATIBLE_VERSION,
    INTERNAL_ERROR,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    IPAM_FAILURE,
    LINK_FAILURE,
    NOT_AVAILABLE,
    CNIError,
)

if TYPE_CHECKING:
    from .links import HostLinks, LinkInfo, PodLinks

_locks_guard = threading.Lock()
_locks: dict[tuple[str, str, str], threading.Lock] = {}
_lock_files: dict[str, int] = {}  # state dir -> fd of its ".locks" file, open for the process lifetime


def _lock_file(state_dir: str, create: bool) -> int | None:
    with _locks_guard:
        fd = _lock_files.get(state_dir)
        if fd is None:
            if not create and not os.path.isdir(state_dir):
                return None  # no records there yet: nothing another process could be changing
            try:
                os.makedirs(state_dir, mode=0o700, exist_ok=True)
                fd = os.open(os.path.join(state_dir, ".locks"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
            _lock_files[state_dir] = fd
        return fd


@contextlib.contextmanager
def _attachment_lock(state_dir: str, key: tuple[str, str, str], create: bool = False) -> Iterator[None]:
    """Serialise operations on one attachment: a thread lock inside this process (the daemon runs many
    threads) plus a POSIX record lock on one byte of <stateDir>/.locks chosen by the attachment's hash,
    which serialises daemon workers and standalone calls too (a collision only serialises more)."""
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        fd = _lock_file(state_dir, create)
        offset = zlib.crc32("\0".join(key).encode("utf-8", "surrogateescape")) & 0x7FFFFFFF
        if fd is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX, 1, offset, 0)
        try:
            yield
        finally:
            if fd is not None:
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, 0)


_host: HostLinks | None = None
_host_guard = threading.Lock()


def host_links() -> HostLinks:
    """The process-wide HostLinks (created on first use; the daemon keeps it warm)."""
    global _host
    with _host_guard:
        if _host is None:
            from .links import HostLinks

            _host = HostLinks()
        return _host


def _pod_links(fd: int) -> PodLinks:
    from .links import PodLinks

    return PodLinks(fd)


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[bytes, int, str]:
    """Execute one plugin call: (stdout bytes, exit code, text for stderr). Never raises."""
    version: str | None = None
    try:
        inv = from_environ(environ, stdin)
        if inv.command == "VERSION":
            return (json.dumps(versions.version_info()) + "\n").encode(), 0, ""
        doc = config.decode(stdin)
        version = config.config_version(doc)
        conf = config.parse(inv, doc)
        out = _dispatch(inv, conf)
        return (json.dumps(out, indent=4) + "\n").encode() if out is not None else b"", 0, ""
    except CNIError as exc:
        return exc.to_json(version), 1, f"macvtap: {exc.msg}\n"
    except Exception as exc:  # a bug must still produce the spec's error JSON, never a traceback on stdout
        tb = traceback.format_exc()
        err = CNIError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        return err.to_json(version), 1, tb


def _dispatch(inv: Invocation, conf: config.NetConf) -> dict[str, Any] | None:
    if inv.command in ("GC", "STATUS"):
        if not versions.at_least(conf.cni_version, "1.1.0"):
            raise CNIError(
                INCOMPATIBLE_VERSION,
                f"config version {conf.cni_version} does not allow {inv.command}: it needs cniVersion 1.1.0",
            )
        return cmd_gc(inv, conf) if inv.command == "GC" else cmd_status(inv, conf)
    if inv.command == "CHECK" and not versions.at_least(conf.cni_version, "0.4.0"):
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"config version {conf.cni_version} does not allow CHECK: it needs cniVersion 0.4.0 or later",
        )
    key = (conf.name, inv.container_id, inv.ifname)
    with _attachment_lock(conf.state_dir, key, create=inv.command == "ADD"):
        if inv.command == "ADD":
            return cmd_add(inv, conf)
        if inv.command == "DEL":
            cmd_del(inv, conf)
            return None
        cmd_check(inv, conf)
        return None


def _resolve_master(conf: config.NetConf) -> LinkInfo:
    host = host_links()
    name = conf.master or host.default_route_link()
    if name is None:
        raise CNIError(
            INVALID_CONFIG,
            "invalid config: 'master' is not set and this host has no default route: set \"master\"",
        )
    link = host.by_name(name)
    if link is None:
        raise CNIError(
            INVALID_CONFIG,
            f"invalid config: 'master' {name!r} does not exist on the host: name an existing interface",
        )
    return link


def _open_netns(path: str) -> int:
    from .netns import open_netns

    try:
        return open_netns(path)
    except OSError as exc:
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_NETNS {path!r} cannot be opened: {exc.strerror}") from None


def _enter(fd: int, path: str) -> PodLinks:
    try:
        return _pod_links(fd)
    except OSError as exc:
        raise CNIError(
            INVALID_ENVIRONMENT, f"CNI_NETNS {path!r} is not a network namespace: {exc.strerror}"
        ) from None


def cmd_add(inv: Invocation, conf: config.NetConf) -> dict[str, Any]:
    """Create the macvtap in CNI_NETNS, allocate addresses, publish the tap node; roll back on failure."""
    host = host_links()
    master = _resolve_master(conf)
    if conf.mtu is not None and conf.mtu > master.mtu:
        raise CNIError(
            INVALID_CONFIG,
            f"invalid config: 'mtu' {conf.mtu} is larger than master {master.name}'s MTU {master.mtu}: "
            f"use at most {master.mtu}",
        )
    fd = _open_netns(inv.netns)
    undo: list[Callable[[], None]] = []
    try:
        with _enter(fd, inv.netns) as pod:
            try:
                # Created under a random name, then renamed: if CNI_IFNAME exists the rename fails with
                # EEXIST and only our temporary link is removed; the existing interface is never touched.
                tmp_name = host.create_macvtap(master.index, fd, conf.mode, conf.mtu, conf.mac)
                where = {"name": tmp_name}

                def drop_link() -> None:
                    found = pod.by_name(where["name"])
                    if found is not None and found.kind == "macvtap":
                        pod.delete(found.index)

                undo.append(drop_link)
                link = pod.by_name(tmp_name)
                if link is None:
                    raise CNIError(LINK_FAILURE, "the new macvtap is missing from CNI_NETNS")
                devt = devnode.devt_of(link.name, link.index)
                pod.rename_up(link.index, inv.ifname)
                where["name"] = inv.ifname
                final = link  # a rename changes neither MAC, MTU nor ifindex
                result: dict[str, Any] = {
                    "interfaces": [
                        {"name": inv.ifname, "mac": final.mac, "mtu": final.mtu, "sandbox": inv.netns}
                    ],
                    "ips": [],
                    "routes": [],
                }
                if conf.ipam_type:
                    raw = ipam.delegate(conf.ipam_type, "ADD", inv.environ, inv.path, inv.stdin)
                    undo.append(
                        lambda: ipam.delegate(conf.ipam_type or "", "DEL", inv.environ, inv.path, inv.stdin)
                    )
                    got = versions.normalize_result(raw or {})
                    for ip in got["ips"]:
                        ip["interface"] = 0
                    result["ips"] = got["ips"]
                    result["routes"] = got["routes"]
                    if got.get("dns"):
                        result["dns"] = got["dns"]
                node = devnode.node_path(conf.device_dir, inv.container_id, inv.ifname)
                devnode.create(node, devt, conf.tap_uid, conf.tap_gid, conf.tap_mode)
                undo.append(lambda: devnode.remove(node))
                state.write(
                    state.record_path(conf.state_dir, conf.name, inv.container_id, inv.ifname),
                    {
                        "containerID": inv.container_id,
                        "ifname": inv.ifname,
                        "netns": inv.netns,
                        "ifindex": final.index,
                        "mac": final.mac,
                        "mtu": final.mtu,
                        "devt": list(devt),
                        "devicePath": node,
                        "args": inv.args,
                        "config": inv.stdin.decode(),
                    },
                )
            except BaseException:
                _rollback(undo)
                raise
    finally:
        os.close(fd)
    return versions.encode_result(result, conf.cni_version)


def _rollback(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        try:
            step()
        except Exception as exc:  # keep undoing; report what could not be undone
            print(f"macvtap: rollback step failed: {exc}", file=sys.stderr)


def _delete_link_in(netns_path: str, ifname: str, ifindex: int | None = None) -> None:
    """Delete our macvtap called ifname in netns_path; nothing happens when the netns or link is gone."""
    try:
        from .netns import open_netns

        fd = open_netns(netns_path)
    except OSError:
        return  # netns already gone: its links died with it; never re-create it
    try:
        try:
            pod = _pod_links(fd)
        except OSError:
            return  # not a network namespace (any more)
        with pod:
            link = pod.by_name(ifname)
            if link is not None and link.kind == "macvtap" and (ifindex is None or link.index == ifindex):
                pod.delete(link.index)
    finally:
        os.close(fd)


def cmd_del(inv: Invocation, conf: config.NetConf) -> None:
    """Best-effort, idempotent removal of the link, the IPAM allocation, the node and the record."""
    rec_path = state.record_path(conf.state_dir, conf.name, inv.container_id, inv.ifname)
    if inv.netns:
        _delete_link_in(inv.netns, inv.ifname)
    else:  # no CNI_NETNS: still remove our link if ADD's record says where it is and it is still there
        rec = state.read(rec_path) or {}
        if isinstance(rec.get("netns"), str) and rec["netns"] and isinstance(rec.get("ifindex"), int):
            _delete_link_in(rec["netns"], inv.ifname, rec["ifindex"])
    if conf.ipam_type:
        ipam.delegate(conf.ipam_type, "DEL", inv.environ, inv.path, inv.stdin)
    devnode.remove(devnode.node_path(conf.device_dir, inv.container_id, inv.ifname))
    state.remove(rec_path)


def _fail(msg: str) -> CNIError:
    return CNIError(CHECK_FAILED, f"CHECK failed: {msg}")


def cmd_check(inv: Invocation, conf: config.NetConf) -> None:
    """Verify what ADD made against prevResult, then delegate CHECK to IPAM."""
    if conf.prev_result is None:
        raise CNIError(
            INVALID_CONFIG, "invalid config: 'prevResult' is missing: CHECK needs the result of ADD"
        )
    prev = versions.normalize_result(conf.prev_result)
    iface = next(
        (i for i in prev["interfaces"] if i.get("name") == inv.ifname and i.get("sandbox") == inv.netns), None
    )
    if iface is None:
        raise _fail(f"prevResult has no interface {inv.ifname!r} with sandbox {inv.netns!r}")
    master = _resolve_master(conf)
    fd = _open_netns(inv.netns)
    try:
        with _enter(fd, inv.netns) as pod:
            link = pod.by_name(inv.ifname)
    finally:
        os.close(fd)
    if link is None:
        raise _fail(f"interface {inv.ifname!r} does not exist in {inv.netns}")
    if link.kind != "macvtap":
        raise _fail(f"interface {inv.ifname!r} is a {link.kind or 'plain'} link, not a macvtap")
    if link.mode != conf.mode:
        raise _fail(f"interface {inv.ifname!r} is in mode {link.mode}, config says {conf.mode}")
    if str(iface.get("mac", "")).lower() != link.mac:
        raise _fail(f"interface {inv.ifname!r} has MAC {link.mac}, prevResult says {iface.get('mac')}")
    want_mtu = iface.get("mtu") or conf.mtu
    if want_mtu and int(want_mtu) != link.mtu:
        raise _fail(f"interface {inv.ifname!r} has MTU {link.mtu}, expected {want_mtu}")
    if link.link != master.index:
        raise _fail(f"interface {inv.ifname!r} is not on master {master.name}")
    if not link.up:
        raise _fail(f"interface {inv.ifname!r} is down")
    rec = state.read(state.record_path(conf.state_dir, conf.name, inv.container_id, inv.ifname))
    node = devnode.node_path(conf.device_dir, inv.container_id, inv.ifname)
    if rec is None or not devnode.matches(node, tuple(rec.get("devt") or ())):  # type: ignore[arg-type]
        raise _fail(f"tap device node {node} is missing or does not match the link")
    for ip in prev["ips"]:
        idx = ip.get("interface")
        if idx is not None and not (isinstance(idx, int) and 0 <= idx < len(prev["interfaces"])):
            raise _fail(
                f"prevResult ip {ip.get('address')} points at interface index {idx}, which does not exist"
            )
    if conf.ipam_type:
        ipam.delegate(conf.ipam_type, "CHECK", inv.environ, inv.path, inv.stdin)


def cmd_status(inv: Invocation, conf: config.NetConf) -> None:
    """Ready when the master exists and the IPAM plugin is installed (and says it is ready)."""
    try:
        _resolve_master(conf)
    except CNIError as exc:
        raise CNIError(NOT_AVAILABLE, f"plugin not available: {exc.msg}") from None
    if conf.ipam_type:
        try:
            ipam.find_plugin(conf.ipam_type, inv.path)
        except CNIError as exc:
            raise CNIError(NOT_AVAILABLE, f"plugin not available: {exc.msg}") from None
        if ipam.supports(conf.ipam_type, inv.environ, inv.path, "1.1.0"):
            ipam.exec_plugin(conf.ipam_type, "STATUS", inv.environ, inv.path, inv.stdin)


def cmd_gc(inv: Invocation, conf: config.NetConf) -> None:
    """Release every recorded attachment of this network that is not in cni.dev/valid-attachments."""
    valid = set(conf.valid_attachments)
    errors: list[str] = []
    for cid, ifname, path in list(state.records(conf.state_dir, conf.name)):
        if (cid, ifname) in valid:
            continue
        with _attachment_lock(conf.state_dir, (conf.name, cid, ifname)):
            rec = state.read(path) or {}
            try:
                if rec.get("netns"):
                    _delete_link_in(str(rec["netns"]), ifname, rec.get("ifindex"))
                if conf.ipam_type:
                    env = dict(inv.environ)
                    env.update(
                        CNI_CONTAINERID=cid,
                        CNI_IFNAME=ifname,
                        CNI_NETNS="",
                        CNI_ARGS=str(rec.get("args", "")),
                    )
                    stdin = str(rec["config"]).encode() if rec.get("config") else inv.stdin
                    ipam.delegate(conf.ipam_type, "DEL", env, inv.path, stdin)
                devnode.remove(str(rec.get("devicePath") or devnode.node_path(conf.device_dir, cid, ifname)))
                state.remove(path)
            except CNIError as exc:
                errors.append(f"{cid}/{ifname}: {exc.msg}")
    if conf.ipam_type and ipam.supports(conf.ipam_type, inv.environ, inv.path, "1.1.0"):
        ipam.exec_plugin(conf.ipam_type, "GC", inv.environ, inv.path, inv.stdin)
    if errors:
        raise CNIError(IPAM_FAILURE, "GC could not release some attachments: " + "; ".join(errors))
