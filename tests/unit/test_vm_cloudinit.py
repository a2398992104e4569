"""cloud-init NoCloud: network-config v2 from CNI results (1.x / 0.4.0 / 0.3.x shapes) and the seed ISO."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from cri_shim.vm import CloudInit, ValidationError, network_config_from_cni
from cri_shim.vm.cloudinit import make_seed_iso, render

MAC = "02:00:00:00:00:01"
CNI_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "vm0", "mac": "aa:bb:cc:dd:ee:ff"},
        {"name": "eth0", "mac": MAC, "sandbox": "/var/run/netns/pod"},
    ],
    "ips": [{"address": "10.88.0.17/24", "gateway": "10.88.0.1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.96.0.0/12", "gw": "10.88.0.254"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
}


def test_cni_1_0_result_bound_to_mac():
    nc = network_config_from_cni(CNI_1_0, [MAC.upper()])
    assert nc == {
        "version": 2,
        "ethernets": {
            "eth0": {
                "match": {"macaddress": MAC},
                "set-name": "eth0",
                "dhcp4": False,
                "dhcp6": False,
                "addresses": ["10.88.0.17/24"],
                "routes": [
                    {"to": "0.0.0.0/0", "via": "10.88.0.1"},
                    {"to": "10.96.0.0/12", "via": "10.88.0.254"},
                ],
                "nameservers": {"addresses": ["10.96.0.10"], "search": ["default.svc.cluster.local"]},
            }
        },
    }


def test_cni_0_3_result_without_interfaces_gets_default_route():
    res = {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.1.2.3/16", "gateway": "10.1.0.1"}]}
    eth = network_config_from_cni(res, [MAC])["ethernets"]["eth0"]
    assert eth["addresses"] == ["10.1.2.3/16"]
    assert eth["routes"] == [{"to": "0.0.0.0/0", "via": "10.1.0.1"}]
    assert "nameservers" not in eth


def test_two_nics_matched_by_mac():
    mac2 = "02:00:00:00:00:02"
    res = {
        "interfaces": [
            {"name": "net1", "mac": mac2, "sandbox": "x"},
            {"name": "eth0", "mac": MAC, "sandbox": "x"},
        ],
        "ips": [
            {"address": "10.0.1.5/24", "interface": 0},
            {"address": "10.0.0.5/24", "gateway": "10.0.0.1", "interface": 1},
        ],
    }
    eths = network_config_from_cni(res, [MAC, mac2])["ethernets"]
    assert eths["eth0"]["addresses"] == ["10.0.0.5/24"]
    assert eths["eth1"]["addresses"] == ["10.0.1.5/24"]
    assert eths["eth1"]["match"] == {"macaddress": mac2}


@pytest.mark.parametrize(
    ("res", "macs", "field"),
    [
        ([], [MAC], "cniResult"),
        ({"ips": [{"address": "10.0.0.1"}]}, [MAC], "cniResult.ips[0].address"),
        ({"ips": [{"address": "banana"}]}, [MAC], "cniResult.ips[0].address"),
        ({"ips": [{"address": "10.0.0.2/24", "gateway": "x"}]}, [MAC], "cniResult.ips[0].gateway"),
        ({"routes": [{"gw": "10.0.0.1"}]}, [MAC], "cniResult.routes[0].dst"),
        ({}, ["nope"], "networks[0].mac"),
    ],
)
def test_bad_cni_results_name_the_field(res, macs, field):
    with pytest.raises(ValidationError) as ei:
        network_config_from_cni(res, macs)
    assert ei.value.field == field


def test_render_files_and_limits():
    files = render(CloudInit(instance_id="uid-1", hostname="web", network_config={"version": 2}))
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "uid-1", "local-hostname": "web"}
    assert yaml.safe_load(files["network-config"]) == {"version": 2}
    assert files["user-data"].startswith("#cloud-config")
    hostile = CloudInit(instance_id="a\ninstance-id: evil", hostname="x: y")
    meta = yaml.safe_load(render(hostile)["meta-data"])
    assert meta == {"instance-id": "a\ninstance-id: evil", "local-hostname": "x: y"}
    with pytest.raises(ValidationError, match=r"^cloudInit.userData: is over"):
        render(CloudInit(instance_id="u", user_data="x" * (65 * 1024)))


@pytest.mark.skipif(
    shutil.which("genisoimage") is None, reason="needs genisoimage (apt-get install genisoimage)"
)
def test_seed_iso_has_cidata_label_and_files(tmp_path):
    nc = network_config_from_cni(CNI_1_0, [MAC])
    iso = make_seed_iso(CloudInit(instance_id="uid-9", network_config=nc), tmp_path / "seed.iso")
    info = subprocess.run(
        ["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert "Volume id: cidata" in info
    listing = subprocess.run(
        ["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True, text=True, timeout=60
    ).stdout.split()
    assert sorted(listing) == ["/meta-data", "/network-config", "/user-data"]
    got = subprocess.run(
        ["isoinfo", "-R", "-x", "/network-config", "-i", str(iso)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert yaml.safe_load(got) == nc
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]  # no temp files left


def test_nics_from_macvtap_result():
    from pathlib import Path

    from cri_shim.vm.nics import nics_from_cni_result

    nics = nics_from_cni_result(CNI_1_0, "abc123")
    assert [(n.mac, n.tap_device) for n in nics] == [(MAC, Path("/run/edgevirt/macvtap/abc123/eth0"))]
    for cid in ("", "../x", "a/b"):
        with pytest.raises(ValidationError) as ei:
            nics_from_cni_result(CNI_1_0, cid)
        assert ei.value.field == "containerID"
    with pytest.raises(ValidationError, match=r"^cniResult.interfaces: no interface inside the pod sandbox"):
        nics_from_cni_result({"interfaces": [{"name": "vm0", "mac": MAC}]}, "abc")
    with pytest.raises(ValidationError, match=r"^cniResult.interfaces\[0\].name"):
        nics_from_cni_result({"interfaces": [{"name": "../../x", "mac": MAC, "sandbox": "n"}]}, "abc")
