"""CHECK (is the attachment still what ADD made and prevResult says?) and STATUS (could ADD work?)."""

from __future__ import annotations

from typing import Any

from . import config, devnode, ipam, namespaces, release, state
from .environment import Invocation
from .errors import CHECK_FAILED, INVALID_CONFIG, NOT_AVAILABLE, CNIError
from .links import LinkInfo


def _fail(msg: str) -> CNIError:
    return CNIError(CHECK_FAILED, f"CHECK failed: {msg}")


def _compare(
    ifname: str, iface: dict[str, Any], link: LinkInfo, conf: config.NetConf, master: LinkInfo
) -> None:
    """The first difference between the link and prevResult's interface (or the config), as an error."""
    if link.kind != "macvtap":
        raise _fail(f"interface {ifname!r} is a {link.kind or 'plain'} link, not a macvtap")
    if link.mode != conf.mode:
        raise _fail(f"interface {ifname!r} is in mode {link.mode}, config says {conf.mode}")
    if str(iface.get("mac", "")).lower() != link.mac:
        raise _fail(f"interface {ifname!r} has MAC {link.mac}, prevResult says {iface.get('mac')}")
    want_mtu = iface.get("mtu") or conf.mtu
    if want_mtu and want_mtu != link.mtu:
        raise _fail(f"interface {ifname!r} has MTU {link.mtu}, expected {want_mtu}")
    if link.link != master.index:
        raise _fail(f"interface {ifname!r} is not on master {master.name}")
    if not link.up:
        raise _fail(f"interface {ifname!r} is down")


def cmd_check(inv: Invocation, conf: config.NetConf) -> None:
    """Verify what ADD made against prevResult, then delegate CHECK to IPAM."""
    prev = conf.prev_result
    if prev is None:
        raise CNIError(
            INVALID_CONFIG, "invalid config: 'prevResult' is missing: CHECK needs the result of ADD"
        )
    iface = next(
        (i for i in prev["interfaces"] if i.get("name") == inv.ifname and i.get("sandbox") == inv.netns), None
    )
    if iface is None:
        raise _fail(f"prevResult has no interface {inv.ifname!r} with sandbox {inv.netns!r}")
    master = namespaces.resolve_master(conf)
    rec = state.read(state.record_path(conf.state_dir, conf.name, inv.container_id, inv.ifname))
    with namespaces.open_pod(inv.netns) as pod:
        if rec is not None and not release.same_namespace(pod, rec):
            raise _fail(f"CNI_NETNS {inv.netns} is not the network namespace ADD used")
        with pod.links() as pod_links:
            link = pod_links.by_name(inv.ifname)
    if link is None:
        raise _fail(f"interface {inv.ifname!r} does not exist in {inv.netns}")
    _compare(inv.ifname, iface, link, conf, master)
    node = devnode.node_path(conf.device_dir, inv.container_id, inv.ifname)
    devt = release.recorded_devt(rec)
    if devt is None or not devnode.matches(node, devt):
        raise _fail(f"tap device node {node} is missing or does not match the link")
    for ip in prev["ips"]:
        idx = ip.get("interface")
        if idx is not None and idx >= len(prev["interfaces"]):
            raise _fail(
                f"prevResult ip {ip.get('address')} points at interface index {idx}, which does not exist"
            )
    if conf.ipam_type:
        ipam.delegate(conf.ipam_type, "CHECK", inv.environ, inv.path, inv.stdin)


def cmd_status(inv: Invocation, conf: config.NetConf) -> None:
    """Ready when the master exists and the IPAM plugin is installed (and says it is ready)."""
    try:
        namespaces.resolve_master(conf)
    except CNIError as exc:
        raise CNIError(NOT_AVAILABLE, f"plugin not available: {exc.msg}") from None
    if conf.ipam_type:
        try:
            ipam.find_plugin(conf.ipam_type, inv.path)
        except CNIError as exc:
            raise CNIError(NOT_AVAILABLE, f"plugin not available: {exc.msg}") from None
        if ipam.supports(conf.ipam_type, inv.environ, inv.path, "1.1.0"):
            ipam.exec_plugin(conf.ipam_type, "STATUS", inv.environ, inv.path, inv.stdin)
