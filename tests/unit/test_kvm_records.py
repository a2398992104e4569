"""The kvm handler's records: typed records round-trip through their JSON files, a reload resolves
unique prefixes, temporary files of a kill -9 are dropped, and a record written before the parsed
contract was kept gets it from its annotations."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cri_shim.kvm.contract import ANN_IMAGE, ANN_VM_UID, ANN_VOLUMES, PodContract, parse_pod_contract
from cri_shim.kvm.records import (
    ContainerMetadata,
    ContainerRecord,
    PodMetadata,
    SandboxRecord,
    container_store,
    sandbox_store,
)

A, B = "ab" + "0" * 62, "ac" + "0" * 62
ANN = {ANN_VM_UID: "vm-1", ANN_IMAGE: "img", ANN_VOLUMES: '[{"name": "d", "emptyDisk": {"capacity": "1Mi"}}]'}


def sandbox(id_: str = A) -> SandboxRecord:
    return SandboxRecord(
        id=id_,
        metadata=PodMetadata("web", "ns", "u1", 1),
        netns="cni-kvm-" + id_[:12],
        created_at=12,
        contract=parse_pod_contract(ANN),
        phase="ready",
        state="READY",
        labels={"l": "1"},
        annotations=ANN,
        mac="02:00:00:00:00:01",
        network_added=True,
        cni_result={"ips": [{"address": "10.0.0.2/24"}]},
    )


def test_records_survive_a_reload_and_resolve_unique_prefixes(tmp_path):
    r = sandbox_store(tmp_path)
    r.put(sandbox(A))
    r.put(sandbox(B))
    (r.dir / ".tmp-left-by-kill").write_text("{")
    again = sandbox_store(tmp_path)
    assert again.get(A) == sandbox(A)  # every field, the parsed contract included
    assert again.resolve("ab") == sandbox(A)
    assert again.resolve("a") is None  # ambiguous
    assert not (r.dir / ".tmp-left-by-kill").exists()
    again.update(B, lambda sb: dataclasses.replace(sb, state="NOTREADY"))
    again.delete(A)
    assert {x.id: x.state for x in sandbox_store(tmp_path).all()} == {B: "NOTREADY"}
    with pytest.raises(ValueError):
        again.put(dataclasses.replace(sandbox(), id="../x"))
    with pytest.raises(KeyError):
        again.update(A, lambda sb: sb)


def test_container_records_round_trip_and_say_their_state(tmp_path):
    c = ContainerRecord(
        id=A,
        sandbox_id=B,
        metadata=ContainerMetadata("vm", 0),
        image="img",
        image_spec="img",
        domain="edgevirt-" + A[:20],
        created_at=1,
    )
    assert c.state == "CREATED"
    started = dataclasses.replace(c, phase="created", console_source="/c.log", started_at=2)
    assert started.state == "RUNNING"
    ended = started.ended(3, 137, "DomainGone", "gone")
    assert (ended.state, ended.exit_code, ended.finished_at) == ("EXITED", 137, 3)
    container_store(tmp_path).put(ended)
    assert container_store(tmp_path).get(A) == ended


def test_a_record_from_before_the_parsed_contract_is_read_from_its_annotations(tmp_path):
    old = {
        "id": A,
        "phase": "ready",
        "metadata": {"name": "web", "namespace": "ns", "uid": "u1", "attempt": 0},
        "labels": {},
        "annotations": ANN,
        "log_directory": "/var/log/pods/x",
        "hostname": "",
        "created_at": 5,
        "netns": "cni-kvm-" + A[:12],
        "mac": "02:00:00:00:00:01",
        "vm_uid": "vm-1",
        "network_added": True,
        "cni_result": None,
        "state": "READY",
    }
    (tmp_path / "sandboxes").mkdir()
    (tmp_path / "sandboxes" / f"{A}.json").write_text(json.dumps(old))
    sb = sandbox_store(tmp_path).get(A)
    assert sb is not None and sb.contract == parse_pod_contract(ANN)
    assert sb.contract.vm is not None and sb.contract.vm.volumes[0]["name"] == "d"
    assert (sb.log_directory, sb.mac, sb.network_added) == ("/var/log/pods/x", "02:00:00:00:00:01", True)
    assert sandbox_store(tmp_path).get(A) == sb
    # a plain kvm pod's record: no VM
    (tmp_path / "sandboxes" / f"{B}.json").write_text(json.dumps({**old, "id": B, "annotations": {}}))
    assert sandbox_store(tmp_path).get(B).contract == PodContract()
