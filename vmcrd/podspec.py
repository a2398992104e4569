"""The VM pod: how a VirtualMachine becomes a pod, and the annotation contract with the CRI shim.

The cluster-mode controller turns a VirtualMachine that should run into one pod with
``runtimeClassName: kvm``. kubelet hands the pod's annotations to the CRI runtime in
``RunPodSandbox``, so the kvm handler reads everything it needs from them. The annotation contract
belongs to the reading side, :mod:`cri_shim.kvm.contract`; this module writes it, plus two
annotations of the controller's own bookkeeping that the handler ignores: ``edgevirt.io/spec-hash``
(hash of the boot-relevant spec) and ``edgevirt.io/state-request`` (the restart request the pod was
created for).

Secret cloud-init user data (``spec.cloudInit.userDataSecretRef``) is never copied: the pod gets a
``secret`` volume of that Secret, mounted read-only into the container at
:data:`~cri_shim.kvm.contract.CLOUD_INIT_SECRET_PATH`, where the kvm handler reads it. The pod is what
the admission policy ``edgevirt-controller-vm-pods-only`` lets the controller create: RuntimeClass
kvm, owned by the VM, labelled, no host namespaces, no privileges, no volume but that Secret, no
service account token.

Labels: ``edgevirt.io/vm=<name>``, ``edgevirt.io/vm-uid=<uid>``. The pod's single container is
named ``compute``; its image is the VM image when that is an OCI reference (so kubelet's pull is
the real pull) and :data:`PLACEHOLDER_IMAGE` otherwise (kubelet cannot parse ``file://`` or
``https://`` references). Limits are ``spec.cpu``/``spec.memory`` (the shim gets them in the CRI
``LinuxContainerResources``); requests are the memory and ``spec.cpu`` / :data:`CPU_ALLOCATION_RATIO`.
``restartPolicy`` follows the runStrategy (:data:`vmcrd.api.RESTART_POLICIES`): Always -> Always,
RerunOnFailure -> OnFailure, the others -> Never; so kubelet brings a VM back in the same sandbox (same
disks, MAC, IP) without the API server, and the controller acts on what kubelet does not.

``spec.readinessProbe`` / ``spec.livenessProbe`` (as KubeVirt's, ``exec`` or ``tcpSocket``) become
the ``compute`` container's probes: kubelet runs an exec probe through CRI ExecSync, which the kvm
handler runs in the guest through its QEMU guest agent; a tcpSocket probe is kubelet's own
connection to the pod IP from the node (docs/verbs.md says what that reaches). A failed liveness
probe makes kubelet end the VM container; whether it runs again follows the pod's restartPolicy
(above), so a VM with runStrategy Always is restarted by kubelet in the same sandbox. Probes are boot
fields: a pod's probes cannot change, so a changed probe takes a restart (and only a VM that has
probes hashes them, so the spec hash of one without stays as it was).

Once the VM has a node the pod is pinned there by a required node affinity (its disks are
node-local), and it tolerates the node lifecycle controller's NoExecute taints
``node.kubernetes.io/unreachable`` and ``node.kubernetes.io/not-ready`` forever
(:data:`TOLERATIONS`): a node that stops reporting does not get its VM evicted after the default
300 s, so the same QEMU still runs when the kubelet returns (:mod:`vmcrd.placement`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from cri_shim.kvm.contract import (
    ANN_CLOUD_INIT_USER_DATA,
    ANN_IMAGE,
    ANN_KERNEL_BOOT,
    ANN_MAC,
    ANN_VM_NAME,
    ANN_VM_UID,
    ANN_VOLUMES,
    CLOUD_INIT_SECRET_KEY,
    CLOUD_INIT_SECRET_PATH,
)

from . import api

ANN_SPEC_HASH = "edgevirt.io/spec-hash"
ANN_STATE_REQUEST = api.STATE_REQUEST

LABEL_VM = "edgevirt.io/vm"
LABEL_VM_UID = "edgevirt.io/vm-uid"

RUNTIME_CLASS = "kvm"
CONTAINER_NAME = "compute"
#: The pod volume of the cloud-init Secret (``spec.cloudInit.userDataSecretRef``).
CLOUD_INIT_VOLUME = "cloud-init"
#: Its file mode: read by the kvm handler (root) only.
CLOUD_INIT_SECRET_MODE = 0o400
#: Container image when the VM image is not an OCI reference (kubelet must still pull something).
PLACEHOLDER_IMAGE = "registry.k8s.io/pause:3.10"
#: vCPUs per requested CPU, as KubeVirt's default cpuAllocationRatio: a 2-core edge node schedules
#: 20 one-vCPU VMs by request (the guests share the cores; memory is not overcommitted).
CPU_ALLOCATION_RATIO = 10
#: Grace period of a VM pod without ``spec.terminationGracePeriodSeconds``: ACPI shutdown first, then
#: destroy (docs/virtualmachine.md, lifecycle).
GRACE_PERIOD_SECONDS = 30


def grace_period(spec: dict[str, Any]) -> int:
    """Seconds the guest gets to power off after ACPI shutdown before its QEMU is destroyed:
    ``spec.terminationGracePeriodSeconds`` (the CRD allows 1..3600; 0 would make the API server drop
    the pod before kubelet stopped it, so a second pod of the VM could start beside the first), else
    :data:`GRACE_PERIOD_SECONDS`. Not a boot field: the controller passes it with each pod delete."""
    value = spec.get("terminationGracePeriodSeconds")
    return GRACE_PERIOD_SECONDS if value is None else max(1, int(value))


#: The node lifecycle controller's taints of a node that stopped reporting (unreachable: Ready
#: Unknown) or reports NotReady, tolerated with no ``tolerationSeconds``, i.e. forever: the VM stays
#: on its node (its disks are there) instead of being evicted after the DefaultTolerationSeconds
#: admission plugin's 300 s. NoExecute only: the scheduler still puts no new pod on such a node.
NODE_LOSS_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
TOLERATIONS = tuple({"key": key, "operator": "Exists", "effect": "NoExecute"} for key in NODE_LOSS_TAINTS)


#: Spec fields whose change needs a reboot (everything but hotpluggable volumes, paused, running,
#: runStrategy). Hotpluggable volumes are mounted live by node mode. ``cloudInit`` includes
#: ``userDataSecretRef``: another Secret means another seed, made at boot.
BOOT_FIELDS = ("cpu", "memory", "image", "kernelBoot", "cloudInit", "networks", "nodeName")
#: The VM's probes, carried onto the compute container; boot fields too, hashed only when present.
PROBES = ("readinessProbe", "livenessProbe")
#: What of a probe is carried (the CRD allows no more): one handler and kubelet's timing knobs.
PROBE_KEYS = (
    "exec",
    "tcpSocket",
    "initialDelaySeconds",
    "periodSeconds",
    "timeoutSeconds",
    "successThreshold",
    "failureThreshold",
)

_OCI_SCHEMES = re.compile(r"^[a-z][a-z0-9+.-]*://")


def is_oci_ref(image: str) -> bool:
    """True for registry references (``127.0.0.1:5000/vm/alpine:3.20``), False for ``file://``/``https://``."""
    return bool(image) and not _OCI_SCHEMES.match(image)


def boot_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The part of a VM spec that is fixed at boot: all of BOOT_FIELDS and the non-hotpluggable volumes."""
    out = {k: spec.get(k) for k in BOOT_FIELDS}
    out["volumes"] = [v for v in spec.get("volumes") or [] if not v.get("hotpluggable")]
    out.update(probes(spec))
    return out


def probes(spec: dict[str, Any]) -> dict[str, Any]:
    """The VM's probes as the compute container's (only the fields of :data:`PROBE_KEYS`)."""
    return {
        name: {k: spec[name][k] for k in PROBE_KEYS if k in spec[name]}
        for name in PROBES
        if isinstance(spec.get(name), dict)
    }


def spec_hash(spec: dict[str, Any]) -> str:
    """Stable hash of :func:`boot_spec`: differs exactly when a running VM needs a restart."""
    blob = json.dumps(boot_spec(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _quantity(v: Any) -> str:
    return str(v)


def cpu_request(vcpus: Any) -> str:
    """The VM pod's CPU request: vCPUs / :data:`CPU_ALLOCATION_RATIO` in millicores (at least 1m).
    The limit is the vCPU count (the shim's vCPUs); memory is requested in full."""
    return f"{max(1, int(float(vcpus) * 1000) // CPU_ALLOCATION_RATIO)}m"


def build_pod(
    vm: dict[str, Any], node: str | None, request: str = "", runtime_class: str = RUNTIME_CLASS
) -> dict[str, Any]:
    """The VM pod for ``vm`` (a VirtualMachine as a dict), pinned to ``node`` when given.

    Pure function of its inputs: the same VM gives the same pod, so a restarted controller makes
    the same object (and the API server's name uniqueness stops a duplicate)."""
    meta = vm["metadata"]
    spec = vm.get("spec") or {}
    name, uid = meta["name"], meta["uid"]
    pod_spec: dict[str, Any] = {
        "runtimeClassName": runtime_class,
        "restartPolicy": api.restart_policy(spec),
        "terminationGracePeriodSeconds": grace_period(spec),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "tolerations": [dict(t) for t in TOLERATIONS],
        "containers": [_container(spec)],
    }
    secret_ref = (spec.get("cloudInit") or {}).get("userDataSecretRef")
    if secret_ref:
        pod_spec["volumes"] = [_cloud_init_volume(secret_ref["name"])]
        pod_spec["containers"][0]["volumeMounts"] = [
            {"name": CLOUD_INIT_VOLUME, "mountPath": CLOUD_INIT_SECRET_PATH, "readOnly": True}
        ]
    if node:
        pod_spec["affinity"] = _node_affinity(node)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": api.pod_name(name),
            "namespace": meta["namespace"],
            "labels": {LABEL_VM: name, LABEL_VM_UID: uid},
            "annotations": pod_annotations(vm, request),
            "ownerReferences": [
                {
                    "apiVersion": api.API_VERSION,
                    "kind": api.KIND,
                    "name": name,
                    "uid": uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pod_spec,
    }


def pod_annotations(vm: dict[str, Any], request: str = "") -> dict[str, str]:
    """The VM pod's annotations: the contract the kvm handler reads, plus our bookkeeping."""
    meta = vm["metadata"]
    spec = vm.get("spec") or {}
    ann: dict[str, str] = {
        ANN_VM_UID: meta["uid"],
        ANN_VM_NAME: meta["name"],
        ANN_IMAGE: spec.get("image", ""),
        ANN_VOLUMES: json.dumps(spec.get("volumes") or [], sort_keys=True, separators=(",", ":")),
        ANN_SPEC_HASH: spec_hash(spec),
    }
    nets = spec.get("networks") or []
    if nets and nets[0].get("mac"):
        ann[ANN_MAC] = str(nets[0]["mac"]).lower()
    user_data = (spec.get("cloudInit") or {}).get("userData")
    if user_data:
        ann[ANN_CLOUD_INIT_USER_DATA] = user_data
    if spec.get("kernelBoot"):
        ann[ANN_KERNEL_BOOT] = json.dumps(spec["kernelBoot"], sort_keys=True, separators=(",", ":"))
    if request:
        ann[ANN_STATE_REQUEST] = request
    return ann


def _container(spec: dict[str, Any]) -> dict[str, Any]:
    """The pod's one container, ``compute``: the image kubelet pulls, the VM's resources."""
    image = spec.get("image", "")
    limits = {"cpu": _quantity(spec.get("cpu", 1)), "memory": _quantity(spec.get("memory", "256Mi"))}
    requests = {"cpu": cpu_request(spec.get("cpu", 1)), "memory": limits["memory"]}
    return {
        "name": CONTAINER_NAME,
        "image": image if is_oci_ref(image) else PLACEHOLDER_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": requests, "limits": limits},
        # the serial console is an interactive terminal: `kubectl attach -it` (CRI Attach)
        "stdin": True,
        "tty": True,
        **probes(spec),
    }


def _cloud_init_volume(secret_name: str) -> dict[str, Any]:
    """The Secret with the user data as a pod volume: only its ``userdata`` key, readable by root only."""
    return {
        "name": CLOUD_INIT_VOLUME,
        "secret": {
            "secretName": secret_name,
            "items": [{"key": CLOUD_INIT_SECRET_KEY, "path": CLOUD_INIT_SECRET_KEY}],
            "defaultMode": CLOUD_INIT_SECRET_MODE,
        },
    }


def _node_affinity(node: str) -> dict[str, Any]:
    """Required affinity to the node by name (not ``spec.nodeName``: the scheduler still checks fit)."""
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}]}
                ]
            }
        }
    }


def pinned_node(pod: dict[str, Any]) -> str | None:
    """The node the pod is pinned to by :func:`_node_affinity` (None: the scheduler picks)."""
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for term in required.get("nodeSelectorTerms") or []:
        for field in term.get("matchFields") or []:
            values = field.get("values") or []
            if field.get("key") == "metadata.name" and field.get("operator") == "In" and len(values) == 1:
                return str(values[0])
    return None


def tolerates_node_loss(pod: dict[str, Any]) -> bool:
    """The pod tolerates every taint of :data:`NODE_LOSS_TAINTS` forever (a pod made before the VM
    pods had :data:`TOLERATIONS` carries the 300 s ones the API server added)."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []

    def forever(key: str) -> bool:
        return any(
            (t.get("key") == key or (not t.get("key") and t.get("operator") == "Exists"))
            and t.get("effect") in ("NoExecute", None, "")
            and t.get("tolerationSeconds") is None
            for t in tolerations
        )

    return all(forever(key) for key in NODE_LOSS_TAINTS)


def owned_by(pod: dict[str, Any], vm: dict[str, Any]) -> bool:
    """True when ``pod`` is controlled by this very VM (same UID), not a namesake."""
    for ref in pod.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") == vm["metadata"]["uid"]:
            return True
    return False
