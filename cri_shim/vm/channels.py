"""Hot-plugged virtio-serial channels: byte pipes between the host and a running guest, one per
stream of an exec or port-forward session.

A channel is a ``<channel type='unix'>`` with a named virtio target on the domain's virtio-serial
controller (:func:`.domain_xml.channel_element`): QEMU listens on a unix socket whose path libvirt
chooses (under its per-domain channel folder), the guest sees a port with that name in
/sys/class/virtio-ports. :func:`plug` attaches one to the live domain (not its definition: a
channel lives as long as its session) and answers the socket's path; :func:`unplug` removes it.
Names are ``io.edgevirt.<session>.<stream>`` (:data:`PREFIX`), so edgevirt's channels are told
apart from anything else (:func:`session_channels`, to sweep those a crashed process left).

What a channel carries, and when it starts and ends, is the guest script's business
(:mod:`.guest_scripts`) and the session's (:mod:`.guest_session`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import libvirt

from .domain_xml import channel_element
from .errors import VMError

#: every channel edgevirt hot-plugs is named ``<PREFIX><session>.<stream>``
PREFIX = "io.edgevirt."
_NAME = re.compile(r"^io\.edgevirt\.[a-z0-9-]{1,40}\.[a-z]{1,10}$")


def _channels(xml: str) -> list[ET.Element]:
    return list(ET.fromstring(xml).iterfind("devices/channel"))


def _name(ch: ET.Element) -> str:
    target = ch.find("target")
    return (target.get("name") or "") if target is not None else ""


def find(xml: str, port_name: str) -> ET.Element | None:
    """The ``<channel>`` whose virtio target is named ``port_name`` in a domain XML, if any."""
    return next((ch for ch in _channels(xml) if _name(ch) == port_name), None)


def socket_path(xml: str, port_name: str) -> str | None:
    """The host socket of channel ``port_name`` in a live domain XML, if it is there."""
    ch = find(xml, port_name)
    src = ch.find("source") if ch is not None else None
    return src.get("path") if src is not None else None


def session_channels(xml: str) -> list[str]:
    """Names of the channels edgevirt's sessions plugged into a live domain."""
    return [n for ch in _channels(xml) if (n := _name(ch)).startswith(PREFIX)]


def plug(name: str, dom: libvirt.virDomain, port_name: str) -> str:
    """Hot-plug channel ``port_name`` into running domain ``name`` (``dom``); its socket's path."""
    if not _NAME.match(port_name):
        raise VMError(f"channel name {port_name!r} is not of the form {PREFIX}<session>.<stream>")
    xml = ET.tostring(channel_element(port_name), encoding="unicode")
    try:
        dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        live = dom.XMLDesc(0)
    except libvirt.libvirtError as e:
        raise VMError(f"hot-plugging channel {port_name!r} into {name!r} failed: {e}") from None
    path = socket_path(live, port_name)
    if not path:
        unplug(name, dom, port_name)
        raise VMError(f"channel {port_name!r} of {name!r} has no socket after hot-plug")
    return path


def unplug(name: str, dom: libvirt.virDomain, port_name: str) -> bool:
    """Hot-unplug channel ``port_name`` from domain ``name``; False when it was not there (also
    when the domain stopped: its channels went with it)."""
    try:
        if not dom.isActive():
            return False
        ch = find(dom.XMLDesc(0), port_name)
        if ch is None:
            return False
        dom.detachDeviceFlags(ET.tostring(ch, encoding="unicode"), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    except libvirt.libvirtError as e:
        raise VMError(f"hot-unplugging channel {port_name!r} from {name!r} failed: {e}") from None
    return True
