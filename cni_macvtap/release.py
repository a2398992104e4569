"""DEL and GC: release what an attachment's record says ADD made.

The link is deleted only when it is the recorded one (by ifindex, or by its recorded names while ADD
had not finished), and only in the recorded network namespace (by identity, whatever path reaches
it); then the IPAM allocation, the tap device node and the record go. Idempotent and best effort:
whatever is already gone is fine. Without a record of ours no link, node or file is touched; only the
IPAM release runs, which the spec asks of every DEL.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from . import config, devnode, ipam, locks, namespaces, state
from .environment import Invocation
from .errors import IPAM_FAILURE, CNIError
from .links import PodLinks


def same_namespace(pod: namespaces.PodNetns, rec: dict[str, Any]) -> bool:
    """Whether pod is the network namespace the record names (by identity, whatever path reaches it)."""
    ident = rec.get("netnsId")
    if isinstance(ident, list) and len(ident) == 2 and all(isinstance(i, int) for i in ident):
        return pod.identity == (ident[0], ident[1])
    return pod.path == rec.get("netns")  # a record of an older version: its own path only


def _delete_recorded_link(pod_links: PodLinks, rec: dict[str, Any]) -> None:
    names = {n for n in (rec.get("ifname"), rec.get("tmpName")) if isinstance(n, str) and n}
    index = rec.get("ifindex")
    if isinstance(index, int):  # ADD finished: exactly that link, if it still has one of our names
        link = pod_links.by_index(index)
        if link is not None and link.name not in names:
            link = None
    else:  # ADD did not finish: the link still has its temporary name, or was just renamed
        found = (pod_links.by_name(n) for n in sorted(names))
        link = next((f for f in found if f is not None), None)
    if link is not None and link.kind == "macvtap":
        pod_links.delete(link.index)


def delete_recorded_link(rec: dict[str, Any], hint: str = "") -> None:
    """Delete the link a record names, looking in the namespace at hint (CNI_NETNS) and at the recorded
    path; nothing happens when the namespace or the link is gone (a netns is never re-created)."""
    paths = [p for p in (hint, rec.get("netns")) if isinstance(p, str) and p.startswith("/")]
    for path in dict.fromkeys(paths):
        pod = namespaces.find_pod(path)
        if pod is None:
            continue
        with pod:
            if not same_namespace(pod, rec):
                continue
            try:
                pod_links = pod.links()
            except CNIError:
                return  # no longer a namespace we can enter: its links are gone with it
            with pod_links:
                _delete_recorded_link(pod_links, rec)
            return


def device_path(rec: dict[str, Any] | None, conf: config.NetConf, container_id: str, ifname: str) -> str:
    """The recorded device node path when it is one of this attachment's, else the configured one."""
    path = rec.get("devicePath") if rec else None
    tail = os.sep + os.path.join(container_id, ifname)
    if (
        isinstance(path, str)
        and path.startswith("/")
        and path.endswith(tail)
        and os.path.normpath(path) == path
    ):
        return path
    return devnode.node_path(conf.device_dir, container_id, ifname)


def recorded_devt(rec: dict[str, Any] | None) -> tuple[int, int] | None:
    """The device number ADD recorded, if it got that far."""
    devt = rec.get("devt") if rec else None
    if isinstance(devt, list) and len(devt) == 2 and all(isinstance(n, int) for n in devt):
        return devt[0], devt[1]
    return None


def release_recorded(
    path: str,
    rec: dict[str, Any],
    conf: config.NetConf,
    environ: Mapping[str, str],
    cni_path: Sequence[str],
    fallback_stdin: bytes,
) -> None:
    """Release an attachment from its record alone (GC, or the leftovers of a killed ADD): the IPAM
    plugin gets the environment and config of the ADD that made it (fallback_stdin if none is kept)."""
    cid, ifname = str(rec["containerID"]), str(rec["ifname"])
    delete_recorded_link(rec)
    if conf.ipam_type:
        env = dict(environ)
        env.update(CNI_CONTAINERID=cid, CNI_IFNAME=ifname, CNI_NETNS="", CNI_ARGS=str(rec.get("args", "")))
        recorded = rec.get("config")
        stdin = recorded.encode("utf-8", "surrogateescape") if isinstance(recorded, str) else b""
        ipam.delegate(conf.ipam_type, "DEL", env, cni_path, stdin or fallback_stdin)
    devnode.remove(device_path(rec, conf, cid, ifname), recorded_devt(rec))
    state.remove(path)


def cmd_del(inv: Invocation, conf: config.NetConf) -> None:
    """Best-effort, idempotent removal of the link, the IPAM allocation, the node and the record."""
    path = state.record_path(conf.state_dir, conf.name, inv.container_id, inv.ifname)
    rec = state.read(path)
    if rec is not None:
        delete_recorded_link(rec, inv.netns)
    if conf.ipam_type:
        ipam.delegate(conf.ipam_type, "DEL", inv.environ, inv.path, inv.stdin)
    devnode.remove(device_path(rec, conf, inv.container_id, inv.ifname), recorded_devt(rec))
    if rec is not None:
        state.remove(path)


def cmd_gc(inv: Invocation, conf: config.NetConf) -> None:
    """Release every recorded attachment of this network that is not in cni.dev/valid-attachments."""
    valid = set(conf.valid_attachments)
    errors: list[str] = []
    for cid, ifname, path in list(state.records(conf.state_dir, conf.name)):
        if (cid, ifname) in valid:
            continue
        with locks.attachment_lock(conf.state_dir, (conf.name, cid, ifname)):
            rec = state.read(path)
            if rec is None:
                continue  # gone meanwhile, or not a record of ours
            try:
                release_recorded(path, rec, conf, inv.environ, inv.path, inv.stdin)
            except CNIError as exc:
                errors.append(f"{cid}/{ifname}: {exc.msg}")
    if conf.ipam_type and ipam.supports(conf.ipam_type, inv.environ, inv.path, "1.1.0"):
        ipam.exec_plugin(conf.ipam_type, "GC", inv.environ, inv.path, inv.stdin)
    if errors:
        raise CNIError(IPAM_FAILURE, "GC could not release some attachments: " + "; ".join(errors))
