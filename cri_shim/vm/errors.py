"""Errors of the VM layer: every bad input names the field and the fix."""

from __future__ import annotations


class VMError(Exception):
    """Something in the VM layer failed (libvirt, QEMU, a tool); the message says what and where."""


class ValidationError(VMError, ValueError):
    """Bad input: ``field`` is the dotted path of the offending value, ``fix`` what to do instead."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}; {fix}")


class ImageError(VMError):
    """An image reference could not be resolved, fetched or verified."""


class DomainNotFound(VMError):
    """No such domain."""


class DomainExists(VMError):
    """A domain with this name is already defined."""
