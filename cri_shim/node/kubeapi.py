"""The little of the Kubernetes API the node tools use: who am I, and this node's labels.

``edgevirt-node label`` (the labeller, with its pod's token or a kubeconfig) and ``edgevirt-node
uninstall`` (with the kubelet's own kubeconfig) read and patch one Node's labels; nothing else.
:class:`NodeApi` is the protocol the callers depend on (unit tests pass a fake);
:class:`KubeNodeApi` is the kubernetes client behind it, imported only when used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

#: the extra of a ServiceAccount token bound to a pod (or a Node): the node it is on
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
NODE_USER_PREFIX = "system:node:"


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
        self._core = client.CoreV1Api(self._api)
        self._client = client

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs, _request_timeout=30)
        except ApiException as e:
            raise NodeApiError(f"{what}: {e.status} {e.reason}: {_message(e.body)}") from None
        except (HTTPError, OSError) as e:
            raise NodeApiError(f"{what}: the API server did not answer: {e}") from None

    def whoami(self) -> tuple[str, dict[str, list[str]]]:
        auth = self._client.AuthenticationV1Api(self._api)
        body = self._client.V1SelfSubjectReview()
        review = self._call("SelfSubjectReview", auth.create_self_subject_review, body)
        info = review.status.user_info
        return str(info.username or ""), {k: list(v) for k, v in (info.extra or {}).items()}

    def labels(self, node: str) -> dict[str, str]:
        obj = self._call(f"get node {node}", self._core.read_node, node)
        return dict(obj.metadata.labels or {})

    def patch_labels(self, node: str, patch: Mapping[str, object]) -> dict[str, str]:
        obj = self._call(
            f"patch node {node}",
            self._core.patch_node,
            node,
            dict(patch),
            _content_type="application/merge-patch+json",
        )
        return dict(obj.metadata.labels or {})


def _message(body: Any) -> str:
    """The Status message of an API error body (the admission policy's words), else the body."""
    import json

    try:
        return str(json.loads(body).get("message") or body)
    except (TypeError, ValueError, AttributeError):
        return str(body)
