"""VM pod derivation (vmcrd.podspec) and status derivation (vmcrd.status), property-based."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cri_shim.kvm import contract
from vmcrd import api, podspec, status

names = st.from_regex(r"[a-z]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(lambda b: ":".join(f"{x:02x}" for x in b))
volume = st.builds(
    lambda name, hot, src, bus: {"name": name, "hotpluggable": hot, **src, "bus": bus},
    names,
    st.booleans(),
    st.sampled_from(
        [
            {"emptyDisk": {"capacity": "1Gi"}},
            {"image": "127.0.0.1:5000/vm/data:1"},
            {"hostDisk": {"path": "disks/a.img", "type": "Disk"}},
        ]
    ),
    st.sampled_from(["virtio", "scsi"]),
)
specs = st.fixed_dictionaries(
    {
        "cpu": st.integers(1, 64),
        "memory": st.sampled_from(["64Mi", "256Mi", "1Gi", "1500M"]),
        "image": st.sampled_from(
            [
                "127.0.0.1:5000/vm/alpine-disk:3.20",
                "file:///var/lib/images/a.qcow2",
                "https://x/y.img#sha256=ab",
            ]
        ),
    },
    optional={
        "running": st.booleans(),
        "nodeName": names,
        "networks": st.lists(st.fixed_dictionaries({"name": st.just("default"), "mac": macs}), max_size=1),
        "cloudInit": st.one_of(
            st.fixed_dictionaries({"userData": st.text(max_size=200)}),
            st.fixed_dictionaries({"userDataSecretRef": st.fixed_dictionaries({"name": names})}),
        ),
        "kernelBoot": st.fixed_dictionaries(
            {"kernel": st.just("/boot/vmlinuz"), "cmdline": st.text(max_size=30)}
        ),
        "volumes": st.lists(volume, max_size=4, unique_by=lambda v: v["name"]),
        "paused": st.booleans(),
        "readinessProbe": st.just({"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 2}),
        "livenessProbe": st.just({"tcpSocket": {"port": 22}, "failureThreshold": 3, "timeoutSeconds": 1}),
    },
)


def make_vm(spec: dict, name: str = "web", uid: str = "11111111-2222-3333-4444-555555555555") -> dict:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": "ns1", "uid": uid, "generation": 3},
        "spec": spec,
    }


@given(specs, names, st.one_of(st.none(), names))
def test_pod_carries_the_contract(spec, name, node):
    vm = make_vm(spec, name)
    pod = podspec.build_pod(vm, node)
    m, ps = pod["metadata"], pod["spec"]
    assert m["name"] == f"{name}-vm" and m["namespace"] == "ns1"
    (ref,) = m["ownerReferences"]
    assert ref["uid"] == vm["metadata"]["uid"] and ref["controller"] and ref["kind"] == "VirtualMachine"
    assert ps["runtimeClassName"] == "kvm" and ps["restartPolicy"] == api.restart_policy(spec)
    (c,) = ps["containers"]
    assert c["resources"]["limits"] == {"cpu": str(spec["cpu"]), "memory": spec["memory"]}
    want_cpu = f"{max(1, int(float(spec['cpu']) * 1000) // podspec.CPU_ALLOCATION_RATIO)}m"
    assert c["resources"]["requests"] == {"cpu": want_cpu, "memory": spec["memory"]}
    ann = m["annotations"]
    assert ann[podspec.ANN_VM_UID] == vm["metadata"]["uid"]
    assert ann[podspec.ANN_IMAGE] == spec["image"]
    assert json.loads(ann[podspec.ANN_VOLUMES]) == spec.get("volumes", [])
    assert c["image"] == (spec["image"] if spec["image"].startswith("127.") else podspec.PLACEHOLDER_IMAGE)
    if spec.get("networks"):
        assert ann[podspec.ANN_MAC] == spec["networks"][0]["mac"]
    else:
        assert podspec.ANN_MAC not in ann
    if (spec.get("cloudInit") or {}).get("userData"):
        assert ann[podspec.ANN_CLOUD_INIT_USER_DATA] == spec["cloudInit"]["userData"]
    else:
        assert podspec.ANN_CLOUD_INIT_USER_DATA not in ann
    if spec.get("kernelBoot"):
        assert json.loads(ann[podspec.ANN_KERNEL_BOOT]) == spec["kernelBoot"]
    assert_cloud_init_secret(spec, ps)
    assert_admissible(pod, name)
    for probe in ("readinessProbe", "livenessProbe"):
        assert c.get(probe) == spec.get(probe)  # carried as they are, absent when the VM has none
    terms = (
        (ps.get("affinity") or {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution")
    )
    if node:
        assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == [node]
    else:
        assert terms is None
    assert all(v is None or isinstance(v, str) for v in ann.values())
    assert podspec.build_pod(vm, node) == pod  # deterministic: a restarted controller builds the same pod


def assert_cloud_init_secret(spec: dict, ps: dict) -> None:
    """A userDataSecretRef is a Secret volume mounted read-only at the contract's path, never copied."""
    (c,) = ps["containers"]
    ref = (spec.get("cloudInit") or {}).get("userDataSecretRef")
    if not ref:
        assert "volumes" not in ps and "volumeMounts" not in c
        return
    (vol,) = ps["volumes"]
    assert vol == {
        "name": "cloud-init",
        "secret": {
            "secretName": ref["name"],
            "items": [{"key": "userdata", "path": "userdata"}],
            "defaultMode": 0o400,
        },
    }
    assert c["volumeMounts"] == [
        {"name": "cloud-init", "mountPath": contract.CLOUD_INIT_SECRET_PATH, "readOnly": True}
    ]
    assert contract.CLOUD_INIT_SECRET_PATH == "/run/edgevirt/cloud-init"
    assert contract.CLOUD_INIT_SECRET_KEY == "userdata"


def assert_admissible(pod: dict, name: str) -> None:
    """What the admission policy edgevirt-controller-vm-pods-only lets the controller create (the
    policy itself is exercised in tests/integration/test_vmcrd_policies.py)."""
    m, ps = pod["metadata"], pod["spec"]
    (ref,) = [r for r in m["ownerReferences"] if r.get("controller")]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("edgevirt.io/v1alpha1", "VirtualMachine", name)
    assert m["labels"][podspec.LABEL_VM] == name and ps["runtimeClassName"] == "kvm"
    assert ps["automountServiceAccountToken"] is False
    assert not any(ps.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("secret" in v for v in ps.get("volumes", []))
    assert all("securityContext" not in c for c in ps["containers"])


def test_a_changed_secret_reference_changes_the_spec_hash():
    spec = {"image": "x", "cloudInit": {"userDataSecretRef": {"name": "a"}}}
    other = {"image": "x", "cloudInit": {"userDataSecretRef": {"name": "b"}}}
    assert podspec.spec_hash(spec) != podspec.spec_hash(other)
    assert podspec.spec_hash(spec) != podspec.spec_hash({"image": "x"})
    # the Secret's name only: the pod has no annotation with user data in it
    ann = podspec.build_pod(make_vm(spec), None)["metadata"]["annotations"]
    assert podspec.ANN_CLOUD_INIT_USER_DATA not in ann


@given(st.one_of(st.none(), st.integers(min_value=-5, max_value=3600)))
def test_the_pod_grace_period_is_the_vms_never_zero_and_not_a_boot_field(grace):
    spec = {"image": "x"} if grace is None else {"image": "x", "terminationGracePeriodSeconds": grace}
    got = podspec.build_pod(make_vm(spec), None)["spec"]["terminationGracePeriodSeconds"]
    assert got == (podspec.GRACE_PERIOD_SECONDS if grace is None else max(1, grace)) >= 1
    assert podspec.grace_period(spec) == got
    assert podspec.spec_hash(spec) == podspec.spec_hash({"image": "x"})  # a change needs no restart


@given(specs, st.booleans(), st.booleans())
def test_spec_hash_ignores_run_state_pause_and_hotplug(spec, running, paused):
    h = podspec.spec_hash(spec)
    other = {**spec, "running": running, "paused": paused}
    other["volumes"] = [
        *spec.get("volumes", []),
        {"name": "zz-hot", "hotpluggable": True, "emptyDisk": {"capacity": "1Gi"}},
    ]
    assert podspec.spec_hash(other) == h


@given(specs, st.sampled_from(["cpu", "memory", "image", "kernelBoot", "cloudInit", "nodeName", "cold"]))
def test_spec_hash_changes_with_boot_fields(spec, field):
    changed = dict(spec)
    if field == "cpu":
        changed["cpu"] = spec["cpu"] + 1
    elif field == "memory":
        changed["memory"] = spec["memory"] + "0"
    elif field == "image":
        changed["image"] = spec["image"] + "x"
    elif field == "kernelBoot":
        changed["kernelBoot"] = {"kernel": "/other"}
    elif field == "cloudInit":
        changed["cloudInit"] = {"userData": (spec.get("cloudInit") or {}).get("userData", "") + "x"}
    elif field == "nodeName":
        changed["nodeName"] = (spec.get("nodeName") or "") + "x"
    else:
        changed["volumes"] = [*spec.get("volumes", []), {"name": "zz-cold", "emptyDisk": {"capacity": "1Gi"}}]
    assert podspec.spec_hash(changed) != podspec.spec_hash(spec)


def test_probes_carry_only_a_handler_and_timing_and_are_boot_fields_when_present():
    probe = {
        "exec": {"command": ["sh", "-c", "test -e /run/ready"]},
        "initialDelaySeconds": 5,
        "periodSeconds": 3,
        "timeoutSeconds": 2,
        "successThreshold": 1,
        "failureThreshold": 4,
        "terminationGracePeriodSeconds": 1,  # not a VM probe field: dropped
        "httpGet": {"port": 80},  # the CRD refuses it; never carried either
    }
    spec = {"image": "x", "readinessProbe": probe, "livenessProbe": {"tcpSocket": {"port": 22}}}
    (c,) = podspec.build_pod(make_vm(spec), None)["spec"]["containers"]
    assert c["readinessProbe"] == {k: v for k, v in probe.items() if k in podspec.PROBE_KEYS}
    assert "httpGet" not in c["readinessProbe"] and c["livenessProbe"] == {"tcpSocket": {"port": 22}}
    # a VM without probes hashes as before probes existed (no RestartRequired after an upgrade) ...
    plain = {"image": "x", "cpu": 2}
    assert not set(podspec.boot_spec(plain)) & set(podspec.PROBES)
    # ... a probe added or changed needs a restart (a pod's probes cannot change)
    h = podspec.spec_hash(plain)
    with_probe = {**plain, "livenessProbe": {"exec": {"command": ["true"]}}}
    assert podspec.spec_hash(with_probe) != h
    changed = {**plain, "livenessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 9}}
    assert podspec.spec_hash(changed) != podspec.spec_hash(with_probe)


def test_oci_reference_detection():
    assert podspec.is_oci_ref("127.0.0.1:5000/vm/alpine-disk:3.20")
    assert podspec.is_oci_ref("busybox")
    assert not podspec.is_oci_ref("file:///x.qcow2")
    assert not podspec.is_oci_ref("https://example/x.img#sha256=00")
    assert not podspec.is_oci_ref("")


def pod(phase: str = "Pending", **extra) -> dict:
    """A VM pod bound to n1, as the controller makes them now (with the node-loss tolerations)."""
    p = {
        "metadata": {"name": "web-vm", "annotations": {}},
        "spec": {"nodeName": "n1", "tolerations": [dict(t) for t in podspec.TOLERATIONS]},
        "status": {"phase": phase},
    }
    p["status"].update(extra)
    return p


def cond(st_: dict, t: str) -> dict:
    return next(c for c in st_["conditions"] if c["type"] == t)


def test_status_running_ready_paused_and_ips():
    vm = make_vm({"running": True, "image": "x", "cpu": 1, "memory": "64Mi"})
    ready = pod("Running", conditions=[{"type": "Ready", "status": "True"}], podIPs=[{"ip": "10.0.0.5"}])
    ready["metadata"]["annotations"][podspec.ANN_SPEC_HASH] = podspec.spec_hash(vm["spec"])
    s = status.compute(vm, ready)
    assert s["printableStatus"] == "Running" and s["ipAddresses"] == ["10.0.0.5"] and s["nodeName"] == "n1"
    assert cond(s, "Ready")["status"] == "True" and cond(s, "RestartRequired")["status"] == "False"
    assert all(c["observedGeneration"] == 3 for c in s["conditions"])
    vm["status"] = {**s, "domainState": "Paused"}
    s2 = status.compute(vm, ready)
    assert s2["printableStatus"] == "Paused" and cond(s2, "Paused")["status"] == "True"
    assert cond(s2, "Ready")["status"] == "False"
    assert cond(s2, "Failure")["lastTransitionTime"] == cond(s, "Failure")["lastTransitionTime"]


def test_a_running_guest_whose_pod_lost_readiness_stays_running_and_can_show_paused():
    """After an API server outage the node lifecycle controller marks the node's pods NotReady; the
    guest runs on, so the VM stays Running (and Paused when suspended); only Ready follows the pod."""
    vm = make_vm({"running": True, "image": "x"})
    p = pod(
        "Running",
        conditions=[{"type": "Ready", "status": "False"}],
        containerStatuses=[{"name": "vm", "ready": False, "state": {"running": {"startedAt": "x"}}}],
    )
    s = status.compute(vm, p)
    assert s["printableStatus"] == "Running"
    assert cond(s, "Ready")["status"] == "False" and cond(s, "Ready")["reason"] == "PodNotReady"
    vm["status"] = {**s, "domainState": "Paused"}
    assert status.compute(vm, p)["printableStatus"] == "Paused"
    # a started pod whose container is not running yet is still Starting
    waiting = pod("Running", containerStatuses=[{"name": "vm", "state": {"waiting": {"reason": "x"}}}])
    assert status.compute(make_vm({"running": True, "image": "x"}), waiting)["printableStatus"] == "Starting"


def test_status_failures_name_the_cause():
    vm = make_vm({"running": True, "image": "x"})
    unsched = pod(
        conditions=[
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}
        ]
    )
    s = status.compute(vm, unsched)
    assert s["printableStatus"] == "Unschedulable" and cond(s, "Failure")["message"] == "0/1 nodes"
    img = pod(
        containerStatuses=[{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]
    )
    assert status.compute(vm, img)["printableStatus"] == "ErrorImage"
    assert status.compute(vm, pod("Failed", message="oom"))["printableStatus"] == "Failed"
    assert status.compute(vm, pod("Succeeded"))["printableStatus"] == "Stopped"
    assert status.compute(vm, None, "RuntimeClass missing")["printableStatus"] == "Failed"


@given(st.booleans(), st.sampled_from(api.STRATEGIES))
def test_status_without_pod_is_starting_or_stopped(running, strategy):
    vm = make_vm({"runStrategy": strategy, "image": "x"})
    s = status.compute(vm, None)
    assert s["printableStatus"] == (
        "Starting" if strategy in ("Always", "RerunOnFailure", "Once") else "Stopped"
    )
    assert s["podName"] is None and s["ipAddresses"] == []


def test_restart_required_when_boot_spec_changed():
    vm = make_vm({"running": True, "image": "x", "cpu": 1})
    p = pod("Running", conditions=[{"type": "Ready", "status": "True"}])
    p["metadata"]["annotations"][podspec.ANN_SPEC_HASH] = podspec.spec_hash(vm["spec"])
    assert not status.restart_required(vm, p)
    vm["spec"]["cpu"] = 2
    assert status.restart_required(vm, p)
    assert cond(status.compute(vm, p), "RestartRequired")["reason"] == "BootSpecChanged"


@given(specs, names)
def test_the_shim_reads_back_what_the_controller_wrote(spec, name):
    vm = make_vm(spec, name)
    got = contract.parse_pod_annotations(podspec.build_pod(vm, None)["metadata"]["annotations"])
    assert got is not None
    assert (got.vm_uid, got.vm_name, got.image) == (vm["metadata"]["uid"], name, spec["image"])
    assert got.mac == (spec["networks"][0]["mac"] if spec.get("networks") else None)
    assert got.user_data == ((spec.get("cloudInit") or {}).get("userData") or None)
    assert got.kernel_boot == spec.get("kernelBoot")
    assert list(got.volumes) == spec.get("volumes", [])


def test_contract_reader_refuses_malformed_annotations_naming_them():
    assert contract.parse_pod_annotations({"io.kubernetes.pod.name": "x"}) is None  # not a VM pod
    base = {contract.ANN_VM_UID: "u1", contract.ANN_IMAGE: "img"}
    with pytest.raises(contract.ContractError, match=re.escape("edgevirt.io/image")):
        contract.parse_pod_annotations({contract.ANN_VM_UID: "u1"})
    with pytest.raises(contract.ContractError, match=re.escape("edgevirt.io/volumes: not JSON")):
        contract.parse_pod_annotations({**base, contract.ANN_VOLUMES: "[{"})
    with pytest.raises(contract.ContractError, match=re.escape("edgevirt.io/volumes: needs a JSON list")):
        contract.parse_pod_annotations({**base, contract.ANN_VOLUMES: '[{"bus": "virtio"}]'})
    with pytest.raises(contract.ContractError, match=re.escape("edgevirt.io/kernel-boot")):
        contract.parse_pod_annotations({**base, contract.ANN_KERNEL_BOOT: '{"cmdline": "x"}'})
    assert contract.parse_pod_annotations(base).volumes == ()


@pytest.mark.parametrize(
    ("spec", "policy"),
    [
        ({"running": True}, "Always"),
        ({"running": False}, "Never"),
        ({"runStrategy": "Always"}, "Always"),
        ({"runStrategy": "RerunOnFailure"}, "OnFailure"),
        ({"runStrategy": "Manual"}, "Never"),
        ({"runStrategy": "Once"}, "Never"),
        ({"runStrategy": "Halted"}, "Never"),
    ],
)
def test_kubelet_restarts_what_the_run_strategy_promises_without_the_api_server(spec, policy):
    vm = make_vm({"image": "127.0.0.1:5000/vm/d:1", **spec}, "web")
    assert podspec.build_pod(vm, None)["spec"]["restartPolicy"] == policy


def test_a_run_strategy_change_while_running_asks_for_a_restart_and_restarts_are_reported():
    vm = make_vm({"image": "127.0.0.1:5000/vm/d:1", "runStrategy": "Always"}, "web")
    p = podspec.build_pod(vm, None)
    p["spec"]["nodeName"] = "n1"
    p["status"] = {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": podspec.CONTAINER_NAME,
                "state": {"running": {}},
                "restartCount": 3,
                "lastState": {"terminated": {"reason": "Error", "exitCode": 137, "finishedAt": "t"}},
            }
        ],
    }
    out = status.compute(vm, p)
    assert out["restartCount"] == 3 and out["lastTermination"] == {
        "reason": "Error",
        "exitCode": 137,
        "finishedAt": "t",
    }
    assert status.restart_required(vm, p) == ""
    vm["spec"]["runStrategy"] = "Manual"  # the pod still restarts by Always
    assert status.restart_required(vm, p) == "RunStrategyChanged"
    assert cond(status.compute(vm, p), "RestartRequired")["reason"] == "RunStrategyChanged"
    # with no pod the last figures stay visible
    vm["status"] = status.compute(vm, p)
    gone = status.compute(vm, None)
    assert gone["restartCount"] == 3 and gone["lastTermination"]["exitCode"] == 137
