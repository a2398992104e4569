"""The kvm handler's CRI answers: runtime.v1 protobuf messages built from its records.

The generated protobuf module is untyped, so messages are ``Any``; this module and the handler's
request parsing (:mod:`.translate`) are where they meet the typed records.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..vm.model import DomainStats
from . import cni_exec
from .records import ContainerRecord, ContainerState, SandboxRecord

HANDLER = "kvm"


def labels_match(labels: dict[str, str], selector: Any) -> bool:
    """Whether ``labels`` have every key/value of a CRI filter's ``label_selector``."""
    return all(labels.get(k) == v for k, v in selector.items())


def sandbox_message(api: Any, sb: SandboxRecord, cls: Any) -> Any:
    """A ``PodSandbox`` or ``PodSandboxStatus`` (``cls``) with the fields both share."""
    md = sb.metadata
    return cls(
        id=sb.id,
        metadata=api.PodSandboxMetadata(name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt),
        state=api.SANDBOX_READY if sb.state == "READY" else api.SANDBOX_NOTREADY,
        created_at=sb.created_at,
        labels=sb.labels,
        annotations=sb.annotations,
        runtime_handler=HANDLER,
    )


def pod_sandbox_status(api: Any, sb: SandboxRecord, netns_path: Path, verbose: bool) -> Any:
    status = sandbox_message(api, sb, api.PodSandboxStatus)
    ips = cni_exec.pod_ips(sb.cni_result) if sb.state == "READY" else []
    if ips:
        status.network.ip = ips[0]
        status.network.additional_ips.extend(api.PodIP(ip=ip) for ip in ips[1:])
    status.linux.namespaces.options.network = api.POD
    info = {}
    if verbose:
        info["info"] = json.dumps({"netns": str(netns_path), "cniResult": sb.cni_result, "mac": sb.mac})
    return api.PodSandboxStatusResponse(status=status, info=info)


def _state_enum(api: Any, state: ContainerState) -> Any:
    return {
        "CREATED": api.CONTAINER_CREATED,
        "RUNNING": api.CONTAINER_RUNNING,
        "EXITED": api.CONTAINER_EXITED,
    }[state]


def _image(api: Any, c: ContainerRecord) -> Any:
    return api.ImageSpec(image=c.image_spec or c.image, user_specified_image=c.image)


def _metadata(api: Any, c: ContainerRecord) -> Any:
    return api.ContainerMetadata(name=c.metadata.name, attempt=c.metadata.attempt)


def container_message(api: Any, c: ContainerRecord) -> Any:
    """A ``Container`` (ListContainers) in the state its record says."""
    return api.Container(
        id=c.id,
        pod_sandbox_id=c.sandbox_id,
        metadata=_metadata(api, c),
        image=_image(api, c),
        image_ref=c.image,
        state=_state_enum(api, c.state),
        created_at=c.created_at,
        labels=c.labels,
        annotations=c.annotations,
    )


def container_status(api: Any, c: ContainerRecord, verbose: bool) -> Any:
    exited = c.state == "EXITED"
    status = api.ContainerStatus(
        id=c.id,
        metadata=_metadata(api, c),
        state=_state_enum(api, c.state),
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        exit_code=c.exit_code if exited else 0,
        image=_image(api, c),
        image_ref=c.image,
        reason=c.reason if exited else "",
        message=c.message if exited else "",
        labels=c.labels,
        annotations=c.annotations,
        log_path=c.log_path,
    )
    info = {}
    if verbose:
        info["info"] = json.dumps({"domain": c.domain, "sandboxID": c.sandbox_id})
    return api.ContainerStatusResponse(status=status, info=info)


def container_stats(api: Any, c: ContainerRecord, s: DomainStats | None) -> Any:
    """``ContainerStats``: the attributes always, CPU and memory when the VM runs (``s``)."""
    stats = api.ContainerStats(
        attributes=api.ContainerAttributes(
            id=c.id, metadata=_metadata(api, c), labels=c.labels, annotations=c.annotations
        )
    )
    if s is None:
        return stats
    stats.cpu.timestamp = s.timestamp_ns
    stats.cpu.usage_core_nano_seconds.value = s.cpu_time_ns
    stats.memory.timestamp = s.timestamp_ns
    stats.memory.working_set_bytes.value = s.memory_rss_kib * 1024
    stats.memory.rss_bytes.value = s.memory_rss_kib * 1024
    stats.memory.usage_bytes.value = s.memory_rss_kib * 1024
    return stats


def runtime_status(api: Any, libvirt_error: str | None, missing_plugins: list[str]) -> Any:
    """RuntimeReady: libvirt answers; NetworkReady: the VM network's plugins are installed."""
    out = api.StatusResponse()
    rt = (True, "", "") if libvirt_error is None else (False, "LibvirtUnavailable", libvirt_error)
    net = (not missing_plugins, "CNIPluginMissing" if missing_plugins else "", ", ".join(missing_plugins))
    for kind, (ok, reason, msg) in (("RuntimeReady", rt), ("NetworkReady", net)):
        out.status.conditions.add(type=kind, status=ok, reason=reason, message=msg)
    out.runtime_handlers.add(name=HANDLER)
    return out
