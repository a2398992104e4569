"""The answers edgevirt-cri gives itself: Version, and Status built from every backend's status.

Status is honest: RuntimeReady and NetworkReady are those of the default handler's backend (what
kubelet's ordinary pods need), with the reason naming that backend when it is not ready;
`runtime_handlers` lists only the handlers whose backend answers right now and whose runtime is
installed on this node (e.g. kata only when containerd-shim-kata-v2 exists). With verbose, `info`
carries each backend's condition under "edgevirt"."""

from __future__ import annotations

import json
import logging
from typing import Any

from . import protos
from .backends.base import Backend
from .errors import BackendError
from .router import Router
from .version import VERSION

log = logging.getLogger("edgevirt-cri.status")

RUNTIME_NAME = "edgevirt"
RUNTIME_API_VERSION = "v1"
KUBE_API_VERSION = "0.1.0"  # VersionResponse.version: the version of the kubelet runtime API


def version(request: bytes) -> bytes:
    api = protos.api()
    response: bytes = api.VersionResponse(
        version=KUBE_API_VERSION,
        runtime_name=RUNTIME_NAME,
        runtime_version=VERSION,
        runtime_api_version=RUNTIME_API_VERSION,
    ).SerializeToString()
    return response


def _backend_status(backend: Backend, request: bytes, timeout: float) -> tuple[Any, BackendError | None]:
    """(the backend's StatusResponse, None), or (None, why it did not answer)."""
    api = protos.api()
    try:
        return api.StatusResponse.FromString(backend.invoke("Status", request, timeout)), None
    except BackendError as e:
        return None, e


def status(router: Router, request: bytes, timeout: float = 10.0) -> bytes:
    api = protos.api()
    verbose = api.StatusRequest.FromString(request).verbose
    backends = router.ordered()
    if len(backends) == 1:
        answers = {backends[0]: _backend_status(backends[0], request, timeout)}
    else:
        results = router.each_backend(lambda b: _backend_status(b, request, timeout))
        answers = dict(zip(backends, results, strict=True))
    out = api.StatusResponse()
    default_resp, default_err = answers[router.default]
    for cond_type in ("RuntimeReady", "NetworkReady"):
        cond = out.status.conditions.add(type=cond_type)
        if default_err is not None:
            cond.status = False
            cond.reason = "BackendUnavailable"
            cond.message = f"backend {router.default.name}: {default_err.message}"
            continue
        theirs = next((c for c in default_resp.status.conditions if c.type == cond_type), None)
        if theirs is None:
            cond.status = False
            cond.reason = "BackendDidNotReport"
            cond.message = f"backend {router.default.name} reported no {cond_type} condition"
        else:
            cond.CopyFrom(theirs)
    if default_resp is not None:
        out.features.CopyFrom(default_resp.features)
    per_backend = {}
    for b, (resp, err) in answers.items():
        if err is not None:
            per_backend[b.name] = {"ready": False, "error": f"{err.code.name}: {err.message}"}
        else:
            conds = {c.type: c.status for c in resp.status.conditions}
            per_backend[b.name] = {"ready": bool(conds.get("RuntimeReady")), "conditions": conds}
    for handler in router.known_handlers():
        backend = router.backends[router.handlers[handler]]
        resp, err = answers[backend]
        if err is not None or not per_backend[backend.name]["ready"] or not backend.handler_works(handler):
            continue
        entry = out.runtime_handlers.add(name=handler)
        theirs = next((h for h in resp.runtime_handlers if h.name == handler), None)
        if theirs is not None:
            entry.features.CopyFrom(theirs.features)
    if verbose:
        if default_resp is not None:
            for k, v in default_resp.info.items():
                out.info[k] = v
        out.info["edgevirt"] = json.dumps(
            {"backends": per_backend, "handlers": router.handlers, "unavailable": router.unavailable}
        )
    response: bytes = out.SerializeToString()
    return response
