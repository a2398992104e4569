"""The VirtualMachine CRD on the real API server: apply, explain, admission (schema + CEL), columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# the installed controllers stand aside: status is written here by hand (installed_controllers_paused)
pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_controllers_paused")]

REPO = Path(__file__).resolve().parents[2]

VM = """apiVersion: edgevirt.io/v1alpha1
kind: VirtualMachine
metadata: {{name: {name}}}
spec:
{spec}
"""


@pytest.fixture(scope="module")
def crd(cluster):
    cluster.install_vm_crd()
    return cluster


@pytest.fixture
def ns(crd):
    with crd.namespace("vmcrd-crd") as name:
        yield name


def apply_vm(cluster, ns: str, spec: str, name: str = "t", check: bool = False):
    body = VM.format(name=name, spec="\n".join("  " + line for line in spec.strip().splitlines()))
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=body, check=check)


def test_kustomization_applies_crd_and_rbac(crd):
    out = crd.kubectl("apply", "-k", str(REPO / "deploy"), "--dry-run=server").stdout
    assert "customresourcedefinition.apiextensions.k8s.io/virtualmachines.edgevirt.io" in out
    assert "clusterrole.rbac.authorization.k8s.io/edgevirt-controller" in out
    assert "clusterrole.rbac.authorization.k8s.io/edgevirt-node" in out
    crd.kubectl("apply", "-f", str(REPO / "deploy/manifests/controller.yaml"), "--dry-run=server")


def test_names_short_names_and_status_subresource(crd):
    c = crd.kubectl_json("get", "crd", "virtualmachines.edgevirt.io")
    assert c["spec"]["names"]["shortNames"] == ["vm", "vms"]
    assert c["spec"]["scope"] == "Namespaced"
    (v,) = c["spec"]["versions"]
    assert v["name"] == "v1alpha1" and v["subresources"] == {"status": {}}
    res = crd.kubectl("api-resources", "--api-group=edgevirt.io").stdout
    assert "vm,vms" in res and "VirtualMachine" in res


def test_explain_shows_descriptions(crd):
    out = " ".join(crd.kubectl("explain", "vm.spec.volumes").stdout.split())  # undo line wrapping
    assert "hotpluggable: true may be added to or removed from a Running VM" in out
    assert "emptyDisk" in out and "hostDisk" in out and "bus" in out
    out = " ".join(crd.kubectl("explain", "vm.spec.runStrategy").stdout.split())
    assert "RerunOnFailure" in out and "KubeVirt" in out
    out = " ".join(crd.kubectl("explain", "vm.spec").stdout.split())
    assert "RestartRequired" in out


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        (
            "running: true\nrunStrategy: Always\nimage: x",
            ["spec.runStrategy", "mutually exclusive"],
        ),
        (
            "image: x\nvolumes:\n- {name: data, emptyDisk: {capacity: 1Gi}}\n- {name: data, image: img2}",
            ["spec.volumes", "unique"],
        ),
        (
            "image: x\nvolumes:\n- {name: h, hostDisk: {path: /etc/shadow}}",
            ["spec.volumes[0].hostDisk.path", "drop the leading '/'"],
        ),
        (
            "image: x\nvolumes:\n- {name: h, hostDisk: {path: ../../etc/shadow}}",
            ["spec.volumes[0].hostDisk.path", "'..' segment"],
        ),
        ("image: x\nmemory: lots", ["spec.memory", "quantity"]),
        ("image: x\nmemory: 1Ki", ["spec.memory", "between 32Mi and 1Ti"]),
        (
            "image: x\nvolumes:\n- {name: d, hotpluggable: true, bus: sata, emptyDisk: {capacity: 1Gi}}",
            ["spec.volumes[0].bus", "hotpluggable volume needs bus virtio or scsi"],
        ),
        ("image: x\nvolumes:\n- {name: d}", ["spec.volumes[0]", "exactly one source"]),
        (
            "image: x\nvolumes:\n- {name: d, emptyDisk: {capacity: 1Gi}, image: img2}",
            ["spec.volumes[0]", "exactly one source"],
        ),
        (
            "image: x\nvolumes:\n- {name: c, cdrom: true, image: img2}",
            ["spec.volumes[0].bus", "cdrom needs bus scsi or sata"],
        ),
        (
            "image: x\nvolumes:\n- {name: r, readOnly: true, bus: sata, image: img2}",
            ["spec.volumes[0].readOnly", "cannot make a sata disk read-only"],
        ),
        ("image: x\nrunStrategy: Sometimes", ["spec.runStrategy", "Unsupported value"]),
        ("image: x\nnetworks: [{name: default, mac: 'zz:00:00:00:00:01'}]", ["spec.networks[0].mac"]),
        ("image: x\ncpu: 0", ["spec.cpu"]),
        ("running: true", ["spec.image", "Required value"]),
        (
            "image: x\nvolumes:\n- {name: c, cdrom: true, emptyDisk: {capacity: 1Gi}}",
            ["spec.volumes[0].cdrom", "cdrom needs an image or hostDisk"],
        ),
    ],
)
def test_invalid_specs_are_refused_naming_the_field(crd, ns, spec, needles):
    res = apply_vm(crd, ns, spec)
    assert res.returncode != 0, f"accepted: {spec}"
    for n in needles:
        assert n in res.stderr, res.stderr
    assert crd.kubectl("get", "vm", "-n", ns, "-o", "name").stdout == ""


def test_long_name_refused(crd, ns):
    res = apply_vm(crd, ns, "image: x", name="a" * 64)
    assert res.returncode != 0 and "at most 63 characters" in res.stderr


def test_valid_spec_gets_defaults_and_columns(crd, ns):
    spec = """
running: false
image: 127.0.0.1:5000/vm/alpine-disk:3.20
kernelBoot: {kernel: /boot/vmlinuz, cmdline: console=ttyS0}
cloudInit: {userData: "#cloud-config\\n"}
networks: [{name: default, mac: "02:00:00:00:00:01"}]
volumes:
- {name: data, hotpluggable: true, emptyDisk: {capacity: 1Gi}}
- name: host
  hostDisk: {path: a.img, type: DiskOrCreate, capacity: 1Gi}
  bus: sata
"""
    apply_vm(crd, ns, spec, name="web", check=True)
    vm = crd.kubectl_json("get", "vm", "web", "-n", ns)
    assert vm["spec"]["cpu"] == 1 and vm["spec"]["memory"] == "256Mi"
    assert vm["spec"]["volumes"][0]["bus"] == "virtio" and vm["spec"]["volumes"][0]["readOnly"] is False
    head = crd.kubectl("get", "vm", "-n", ns).stdout.splitlines()[0].split()
    assert head == ["NAME", "STATUS", "NODE", "IP", "AGE"]
    wide = crd.kubectl("get", "vms", "-n", ns, "-o", "wide").stdout.splitlines()[0].split()
    assert wide[:5] == ["NAME", "STATUS", "NODE", "IP", "AGE"] and "STRATEGY" in wide
    # status is a subresource: a write to the main resource does not change it
    crd.patch("vm", "web", {"status": {"printableStatus": "Running"}}, namespace=ns)
    assert "status" not in crd.kubectl_json("get", "vm", "web", "-n", ns) or (
        crd.kubectl_json("get", "vm", "web", "-n", ns)["status"].get("printableStatus") != "Running"
    )
    status = {"status": {"printableStatus": "Running", "nodeName": "n1", "ipAddresses": ["10.0.0.9"]}}
    crd.patch("vm", "web", status, namespace=ns, subresource="status")
    row = crd.kubectl("get", "vm", "web", "-n", ns, "--no-headers").stdout.split()
    assert row[:4] == ["web", "Running", "n1", "10.0.0.9"]


# ------------------------------------------------------------------ limits (server-side dry runs)
def dry_run(cluster, ns: str, spec: dict, name: str = "t"):
    body = {
        "apiVersion": "edgevirt.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name},
        "spec": spec,
    }
    return cluster.kubectl(
        "create", "-n", ns, "--dry-run=server", "-f", "-", input=json.dumps(body), check=False
    )


def with_volume(**source) -> dict:
    return {"image": "x", "volumes": [{"name": "v", **source}]}


HEX = "0123456789abcdef" * 4
IMAGE_FIX = "must be a registry reference"


@pytest.mark.parametrize(
    ("spec", "field", "needle"),
    [
        # spec.image and volumes[].image: a registry reference, file:///..., https://...#sha256=
        ({"image": "oci:/var/lib/layout:disk"}, "spec.image", IMAGE_FIX),
        ({"image": "oci-archive:/tmp/disk.tar"}, "spec.image", IMAGE_FIX),
        ({"image": "dir:/etc"}, "spec.image", IMAGE_FIX),
        ({"image": "docker-archive:/tmp/d.tar"}, "spec.image", IMAGE_FIX),
        ({"image": f"http://example.com/d.img#sha256={HEX}"}, "spec.image", IMAGE_FIX),
        ({"image": "https://example.com/d.img"}, "spec.image", IMAGE_FIX),
        ({"image": "https://example.com/d.img#sha256=abc"}, "spec.image", IMAGE_FIX),
        ({"image": "file://host/d.img"}, "spec.image", IMAGE_FIX),
        ({"image": "file:///var/lib/images/../../etc/shadow"}, "spec.image", "'..' segment"),
        ({"image": "registry/Upper Case:1"}, "spec.image", IMAGE_FIX),
        (with_volume(image="oci:/layout"), "spec.volumes[0].image", IMAGE_FIX),
        (with_volume(image="file:///a/../b"), "spec.volumes[0].image", "'..' segment"),
        # at most 16 volumes
        (
            {
                "image": "x",
                "volumes": [{"name": f"v{i}", "emptyDisk": {"capacity": "1Mi"}} for i in range(17)],
            },
            "spec.volumes",
            "must have at most 16 items",
        ),
        # capacities up to 1Ti
        (
            with_volume(emptyDisk={"capacity": "1025Gi"}),
            "spec.volumes[0].emptyDisk.capacity",
            "from 1Mi to 1Ti",
        ),
        (
            with_volume(hostDisk={"path": "a.img", "type": "DiskOrCreate", "capacity": "2Ti"}),
            "spec.volumes[0].hostDisk.capacity",
            "from 1Mi to 1Ti",
        ),
        # hostDisk.path relative to the namespace's folder
        (
            with_volume(hostDisk={"path": "/var/lib/edgevirt/hostdisks/a.img"}),
            "spec.volumes[0].hostDisk.path",
            "leading '/'",
        ),
        (
            with_volume(hostDisk={"path": "data/../../other-ns/a.img"}),
            "spec.volumes[0].hostDisk.path",
            "'..' segment",
        ),
        (with_volume(hostDisk={"path": ".."}), "spec.volumes[0].hostDisk.path", "'..' segment"),
        (with_volume(hostDisk={"path": "data//a.img"}), "spec.volumes[0].hostDisk.path", "'//'"),
        (with_volume(hostDisk={"path": "a\nb.img"}), "spec.volumes[0].hostDisk.path", "printable ASCII"),
        # names: DNS labels
        ({"image": "x", "networks": [{"name": "Pod_Net"}]}, "spec.networks[0].name", "DNS label"),
        # cloud-init: a Secret, or inline non-secret data, never both
        (
            {"image": "x", "cloudInit": {"userData": "#cloud-config", "userDataSecretRef": {"name": "s"}}},
            "spec.cloudInit.userDataSecretRef",
            "mutually exclusive",
        ),
        (
            {"image": "x", "cloudInit": {"userDataSecretRef": {"name": "Not_A_Name"}}},
            "spec.cloudInit.userDataSecretRef.name",
            "Secret name",
        ),
        (
            {"image": "x", "cloudInit": {"userDataSecretRef": {}}},
            "spec.cloudInit.userDataSecretRef.name",
            "Required value",
        ),
    ],
)
def test_limits_are_refused_naming_the_field_and_the_fix(crd, ns, spec, field, needle):
    r = dry_run(crd, ns, spec)
    assert r.returncode != 0, f"accepted: {spec}"
    assert field in r.stderr and needle in r.stderr, r.stderr


def test_a_vm_name_must_be_a_dns_label(crd, ns):
    r = dry_run(crd, ns, {"image": "x"}, name="web.example")
    assert r.returncode != 0 and "metadata.name must be a DNS label" in r.stderr


@pytest.mark.parametrize(
    "spec",
    [
        {"image": "127.0.0.1:5000/vm/test-disk:1"},
        {"image": "docker://127.0.0.1:5000/vm/test-disk:1"},
        {"image": f"quay.io/containerdisks/fedora@sha256:{HEX}"},
        {"image": "localhost/disk"},
        {"image": "file:///var/lib/edgevirt/images/a.qcow2"},
        {"image": f"https://example.com:8443/images/a.img?x=1#sha256={HEX.upper()}"},
        with_volume(image=f"https://example.com/b.img#sha256={HEX}"),
        with_volume(emptyDisk={"capacity": "1Ti"}),
        with_volume(hostDisk={"path": "a.img"}),
        with_volume(hostDisk={"path": "team data/v1/a.img", "type": "DiskOrCreate", "capacity": "1Ti"}),
        {"image": "x", "volumes": [{"name": f"v{i}", "emptyDisk": {"capacity": "1Mi"}} for i in range(16)]},
        {"image": "x", "networks": [{"name": "default"}]},
        {"image": "x", "cloudInit": {"userDataSecretRef": {"name": "web-init.v2"}}},
    ],
)
def test_what_the_limits_allow_is_accepted(crd, ns, spec):
    r = dry_run(crd, ns, spec)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ probes (carried onto the VM pod)
EXEC_PROBE = {"exec": {"command": ["sh", "-c", "test -e /run/ready"]}, "periodSeconds": 5}


@pytest.mark.parametrize(
    ("probe", "kind", "needle"),
    [
        ({"periodSeconds": 5}, "readinessProbe", "needs exactly one handler: exec"),
        ({**EXEC_PROBE, "tcpSocket": {"port": 22}}, "readinessProbe", "needs exactly one handler: exec"),
        ({"exec": {"command": []}}, "livenessProbe", "spec.livenessProbe.exec.command"),
        ({"tcpSocket": {"port": 0}}, "readinessProbe", "spec.readinessProbe.tcpSocket.port"),
        ({**EXEC_PROBE, "successThreshold": 2}, "livenessProbe", "livenessProbe.successThreshold must be 1"),
        ({**EXEC_PROBE, "timeoutSeconds": 0}, "livenessProbe", "spec.livenessProbe.timeoutSeconds"),
    ],
)
def test_bad_probes_are_refused_naming_the_field(crd, ns, probe, kind, needle):
    r = dry_run(crd, ns, {"image": "x", kind: probe})
    assert r.returncode != 0 and needle in r.stderr, r.stderr


def test_exec_and_tcp_probes_are_accepted_and_explained(crd, ns):
    spec = {
        "image": "x",
        "readinessProbe": {**EXEC_PROBE, "successThreshold": 2, "initialDelaySeconds": 10},
        "livenessProbe": {"tcpSocket": {"port": 22}, "failureThreshold": 5, "timeoutSeconds": 2},
    }
    r = dry_run(crd, ns, spec)
    assert r.returncode == 0, r.stderr
    out = " ".join(crd.kubectl("explain", "vm.spec.livenessProbe").stdout.split())
    assert "guest agent" in out and "macvtap" in out
