"""The little of the Kubernetes API the node tools use: who am I, and this node's labels.

``edgevirt-node label`` (the labeller, with its pod's token or a kubeconfig) and ``edgevirt-node
uninstall`` (with the kubelet's own kubeconfig) read and patch one Node's labels; nothing else.
:class:`NodeApi` is the protocol the callers depend on (unit tests pass a fake);
:class:`KubeNodeApi` is the kubernetes client behind it, imported only when used: its ApiClient
(configuration, credentials, connections) with plain JSON calls (:mod:`cri_shim.kube_rest`), not its
generated API classes (``CoreV1Api`` alone costs the labeller ~80 MiB).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

#: the extra of a ServiceAccount token bound to a pod (or a Node): the node it is on
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NODE_USER_PREFIX = "system:node:"
SELF_SUBJECT_REVIEWS = "/apis/authentication.k8s.io/v1/selfsubjectreviews"


class NodeApiError(Exception):
    """The API server refused or could not be reached; the message says which call and why."""


class NodeApi(Protocol):
    def whoami(self) -> tuple[str, dict[str, list[str]]]:
        """(user name, extra) of the credentials, as the API server sees them."""
        ...

    def labels(self, node: str) -> dict[str, str]: ...

    def patch_labels(self, node: str, patch: Mapping[str, object]) -> dict[str, str]:
        """Apply a JSON merge patch to the Node; returns its labels afterwards."""
        ...


def node_of(user: str, extra: Mapping[str, list[str]]) -> str | None:
    """The node credentials belong to: a kubelet's (``system:node:NAME``), or the node a pod-bound
    ServiceAccount token names; None for anybody else."""
    if user.startswith(NODE_USER_PREFIX):
        return user[len(NODE_USER_PREFIX) :]
    names = list(extra.get(NODE_NAME_EXTRA) or [])
    return names[0] if len(names) == 1 else None


class KubeNodeApi:
    """:class:`NodeApi` through the kubernetes client: a kubeconfig file, else the pod's token."""

    def __init__(self, kubeconfig: str | None) -> None:
        from kubernetes import client, config

        if kubeconfig:
            self._api = config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        else:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            self._api = client.ApiClient(cfg)

    def _call(self, what: str, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        from .. import kube_rest

        try:
            return kube_rest.request(self._api, method, path, body, timeout=30, **kwargs)
        except ApiException as e:
            raise NodeApiError(f"{what}: {e.status} {e.reason}: {_message(e.body)}") from None
        except (HTTPError, OSError) as e:
            raise NodeApiError(f"{what}: the API server did not answer: {e}") from None

    def whoami(self) -> tuple[str, dict[str, list[str]]]:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
        review = self._call("SelfSubjectReview", "POST", SELF_SUBJECT_REVIEWS, body)
        info = (review.get("status") or {}).get("userInfo") or {}
        return str(info.get("username") or ""), {k: list(v) for k, v in (info.get("extra") or {}).items()}

    def labels(self, node: str) -> dict[str, str]:
        obj = self._call(f"get node {node}", "GET", _node_path(node))
        return dict(obj["metadata"].get("labels") or {})

    def patch_labels(self, node: str, patch: Mapping[str, object]) -> dict[str, str]:
        from .. import kube_rest

        obj = self._call(
            f"patch node {node}", "PATCH", _node_path(node), dict(patch), content_type=kube_rest.MERGE_PATCH
        )
        return dict(obj["metadata"].get("labels") or {})


def _node_path(node: str) -> str:
    from urllib.parse import quote

    return f"/api/v1/nodes/{quote(node, safe='')}"


def _message(body: Any) -> str:
    """The Status message of an API error body (the admission policy's words), else the body."""
    import json

    try:
        return str(json.loads(body).get("message") or body)
    except (TypeError, ValueError, AttributeError):
        return str(body)
