"""The gRPC server of edgevirt-cri: RuntimeService and ImageService of CRI runtime.v1 on a unix
socket, with bytes in and bytes out (no (de)serialization in the server itself).

Every runtime.v1 method is registered through one generic handler; a method this cri-api version
does not define, or another API version (e.g. v1alpha2), answers UNIMPLEMENTED with a message.

With an `observe(method, seconds, code)` callback (cri_shim.metrics), every unary call of a known
method is timed and its gRPC status code reported; the event stream is not timed."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import grpc

from . import runtime_status as local
from .errors import BackendError
from .methods import IMAGE, METHODS, RUNTIME, Route
from .router import Router

log = logging.getLogger("edgevirt-cri.server")

Unary = Callable[[bytes, grpc.ServicerContext], bytes]
#: (method, seconds, status code) of one served call
Observe = Callable[[str, float, grpc.StatusCode], None]
if TYPE_CHECKING:  # generic only in grpc-stubs
    _GenericRpcHandler = grpc.GenericRpcHandler[bytes, bytes]
else:
    _GenericRpcHandler = grpc.GenericRpcHandler


def _abort(context: grpc.ServicerContext, method: str, e: BackendError) -> NoReturn:
    if e.code not in (grpc.StatusCode.NOT_FOUND,):
        log.info("%s: %s: %s", method, e.code.name, e.message)
    context.abort(e.code, e.message)


def _timeout(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


class CriHandler(_GenericRpcHandler):
    """Dispatches /runtime.v1.{RuntimeService,ImageService}/<Method> to the router."""

    def __init__(self, router: Router, observe: Observe | None = None) -> None:
        self.router = router
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}
        for method, (service, route) in METHODS.items():
            if route is Route.EVENTS:
                h = grpc.unary_stream_rpc_method_handler(self._events)
            else:
                unary = self._unary(method, route)
                if observe is not None:
                    unary = _timed(method, unary, observe)
                h = grpc.unary_unary_rpc_method_handler(unary)
            self._handlers[f"/{service}/{method}"] = h

    def _unary(self, method: str, route: Route) -> Unary:
        router = self.router
        if method == "Version":
            return lambda request, context: local.version(request)
        if method == "Status":

            def status(request: bytes, context: grpc.ServicerContext) -> bytes:
                return local.status(router, request, min(_timeout(context) or 10.0, 10.0))

            return status

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            try:
                return router.call(method, request, _timeout(context))
            except BackendError as e:
                _abort(context, method, e)

        return unary

    def _events(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            yield from self.router.events(request)
        except BackendError as e:
            _abort(context, "GetContainerEvents", e)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        h = self._handlers.get(handler_call_details.method)
        if h is not None:
            return h
        return grpc.unary_unary_rpc_method_handler(_unimplemented(handler_call_details.method))


def _timed(method: str, unary: Unary, observe: Observe) -> Unary:
    """`unary` reporting its duration and status code (the one `context.abort` set, UNKNOWN for an
    exception that escaped) to `observe`."""

    def timed(request: bytes, context: grpc.ServicerContext) -> bytes:
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return unary(request, context)
        except BaseException:
            code_of = getattr(context, "code", None)  # grpcio >= 1.38; not in grpc-stubs
            code = (code_of() if code_of is not None else None) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            observe(method, time.perf_counter() - t0, code)

    return timed


def _unimplemented(method: str) -> Unary:
    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        service = method.rsplit("/", 1)[0].lstrip("/")
        if service in (RUNTIME, IMAGE):
            msg = f"edgevirt-cri does not implement {method} (it serves CRI runtime.v1 as of cri-api v0.34.4)"
        else:
            msg = f"edgevirt-cri does not serve {service}: it speaks CRI runtime.v1 only ({RUNTIME}, {IMAGE})"
        context.abort(grpc.StatusCode.UNIMPLEMENTED, msg)

    return answer


def _claim_socket(path: Path) -> None:
    """Make the socket's directory; remove a stale socket file, refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; remove it or choose another --socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left by a killed server
            return
    raise RuntimeError(f"{path} is in use by a running server; stop it first or choose another --socket")


def serve(
    router: Router, socket_path: str, mode: int = 0o660, workers: int = 32, observe: Observe | None = None
) -> grpc.Server:
    """Start serving on `socket_path` (mode `mode`); returns the started server. `observe` gets the
    duration and status code of every call (metrics)."""
    path = Path(socket_path)
    _claim_socket(path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri"),
        handlers=[CriHandler(router, observe)],
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ],
        maximum_concurrent_rpcs=None,
    )
    old = os.umask(0o117)
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return server
