"""The local cluster's route to the API server from pods (localcluster.svcroute): the rules it owns,
and that it is set up before kubelet starts pods."""

from __future__ import annotations

from localcluster import svcroute
from localcluster.components import COMPONENTS


def test_the_kubernetes_service_is_dnatted_to_the_api_server_from_pods_and_the_host():
    rules = {(table, chain): " ".join(rule) for table, chain, rule in svcroute.rules()}
    assert svcroute.SERVICE_IP == "10.96.0.1"  # what kubelet puts in KUBERNETES_SERVICE_HOST
    dnat = rules[("nat", svcroute.NAT_CHAIN)]
    assert dnat == "-d 10.96.0.1/32 -p tcp --dport 443 -j DNAT --to-destination 127.0.0.1:6443"
    for table, chain, target in (
        ("nat", "PREROUTING", svcroute.NAT_CHAIN),  # pods on the bridge
        ("nat", "OUTPUT", svcroute.NAT_CHAIN),  # host-network pods and the host
        ("filter", "INPUT", svcroute.FW_CHAIN),
    ):
        assert rules[(table, chain)].endswith(f"-j {target}")
    # only DNAT'd connections from the bridge may reach loopback
    fw = rules[("filter", svcroute.FW_CHAIN)]
    assert (
        fw.startswith("-i edgevirt0 -d 127.0.0.0/8") and "! --ctstate RELATED,ESTABLISHED,DNAT -j DROP" in fw
    )


def test_the_route_is_there_before_kubelet_runs_a_pod():
    order = [c.name for c in COMPONENTS]
    assert order.index("containerd") < order.index("service-route") < order.index("kubelet")
