"""What a CRI client may read of a failure: the gRPC code, and a text without any path of the
node's private folders and without digests.

The kvm handler's error messages reach kubelet's events on the pod, readable by anyone who may read
the namespace. The libvirt layer writes its messages without host paths or digests and puts such
details into the error's ``detail``, which :func:`vm_error` logs on the node while it maps the error
to its gRPC code. :class:`Redactor` is the net under that rule, for text the handler does not write
itself (libvirt's and QEMU's, a CNI plugin's): every path under one of the node's private folders
becomes ``<node path>`` and every ``sha256`` digest ``sha256:<digest>``. Paths the user wrote
themselves (a hostDisk under the hostDisk root, ``file://`` image paths) are left alone.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import grpc

from ..errors import BackendError
from ..vm.errors import DomainNotFound, ImageError, ValidationError, VMError
from .contract import ContractError

log = logging.getLogger("edgevirt-cri.kvm")

DIGEST_RE = re.compile(r"sha256([:=/])[0-9a-fA-F]{64}")
PATH_TAIL = r"(?:/[^\s'\"<>,;)\]]*|(?![\w.-]))"


class Redactor:
    """Removes the paths under ``private_roots`` (as given and resolved) and digests from text."""

    def __init__(self, private_roots: Iterable[Path]) -> None:
        roots = set()
        for r in private_roots:
            for p in (str(r), os.path.realpath(r)):
                if p and p != "/":
                    roots.add(p.rstrip("/"))
        alternatives = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
        self._paths = re.compile(rf"(?:{alternatives}){PATH_TAIL}") if alternatives else None

    def __call__(self, text: str) -> str:
        out = self._paths.sub("<node path>", text) if self._paths is not None else text
        return DIGEST_RE.sub(lambda m: f"sha256{m.group(1)}<digest>", out)


def vm_error(e: VMError) -> BackendError:
    """The gRPC status of a libvirt-layer failure: bad input, a missing domain, or anything else.
    The error's details (host paths, digests, a tool's output) go to the node's log only."""
    if e.detail:
        log.warning("%s [detail: %s]", e, e.detail)
    if isinstance(e, ContractError):
        return BackendError(grpc.StatusCode.INVALID_ARGUMENT, f"config.annotations: {e}")
    if isinstance(e, ValidationError | ImageError):
        return BackendError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, DomainNotFound):
        return BackendError(grpc.StatusCode.NOT_FOUND, str(e))
    return BackendError(grpc.StatusCode.UNKNOWN, str(e))
