"""A hostile pod author against the node, through kubelet: kubelet -> edgevirt-cri -> the kvm handler ->
libvirt on the local cluster. Several teams share the node; anyone who may create pods in their own
namespace may run a kvm pod, and must reach nothing of another namespace, no host file, and not the
node's memory or disk. Admission (an API-server policy) reserves the VM pod annotations to the
controller; these tests create the pods as the controller's service account where such a policy
refuses them, so what is checked is that the node holds on its own.

* a pod in a second namespace carrying another namespace's VM UID, image and volume annotations
  runs on disks of its own;
* every skopeo transport but docker:// is refused with a clear event, and nothing is left in /var/tmp;
* oversize disks are refused;
* a hostDisk in another namespace's folder is refused, and nothing is created there;
* secret cloud-init user data reaches the guest from a Secret mounted at /run/edgevirt/cloud-init.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest
import yaml
from helpers.vm_env import connection, domain_names
from helpers.waiting import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

CONTROLLER = "system:serviceaccount:edgevirt-system:edgevirt-controller"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SKOPEO_TMP = re.compile(r"^(oci|docker-tarfile-blob|container_images_|storage|docker-archive|dir)")
TRANSPORTS = (
    "oci:/var/lib/edgevirt/images/layout:1",
    "oci-archive:/etc/shadow",
    "docker-archive:/etc/shadow",
    "dir:/etc",
    "containers-storage:alpine",
    "docker-daemon:alpine:latest",
)


def kvm_options(cluster) -> dict:
    cfg = yaml.safe_load((cluster.paths.etc / "edgevirt-cri.yaml").read_text())
    return cfg["backends"]["kvm"]["options"]


def vm_state(cluster) -> Path:
    return Path(kvm_options(cluster).get("vm_state_dir") or "/var/lib/edgevirt/vm")


def pod_manifest(name: str, image: str, annotations: dict[str, str] | None = None, **spec) -> dict:
    # 1 vCPU each, but a small CPU request: several such pods must fit a 2-core node at once
    resources = {"limits": {"cpu": "1", "memory": "256Mi"}, "requests": {"cpu": "10m", "memory": "256Mi"}}
    container = {"name": "vm", "image": image, "resources": resources}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "runtimeClassName": "kvm",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            **spec,
        },
    }


def create_pod(cluster, ns: str, manifest: dict) -> None:
    """Create the pod as the cluster's admin; where admission reserves its annotations to the
    controller (deploy/manifests/admission-policies.yaml), as the controller's service account, which
    may only make pods a VirtualMachine owns: so a stand-in VirtualMachine (never started, no
    controller acts on it) owns the pod. That is what an attacker would need a second hole for; what
    is checked here is that the node holds on its own."""
    body = json.dumps(manifest)
    r = cluster.kubectl("create", "-n", ns, "-f", "-", input=body, check=False)
    if r.returncode != 0 and "edgevirt.io/" in r.stderr:
        owned = json.loads(body)
        vm = owner_vm(cluster, ns, owned["metadata"]["name"])
        owned["metadata"]["labels"] = {"edgevirt.io/vm": vm["metadata"]["name"]}
        owned["metadata"]["ownerReferences"] = [
            {
                "apiVersion": "edgevirt.io/v1alpha1",
                "kind": "VirtualMachine",
                "name": vm["metadata"]["name"],
                "uid": vm["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        owned["spec"]["automountServiceAccountToken"] = False
        body = json.dumps(owned)
        r = cluster.kubectl("create", "-n", ns, "--as", CONTROLLER, "-f", "-", input=body, check=False)
    assert r.returncode == 0, r.stderr


def owner_vm(cluster, ns: str, pod: str) -> dict:
    """A stopped VirtualMachine ``<pod>-owner`` in ``ns`` to own a hand-made VM pod."""
    cluster.install_vm_crd()
    vm = {
        "apiVersion": "edgevirt.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": f"{pod}-owner"},
        "spec": {"running": False, "image": "127.0.0.1:5000/vm/none:1"},
    }
    cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(vm))
    return cluster.kubectl_json("get", "vm", vm["metadata"]["name"], "-n", ns)


def domains_of_namespaces(namespaces: tuple[str, ...]) -> list[str]:
    """The edgevirt domains whose metadata names one of ``namespaces``."""
    from cri_shim.vm.domain_xml import read_metadata

    with connection() as conn:
        return [
            d.name()
            for d in conn.listAllDomains()
            if read_metadata(d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).get("namespace") in namespaces
        ]


def event_text(cluster, ns: str, name: str) -> str:
    ev = cluster.kubectl_json("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
    return "\n".join(e.get("message", "") for e in ev["items"])


def wait_event(cluster, ns: str, name: str, needle: str) -> str:
    return wait_for(
        f"an event on {ns}/{name} saying {needle!r}",
        lambda: (t := event_text(cluster, ns, name)) and needle in t and t,
        180,
        2,
        explain=lambda: event_text(cluster, ns, name),
    )


def domain_of(cluster, ns: str, name: str) -> str | None:
    """The libvirt domain of the pod's container (edgevirt-<container id[:20]>), once it exists."""
    pod = cluster.kubectl_json("get", "pod", name, "-n", ns)
    for cs in pod["status"].get("containerStatuses") or []:
        cid = (cs.get("containerID") or "").split("://", 1)[-1]
        if cid:
            return f"edgevirt-{cid[:20]}"
    return None


def disk_sources(domain: str) -> list[str]:
    with connection() as conn:
        xml = conn.lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    return [s.get("file", "") for s in ET.fromstring(xml).iterfind("devices/disk/source")]


def skopeo_tmp() -> set[str]:
    return {n for n in os.listdir("/var/tmp") if SKOPEO_TMP.match(n)}


@pytest.fixture
def teams(cluster):
    """Two fresh namespaces; the VM disks made for them are removed at the end."""
    from cri_shim.vm.disks import DiskManager

    with (
        cluster.namespace("e2e-team-a", drop_vm_finalizers=True) as a,
        cluster.namespace("e2e-team-b", drop_vm_finalizers=True) as b,
    ):
        try:
            yield a, b
        finally:
            for ns in (a, b):
                cluster.kubectl(
                    "delete",
                    "pods",
                    "--all",
                    "-n",
                    ns,
                    "--wait=true",
                    "--timeout=120s",
                    check=False,
                    timeout=150,
                )
            disks = DiskManager(vm_state(cluster))
            for ns, uid in disks.vm_disk_owners():
                if ns in (a, b):
                    disks.remove_vm_disks(ns, uid)


def test_a_vm_uid_copied_into_another_namespace_runs_on_disks_of_its_own(cluster, vm_image, teams):
    a, b = teams
    vm_uid = str(uuid.uuid4())
    ann = {
        "edgevirt.io/vm-uid": vm_uid,
        "edgevirt.io/vm-name": "web",
        "edgevirt.io/image": vm_image,
        "edgevirt.io/volumes": json.dumps([{"name": "data", "emptyDisk": {"capacity": "16Mi"}}]),
    }
    for ns in (a, b):
        create_pod(cluster, ns, pod_manifest("web-vm", vm_image, ann))
    sources = {}
    for ns in (a, b):
        cluster.kubectl(
            "wait", "--for=condition=Ready", "pod/web-vm", "-n", ns, "--timeout=300s", timeout=320
        )
        dom = domain_of(cluster, ns, "web-vm")
        assert dom is not None
        sources[ns] = [f for f in disk_sources(dom) if "/disks/" in f]
    state = vm_state(cluster)
    for ns, files in sources.items():
        assert len(files) == 2 and all(f.startswith(f"{state}/disks/ns/{ns}/vm/{vm_uid}/") for f in files), (
            files
        )
    assert not set(sources[a]) & set(sources[b])


def test_every_skopeo_transport_is_refused_with_a_clear_event(cluster, vm_image, teams):
    _, b = teams
    before, domains = skopeo_tmp(), set(domain_names("edgevirt-"))
    names = []
    for i, ref in enumerate(TRANSPORTS):
        names.append(f"t{i}")
        create_pod(cluster, b, pod_manifest(f"t{i}", vm_image, {"edgevirt.io/image": ref}))
    for name, ref in zip(names, TRANSPORTS, strict=True):
        text = wait_event(cluster, b, name, "which the kvm handler does not allow")
        assert f"uses skopeo transport '{ref.split(':', 1)[0]}'" in text, text
        assert "/var/lib/edgevirt/vm" not in text and not DIGEST.search(text), text
    assert skopeo_tmp() <= before
    assert set(domain_names("edgevirt-")) <= domains  # none of them got a domain


def test_oversize_disks_are_refused(cluster, vm_image, teams):
    _, b = teams
    vols = [{"name": "big", "emptyDisk": {"capacity": "16Ti"}}]
    ann = {
        "edgevirt.io/vm-uid": str(uuid.uuid4()),
        "edgevirt.io/image": vm_image,
        "edgevirt.io/volumes": json.dumps(vols),
    }
    create_pod(cluster, b, pod_manifest("big-vm", vm_image, ann))
    text = wait_event(cluster, b, "big-vm", "16Ti is over this node's limit")
    assert "max_disk_bytes" in text


def test_a_hostdisk_in_another_namespaces_folder_is_refused(cluster, vm_image, teams):
    a, b = teams
    root = Path(kvm_options(cluster).get("host_disk_root") or "/var/lib/edgevirt/hostdisks")
    target = root / a / "data.img"
    hd = {"path": f"../{a}/data.img", "type": "DiskOrCreate", "capacity": "1Mi"}
    vols = [{"name": "h", "hostDisk": hd}]
    ann = {
        "edgevirt.io/vm-uid": str(uuid.uuid4()),
        "edgevirt.io/image": vm_image,
        "edgevirt.io/volumes": json.dumps(vols),
    }
    create_pod(cluster, b, pod_manifest("steal-vm", vm_image, ann))
    wait_event(cluster, b, "steal-vm", "is not a clean path")
    assert not target.exists()


def test_secret_user_data_reaches_the_guest_from_a_secret_volume(cluster, vm_image, teams):
    a, _ = teams
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "cloud-init"},
        "stringData": {"userdata": "#cloud-config\n# edgevirt.poweroff: 3\n"},  # the test guest powers off
    }
    cluster.kubectl("create", "-n", a, "-f", "-", input=json.dumps(secret))
    manifest = pod_manifest(
        "secret-vm",
        vm_image,
        volumes=[{"name": "cloud-init", "secret": {"secretName": "cloud-init"}}],
        container={
            "volumeMounts": [
                {"name": "cloud-init", "mountPath": "/run/edgevirt/cloud-init", "readOnly": True}
            ]
        },
    )
    create_pod(cluster, a, manifest)
    phase = wait_for(
        "the guest to power off as the Secret's user data says",
        lambda: (
            (p := cluster.kubectl_json("get", "pod", "secret-vm", "-n", a)["status"].get("phase"))
            in ("Succeeded", "Failed")
            and p
        ),
        300,
        2,
        explain=lambda: event_text(cluster, a, "secret-vm"),
    )
    assert phase == "Succeeded", event_text(cluster, a, "secret-vm")
    pod = cluster.kubectl_json("get", "pod", "secret-vm", "-n", a)
    assert "edgevirt.poweroff" not in json.dumps(pod["metadata"])  # in no pod metadata
    records = Path(kvm_options(cluster)["state_dir"])
    assert not any("edgevirt.poweroff" in p.read_text() for p in records.rglob("*.json"))  # nor a record
