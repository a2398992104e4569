"""vmcrd.kube's client setup without an API server: kubeconfig contexts and namespaces, the API
server's error message; the kubectl-vm plugin's namespace choice."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.exceptions import ApiException

from vmcrd.kube import api_client, api_message, kubeconfig_namespace
from vmcrd.kubectl_plugin import Plugin, PluginError, parse_args

KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- {name: a, cluster: {server: "https://127.0.0.1:6443"}}
- {name: b, cluster: {server: "https://127.0.0.2:6443"}}
users:
- {name: u, user: {token: t}}
contexts:
- {name: one, context: {cluster: a, user: u, namespace: ns1}}
- {name: two, context: {cluster: b, user: u}}
current-context: one
"""


@pytest.fixture
def kubeconfig(tmp_path):
    path = tmp_path / "kubeconfig"
    path.write_text(KUBECONFIG)
    return str(path)


def test_client_and_namespace_follow_the_context(kubeconfig):
    assert api_client(kubeconfig).configuration.host == "https://127.0.0.1:6443"
    assert api_client(kubeconfig, "two").configuration.host == "https://127.0.0.2:6443"
    assert kubeconfig_namespace(kubeconfig) == "ns1"
    assert kubeconfig_namespace(kubeconfig, "two") is None


def test_a_named_kubeconfig_that_does_not_load_is_an_error_not_in_cluster(tmp_path):
    with pytest.raises(Exception, match=r"Invalid kube-config file"):  # not the in-cluster loader's
        api_client(str(tmp_path / "missing"))


def test_plugin_namespace_flag_then_context_then_default(kubeconfig):
    ns = [
        Plugin(parse_args([*argv, "--kubeconfig", kubeconfig, "start", "vm"])).namespace
        for argv in ([], ["--context", "two"], ["-n", "x"])
    ]
    assert ns == ["ns1", "default", "x"]
    with pytest.raises(PluginError, match="cannot load a kubeconfig"):
        Plugin(parse_args(["--kubeconfig", kubeconfig + ".missing", "start", "vm"]))


def test_api_message_prefers_the_servers_words():
    e = ApiException(status=422, reason="Unprocessable Entity")
    e.body = json.dumps({"kind": "Status", "message": "spec.cpu: Invalid value: 0"})
    assert api_message(e) == "spec.cpu: Invalid value: 0"
    e.body = "not json"
    assert api_message(e) == "422 Unprocessable Entity"
    e.body = None
    assert api_message(e) == "422 Unprocessable Entity"
