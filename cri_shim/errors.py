"""The one error type backends and the router raise: a gRPC status code plus a message for kubelet."""

from __future__ import annotations

import grpc


class BackendError(Exception):
    """A CRI call failed with `code` (a grpc.StatusCode) and a human-readable `message`.

    Backends raise it for their own failures (a passthrough backend re-raises the upstream code and
    message unchanged); the server turns it into the gRPC status the client sees."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"BackendError({self.code.name}, {self.message!r})"


def unimplemented(what: str) -> BackendError:
    return BackendError(grpc.StatusCode.UNIMPLEMENTED, what)


def invalid(field: str, problem: str, fix: str) -> BackendError:
    """INVALID_ARGUMENT naming the request field, what is wrong with it, and how to fix it."""
    return BackendError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}; {fix}")
