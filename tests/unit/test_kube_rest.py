"""cri_shim.kube_rest and its users (the labeller's KubeNodeApi, the controllers' EventRecorder)
against a local HTTP server standing in for the API server: the request on the wire (method, path,
query, credentials, content type, JSON body) and the answer, errors included."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from cri_shim import kube_rest
from cri_shim.node.kubeapi import KubeNodeApi, NodeApiError
from vmcrd.kube import EventRecorder


class FakeApiServer:
    """Records every request; answers with the next (status, body) of ``answers``."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answers: list[tuple[int, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                fake.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "type": self.headers.get("Content-Type"),
                        "body": json.loads(raw) if raw else None,
                    }
                )
                status, body = fake.answers.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def api_client(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{self.server.server_address[1]}"
        cfg.api_key = {"BearerToken": "Bearer sekret"}
        return client.ApiClient(cfg)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    try:
        yield fake
    finally:
        fake.close()


def test_request_sends_json_with_the_credentials_and_returns_the_answer(apiserver: FakeApiServer) -> None:
    apiserver.answers.append((200, {"kind": "Node", "metadata": {"name": "n1"}}))
    got = kube_rest.request(
        apiserver.api_client(),
        "PATCH",
        "/api/v1/nodes/n1",
        {"a": None},
        query={"dryRun": "All"},
        content_type=kube_rest.MERGE_PATCH,
    )
    assert got == {"kind": "Node", "metadata": {"name": "n1"}}
    assert apiserver.seen == [
        {
            "method": "PATCH",
            "path": "/api/v1/nodes/n1?dryRun=All",
            "auth": "Bearer sekret",
            "type": "application/merge-patch+json",
            "body": {"a": None},
        }
    ]


def test_request_raises_the_clients_api_exception_with_the_status_body(apiserver: FakeApiServer) -> None:
    apiserver.answers.append((404, {"kind": "Status", "message": 'nodes "x" not found'}))
    with pytest.raises(ApiException) as err:
        kube_rest.request(apiserver.api_client(), "GET", "/api/v1/nodes/x")
    assert err.value.status == 404
    assert json.loads(err.value.body)["message"] == 'nodes "x" not found'


def test_node_api_reads_whoami_labels_and_patches_as_json(apiserver: FakeApiServer) -> None:
    api = KubeNodeApi.__new__(KubeNodeApi)
    api._api = apiserver.api_client()
    review = {"status": {"userInfo": {"username": "system:serviceaccount:s:a", "extra": {"k": ["v"]}}}}
    node = {"metadata": {"name": "n 1", "labels": {"l": "1"}}}
    apiserver.answers += [(201, review), (200, node), (200, node)]
    assert api.whoami() == ("system:serviceaccount:s:a", {"k": ["v"]})
    assert api.labels("n 1") == {"l": "1"}
    assert api.patch_labels("n 1", {"metadata": {"labels": {"l": None}}}) == {"l": "1"}
    assert [(s["method"], s["path"], s["type"]) for s in apiserver.seen] == [
        ("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", "application/json"),
        ("GET", "/api/v1/nodes/n%201", None),
        ("PATCH", "/api/v1/nodes/n%201", "application/merge-patch+json"),
    ]
    assert apiserver.seen[0]["body"] == {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
    }
    assert apiserver.seen[2]["body"] == {"metadata": {"labels": {"l": None}}}


def test_node_api_says_which_call_the_api_server_refused(apiserver: FakeApiServer) -> None:
    api = KubeNodeApi.__new__(KubeNodeApi)
    api._api = apiserver.api_client()
    apiserver.answers.append((403, {"kind": "Status", "message": "denied by edgevirt-node-labels"}))
    with pytest.raises(NodeApiError, match=r"patch node n1: 403 .*denied by edgevirt-node-labels"):
        api.patch_labels("n1", {"metadata": {"labels": {}}})


def test_event_recorder_posts_the_event_to_the_vms_namespace(apiserver: FakeApiServer) -> None:
    apiserver.answers.append((201, {}))
    vm = {
        "apiVersion": "edgevirt.io/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "ns1", "uid": "u1", "resourceVersion": "7"},
    }
    EventRecorder(apiserver.api_client(), "edgevirt-controller-node", "node1").emit(
        vm, "Normal", "Resumed", "ok"
    )
    (seen,) = apiserver.seen
    assert (seen["method"], seen["path"], seen["auth"]) == (
        "POST",
        "/api/v1/namespaces/ns1/events",
        "Bearer sekret",
    )
    assert seen["body"]["involvedObject"] == {
        "apiVersion": "edgevirt.io/v1alpha1",
        "kind": "VirtualMachine",
        "name": "vm1",
        "namespace": "ns1",
        "uid": "u1",
        "resourceVersion": "7",
    }
    assert (seen["body"]["reason"], seen["body"]["message"], seen["body"]["source"]["host"]) == (
        "Resumed",
        "ok",
        "node1",
    )


def test_event_recorder_survives_a_refused_event(apiserver: FakeApiServer) -> None:
    apiserver.answers.append((403, {"kind": "Status", "message": "no"}))
    vm = {"metadata": {"name": "vm1", "namespace": "ns1", "uid": "u1"}}
    EventRecorder(apiserver.api_client(), "c", "h").emit(vm, "Warning", "X", "y")
    assert len(apiserver.seen) == 1
