"""Errors of the VM layer: every bad input names the field and the fix.

The message of an error is what a CRI client (and through kubelet's events, anyone who may read
the pod's namespace) sees: it never holds a host path of the node's private directories or a
content digest. What helps the node's administrator instead (a resolved path, a tool's stderr, the
digest that did not match) goes into ``detail``, which the kvm handler logs on the node.
"""

from __future__ import annotations


class VMError(Exception):
    """Something in the VM layer failed (libvirt, QEMU, a tool); the message says what and where."""

    def __init__(self, message: str = "", *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


class ValidationError(VMError, ValueError):
    """Bad input: ``field`` is the dotted path of the offending value, ``fix`` what to do instead."""

    def __init__(self, field: str, problem: str, fix: str, *, detail: str = "") -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}", detail=detail)


class ImageError(VMError):
    """An image reference could not be resolved, fetched or verified."""


class DomainNotFound(VMError):
    """No such domain."""


class DomainExists(VMError):
    """A domain with this name is already defined."""


class AgentUnavailable(VMError):
    """The VM's guest agent cannot be reached: the domain has no agent channel (defined before
    edgevirt added one), the agent does not run in the guest (or has not started yet), the domain is
    not running, or the agent did not answer in time."""


class AgentError(VMError):
    """The guest agent answered a command with an error (e.g. the program to run was not found)."""


class ExecTimedOut(VMError):
    """A program run through the guest agent did not end within its timeout (it was killed)."""
