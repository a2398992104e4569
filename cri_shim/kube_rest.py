"""A Kubernetes API call as plain JSON through the kubernetes client's ``ApiClient`` (its
configuration, credentials, TLS and connection pool), without the client's generated API classes.

Why: with kubernetes 37 the generated classes are pydantic-validated and huge; building one
``CoreV1Api`` loads ``core_v1_api.py`` (4.5 MB of source) and costs ~80 MiB of resident memory when
no bytecode is shipped (~15 MiB with it), a node process's largest single cost (bench/RESULTS.md,
"Node memory"). The few core calls the node processes make (an Event, a Node's labels, a
SelfSubjectReview) need none of it: a method, a path, a JSON body, a JSON answer. Errors are the
client's own :class:`kubernetes.client.exceptions.ApiException` (``status``, ``reason``, ``body``), so
callers handle them as before.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def request(
    api_client: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    query: Mapping[str, str] | None = None,
    content_type: str = JSON,
    timeout: float | tuple[float, float] | None = 30,
) -> Any:
    """``method`` on ``path`` (``/api/v1/...``, already quoted) with ``body`` sent as JSON; returns the
    answer's JSON (None when empty). Raises ApiException on a non-2xx answer."""
    from kubernetes.client.exceptions import ApiException

    headers = {"Accept": JSON}
    if body is not None:
        headers["Content-Type"] = content_type
    _, url, headers, body, _ = api_client.param_serialize(
        method=method,
        resource_path=path,
        query_params=list((query or {}).items()),
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api_client.call_api(method, url, headers, body, _request_timeout=timeout)
    data = resp.read()
    if not 200 <= resp.status <= 299:
        text = data.decode("utf-8", "replace") if data else None
        raise ApiException.from_response(http_resp=resp, body=text, data=None)
    return json.loads(data) if data else None
