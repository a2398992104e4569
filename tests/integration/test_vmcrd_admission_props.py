"""Property checks of the CRD against the real API server (server-side dry run, nothing stored):
what the schema accepts and what it refuses agrees with the controller's own understanding."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmcrd import api

pytestmark = pytest.mark.cluster

SETTINGS = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

names = st.from_regex(r"[a-z]([-a-z0-9]{0,10}[a-z0-9])?", fullmatch=True)
sources = st.sampled_from(
    [
        {"emptyDisk": {"capacity": "64Mi"}},
        {"image": "127.0.0.1:5000/vm/data:1"},
        {"hostDisk": {"path": "d.img"}},
        {
            "hostDisk": {
                "path": "team/n.img",
                "type": "DiskOrCreate",
                "capacity": "1Gi",
            }
        },
    ]
)
volume = st.builds(
    lambda n, hot, src, bus, ro: {"name": n, "hotpluggable": hot, **src, "bus": bus, "readOnly": ro},
    names,
    st.booleans(),
    sources,
    st.sampled_from(["virtio", "scsi"]),
    st.booleans(),
)
valid_specs = st.fixed_dictionaries(
    {"image": st.sampled_from(["127.0.0.1:5000/vm/alpine-disk:3.20", "file:///var/lib/img/a.qcow2"])},
    optional={
        "cpu": st.integers(1, 64),
        "memory": st.sampled_from(["32Mi", "256Mi", "1Gi", "1500M", "2Gi"]),
        "paused": st.booleans(),
        "nodeName": names,
        "volumes": st.lists(volume, max_size=5, unique_by=lambda v: v["name"]),
        "networks": st.just([{"name": "default", "mac": "02:00:00:00:00:01"}]),
        "cloudInit": st.fixed_dictionaries({"userData": st.text(max_size=100)}),
    },
).flatmap(
    lambda spec: st.sampled_from(
        [{"running": True}, {"running": False}, *({"runStrategy": s} for s in api.STRATEGIES), {}]
    ).map(lambda run: {**spec, **run})
)


@pytest.fixture(scope="module")
def ns(cluster):
    cluster.install_vm_crd()
    with cluster.namespace("vmcrd-props") as name:
        yield name


def dry_run(cluster, ns: str, spec: dict):
    body = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "p"}, "spec": spec}
    return cluster.kubectl(
        "create", "-n", ns, "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(body), check=False
    )


@SETTINGS
@given(spec=valid_specs)
def test_every_well_formed_spec_is_accepted_and_keeps_its_run_strategy(cluster, ns, spec):
    r = dry_run(cluster, ns, spec)
    assert r.returncode == 0, (spec, r.stderr)
    stored = json.loads(r.stdout)["spec"]
    assert api.run_strategy(stored) == api.run_strategy(spec)
    assert [v["name"] for v in stored.get("volumes", [])] == [v["name"] for v in spec.get("volumes", [])]


@SETTINGS
@given(spec=valid_specs, strategy=st.sampled_from(api.STRATEGIES), running=st.booleans())
def test_running_with_run_strategy_is_always_refused(cluster, ns, spec, strategy, running):
    spec = {**spec, "running": running, "runStrategy": strategy}
    r = dry_run(cluster, ns, spec)
    assert r.returncode != 0 and "mutually exclusive" in r.stderr


escaping_paths = st.one_of(
    st.from_regex(r"/(etc|root|var/lib/edgevirt/hostdisks/other|tmp)/[a-z]{1,8}", fullmatch=True),
    st.from_regex(r"([a-z]{1,4}/){0,2}\.\.(/[a-z.]{1,8}){0,2}", fullmatch=True),
)


@SETTINGS
@given(spec=valid_specs, path=escaping_paths)
def test_host_disks_leaving_the_namespace_folder_are_always_refused(cluster, ns, spec, path):
    """hostDisk.path is relative to the VM namespace's folder: an absolute path or a '..' segment
    would name a file outside it."""
    spec = {**spec, "volumes": [{"name": "h", "hostDisk": {"path": path}}]}
    r = dry_run(cluster, ns, spec)
    assert r.returncode != 0 and "spec.volumes[0].hostDisk.path" in r.stderr
