"""Kubernetes API calls as plain JSON: the small protocol the controllers talk through
(:class:`KubeApi`), its error (:class:`ApiError`), and the protocol over the kubernetes client's
``ApiClient`` (:class:`ApiClientKubeApi`, cluster mode; node mode uses :mod:`cri_shim.kube_http`).

Why plain JSON: with kubernetes 37 the generated API classes are pydantic-validated and huge; building
one ``CoreV1Api`` loads ``core_v1_api.py`` (4.5 MB of source) and costs ~80 MiB of resident memory
when no bytecode is shipped (~15 MiB with it), and importing ``kubernetes.client`` at all costs
~30 MiB (bench/RESULTS.md, "Node memory"). The calls the node processes make (a VirtualMachine list
and watch, a status patch, an Event, a Node's labels, a SelfSubjectReview) need none of it: a method,
a path, a JSON body, a JSON answer.

Nothing here imports the kubernetes client at module level: :func:`request` and
:class:`ApiClientKubeApi` import it when called, :func:`api_error` only looks at it when a caller
has loaded it already.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol, cast

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"
#: ``timeout`` of a call: seconds for connecting and for reading, one for both, or None (no limit).
Timeout = float | tuple[float, float] | None


class ApiError(Exception):
    """The API server answered with an error: the HTTP ``status`` (0: no HTTP status), its
    ``reason`` phrase and the answer's ``body`` (a Status object's JSON, as text), as the kubernetes
    client's ``ApiException`` has them."""

    def __init__(self, status: int, reason: str, body: str | None = None) -> None:
        super().__init__(status, reason, body)
        self.status = status
        self.reason = reason
        self.body = body

    def __str__(self) -> str:
        return f"({self.status}) Reason: {self.reason}" + (
            f": {status_message(self.body)}" if self.body else ""
        )


def status_message(body: str | None) -> str:
    """The ``message`` of a Status answer (what the API server or an admission policy said), else
    the body as it is."""
    try:
        return str(json.loads(body or "").get("message") or body)
    except (TypeError, ValueError, AttributeError):
        return str(body)


def api_error(e: BaseException) -> ApiError | None:
    """``e`` as an :class:`ApiError` if the API server answered it: ours, or the kubernetes client's
    ``ApiException`` (looked for only when that client is loaded: node mode never loads it)."""
    if isinstance(e, ApiError):
        return e
    exceptions = sys.modules.get("kubernetes.client.exceptions")
    if exceptions is not None and isinstance(e, exceptions.ApiException):
        return ApiError(int(e.status or 0), str(e.reason or ""), e.body)
    return None


class KubeApi(Protocol):
    """What the controllers need of an API server connection. Both raise :class:`ApiError` when the
    API server answers with an error, and the transport's own errors (urllib3's ``HTTPError``,
    ``OSError``) when it does not answer."""

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = JSON,
        timeout: Timeout = 30,
    ) -> Any:
        """``method`` on ``path`` (``/api/v1/...``, already quoted) with ``body`` sent as JSON; the
        answer's JSON (None when empty)."""
        ...

    def stream_lines(
        self, path: str, *, query: Mapping[str, str] | None = None, timeout: Timeout = None
    ) -> Iterator[str]:
        """A GET of ``path`` whose answer is read as it comes, one line at a time (a watch); closing
        the iterator closes the connection."""
        ...


def lines_of(chunks: Iterable[bytes]) -> Iterator[str]:
    """The lines (UTF-8, without their newline; empty ones skipped) of a byte stream."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield line.decode("utf-8")
    if pending.strip():
        yield pending.decode("utf-8")


def request(
    api_client: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    query: Mapping[str, str] | None = None,
    content_type: str = JSON,
    timeout: Timeout = 30,
) -> Any:
    """:meth:`KubeApi.request` through the kubernetes client's ``api_client`` (its configuration,
    credentials, TLS and connection pool), not its generated API classes. Raises the client's own
    ``ApiException`` (``status``, ``reason``, ``body``) on a non-2xx answer."""
    resp = _call(api_client, method, path, body, query=query, content_type=content_type, timeout=timeout)
    data = resp.read()
    _raise_for_status(resp, data)
    return json.loads(data) if data else None


def _call(
    api_client: Any,
    method: str,
    path: str,
    body: Any,
    *,
    query: Mapping[str, str] | None,
    content_type: str,
    timeout: Timeout,
) -> Any:
    """The client's answer (a ``RESTResponse``; its ``response``, the urllib3 one, is still unread)."""
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
    return api_client.call_api(method, url, headers, body, _request_timeout=timeout)


def _raise_for_status(resp: Any, data: bytes | None) -> None:
    from kubernetes.client.exceptions import ApiException

    if not 200 <= resp.status <= 299:
        text = data.decode("utf-8", "replace") if data else None
        raise ApiException.from_response(http_resp=resp, body=text, data=None)


class ApiClientKubeApi:
    """:class:`KubeApi` through the kubernetes client's ``ApiClient`` (cluster mode, which has one for
    its generated API classes anyway); the client's ``ApiException`` is raised as :class:`ApiError`."""

    def __init__(self, api_client: Any) -> None:
        self.api_client = api_client

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = JSON,
        timeout: Timeout = 30,
    ) -> Any:
        try:
            return request(
                self.api_client, method, path, body, query=query, content_type=content_type, timeout=timeout
            )
        except Exception as e:
            err = api_error(e)
            if err is None or err is e:
                raise
            raise err from e

    def stream_lines(
        self, path: str, *, query: Mapping[str, str] | None = None, timeout: Timeout = None
    ) -> Iterator[str]:
        resp = _call(
            self.api_client, "GET", path, None, query=query, content_type=JSON, timeout=timeout
        ).response
        try:
            if not 200 <= resp.status <= 299:
                data = resp.read()
                raise ApiError(resp.status, resp.reason or "", data.decode("utf-8", "replace") or None)
            yield from lines_of(resp.stream(64 * 1024, decode_content=True))
        finally:
            resp.release_conn()


def kube_api(api: KubeApi | Any) -> KubeApi:
    """``api`` as a :class:`KubeApi`: itself if it is one (node mode's :class:`~cri_shim.kube_http.
    KubeHttpClient`), else a kubernetes ``ApiClient`` wrapped in :class:`ApiClientKubeApi`."""
    if hasattr(api, "stream_lines"):
        return cast(KubeApi, api)
    return ApiClientKubeApi(api)
