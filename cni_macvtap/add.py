"""ADD: record the intent, create the macvtap in CNI_NETNS under a temporary name, rename it, bring it
up, delegate IPAM, publish the tap device node, record the result.

Each step pushes its undo before the next one starts; a failure (or any exception) runs the undo list
backwards, so a failed ADD leaves no link, IPAM allocation, device node or record behind. The record
is written before anything else, so even a killed ADD is undone by the DEL the runtime sends next.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import config, devnode, ipam, links, namespaces, release, results, state
from .environment import Invocation
from .errors import INVALID_CONFIG, IO_FAILURE, IPAM_FAILURE, LINK_FAILURE, TRY_AGAIN, CNIError
from .links import LinkInfo, PodLinks


class UndoList:
    """Undo steps of a half-done ADD, run last-in first-out."""

    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, what: str, step: Callable[[], object]) -> None:
        self._steps.append((what, step))

    def run(self) -> list[str]:
        """Run every step (a failing one does not stop the others); what could not be undone."""
        failures = []
        for what, step in reversed(self._steps):
            try:
                step()
            except Exception as exc:  # keep undoing; report what could not be undone
                failures.append(f"{what}: {getattr(exc, 'msg', exc)}")
        for failure in failures:
            print(f"macvtap: rollback step failed: {failure}", file=sys.stderr)
        return failures


def cmd_add(inv: Invocation, conf: config.NetConf) -> dict[str, Any]:
    """Create the attachment; on any failure everything done so far is undone before the error."""
    master = namespaces.resolve_master(conf)
    if conf.mtu is not None and conf.mtu > master.mtu:
        raise CNIError(
            INVALID_CONFIG,
            f"invalid config: 'mtu' {conf.mtu} is larger than master {master.name}'s MTU {master.mtu}: "
            f"use at most {master.mtu}",
        )
    path = state.record_path(conf.state_dir, conf.name, inv.container_id, inv.ifname)
    with namespaces.open_pod(inv.netns) as pod:
        _make_room(inv, conf, path)
        with pod.links() as pod_links:
            attach = _Attach(inv, conf, master, pod, pod_links)
            try:
                result = attach.steps(path)
            except CNIError as exc:
                failures = attach.undo.run()
                if failures:
                    exc.details = "; ".join(
                        filter(None, [exc.details, "rollback failed: " + "; ".join(failures)])
                    )
                raise
            except BaseException:
                attach.undo.run()
                raise
    return results.encode(result, conf.cni_version)


def _make_room(inv: Invocation, conf: config.NetConf, path: str) -> None:
    """A finished earlier ADD of this attachment is refused (DEL it first); what a killed ADD left is
    released first. A file at the record's path that is not a record of ours is never overwritten."""
    rec = state.read(path)
    if rec is None:
        if state.occupied(path):
            raise CNIError(
                IO_FAILURE,
                f"{path} exists and is not a macvtap attachment record: "
                "remove it or choose another 'stateDir'",
            )
        return
    if rec.get("phase") != state.ADDING:
        raise CNIError(
            LINK_FAILURE,
            f"attachment {inv.container_id}/{inv.ifname} of network {conf.name} already exists "
            "(an earlier ADD succeeded): DEL it first",
        )
    release.release_recorded(path, rec, conf, inv.environ, inv.path, inv.stdin)


class _Attach:
    """The steps of one ADD, each pushing its undo on self.undo."""

    def __init__(
        self,
        inv: Invocation,
        conf: config.NetConf,
        master: LinkInfo,
        pod: namespaces.PodNetns,
        pod_links: PodLinks,
    ) -> None:
        self.inv, self.conf, self.master, self.pod, self.pod_links = inv, conf, master, pod, pod_links
        self.undo = UndoList()

    def steps(self, path: str) -> dict[str, Any]:
        """Record, link, rename and up, IPAM, device node, final record: the internal 1.x result."""
        inv, conf = self.inv, self.conf
        tmp = links.temp_name()
        node = devnode.node_path(conf.device_dir, inv.container_id, inv.ifname)
        record: dict[str, Any] = {
            "phase": state.ADDING,
            "containerID": inv.container_id,
            "ifname": inv.ifname,
            "netns": inv.netns,
            "netnsId": list(self.pod.identity),
            "tmpName": tmp,
            "devicePath": node,
            "args": inv.args,
            "config": inv.stdin.decode("utf-8", "surrogateescape"),
        }
        state.write(path, record)
        self.undo.push("remove the attachment record", lambda: state.remove(path))
        link = self.create_link(tmp)
        devt = devnode.devt_of(link.name, link.index)
        self.rename_and_up(link)
        result: dict[str, Any] = {
            "interfaces": [{"name": inv.ifname, "mac": link.mac, "mtu": link.mtu, "sandbox": inv.netns}],
            "ips": [],
            "routes": [],
        }
        if conf.ipam_type:
            self.ipam_add(conf.ipam_type, result)
        devnode.create(node, devt, conf.tap_uid, conf.tap_gid, conf.tap_mode)
        self.undo.push("remove the tap device node", lambda: devnode.remove(node, devt))
        done = {
            "phase": state.DONE,
            "ifindex": link.index,
            "mac": link.mac,
            "mtu": link.mtu,
            "devt": list(devt),
        }
        state.write(path, {**record, **done})
        return result

    def mac_error(self, problem: str) -> CNIError:
        """The error for a MAC the kernel would not take, naming where the MAC came from."""
        mac = self.conf.mac
        if mac.mac is None:  # a kernel-chosen MAC that collides: astronomically rare, and a retry fixes it
            return CNIError(TRY_AGAIN, f"the kernel-chosen MAC of the new macvtap {problem}: try again")
        return CNIError(mac.error_code, f"invalid {mac.source} {mac.mac!r}: {problem}: choose another MAC")

    def create_link(self, tmp: str) -> LinkInfo:
        """The new macvtap under its temporary name, with its undo pushed as soon as it may exist."""
        conf = self.conf
        try:
            namespaces.host_links().create_macvtap(
                tmp, self.master.index, self.pod.fd, conf.mode, conf.mtu, conf.mac.mac
            )
        except links.MacRefused as exc:
            raise self.mac_error(f"was refused by the kernel ({exc})") from None
        made: list[int] = []

        def drop() -> None:
            found = self.pod_links.by_index(made[0]) if made else self.pod_links.by_name(tmp)
            if found is not None and found.kind == "macvtap":
                self.pod_links.delete(found.index)

        self.undo.push("delete the macvtap link", drop)
        link = self.pod_links.by_name(tmp)
        if link is None:
            raise CNIError(LINK_FAILURE, "the new macvtap is missing from CNI_NETNS")
        made.append(link.index)
        return link

    def rename_and_up(self, link: LinkInfo) -> None:
        """Rename to CNI_IFNAME (an existing interface of that name is never touched), then bring it up:
        only then does the kernel notice a MAC another macvtap on the master already uses."""
        self.pod_links.rename(link.index, self.inv.ifname)
        try:
            self.pod_links.set_up(link.index)
        except links.AddressInUse:
            raise self.mac_error(
                f"is already used by another macvtap or macvlan on master {self.master.name}"
            ) from None

    def ipam_add(self, ipam_type: str, result: dict[str, Any]) -> None:
        """Delegate ADD to IPAM and put its addresses into the result, bound to our interface."""
        inv = self.inv
        raw = ipam.delegate(ipam_type, "ADD", inv.environ, inv.path, inv.stdin)
        self.undo.push(
            "release the IPAM allocation",
            lambda: ipam.delegate(ipam_type, "DEL", inv.environ, inv.path, inv.stdin),
        )
        try:
            got = results.normalize(raw or {})
        except results.ResultShapeError as exc:
            raise CNIError(
                IPAM_FAILURE, f"IPAM plugin {ipam_type} ADD returned a malformed result: {exc}"
            ) from None
        for ip in got["ips"]:
            ip["interface"] = 0
        result["ips"] = got["ips"]
        result["routes"] = got["routes"]
        if got.get("dns"):
            result["dns"] = got["dns"]
