"""containerd's image store as the libvirt layer asks it: the CRI ImageService of containerd itself.

kubelet pulls a VM pod's container image through containerd (the CRI plugin, namespace ``k8s.io``)
like any other image; this client asks containerd, on its own socket, what it holds:

* :meth:`ContainerdImages.status` - ``ImageStatus``: the image a reference (or image ID) names in
  containerd's store, with its ``repo_digests`` (``<repository>@sha256:<digest of what the name
  points at>``: a manifest, or an index of manifests); None when containerd does not have it. No
  network: containerd answers from its own store.
* :meth:`ContainerdImages.pull` - ``PullImage`` without credentials, for an image kubelet did not
  pull (e.g. a VM's image volume): containerd's registry configuration applies (mirrors and
  ``hosts.toml`` under its ``config_path``), pull secrets do not.

Failures are :class:`~.errors.ImageError` whose message says what to do (containerd not answering
names its socket and the kvm option; a failed pull names the registry and why), with containerd's
own text in ``detail`` for the node's log.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import protos
from .errors import ImageError
from .oci import OciRef, parse_reference

if TYPE_CHECKING:  # grpc (~10 MiB with protobuf) is imported on the first call: node mode builds this
    import grpc  # client with its libvirt layer but needs containerd only for hot-plugged image volumes

DEFAULT_SOCKET = Path("/run/containerd/containerd.sock")
SERVICE = "/runtime.v1.ImageService/"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
STATUS_TIMEOUT_S = 30.0
#: words in containerd's pull error -> what went wrong, in order (the first match wins)
PULL_FAILURES = (
    (("not found", "manifest unknown", "name unknown"), "the registry has no such image"),
    (
        ("unauthorized", "authorization", "authentication required", "403 forbidden", "denied"),
        "the registry wants credentials, and the kvm handler's pulls carry none (pod pull secrets do not "
        "reach them; give the node's containerd credentials, or let kubelet pull the image)",
    ),
    (
        ("connection refused", "no such host", "i/o timeout", "dial tcp", "network is unreachable",
         "no route to host", "connection reset", "deadline exceeded", "tls handshake"),
        "the registry cannot be reached from this node",
    ),
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class LocalImage:
    """An image in containerd's store: its ID (the config digest) and repository digests."""

    id: str
    repo_digests: tuple[str, ...]
    repo_tags: tuple[str, ...] = ()

    def digest_of(self, ref: OciRef) -> str | None:
        """What the repository of ``ref`` points at in this image (``sha256:<hex>``), if recorded
        (the digest ``ref`` names, when it names one and containerd has it)."""
        found = []
        for entry in self.repo_digests:
            name, _, digest = entry.partition("@")
            try:
                if parse_reference(name).name == ref.name and digest.startswith("sha256:"):
                    found.append(digest)
            except ValueError:
                continue
        if ref.digest in found:
            return ref.digest
        return found[0] if found else None


def why_pull_failed(message: str) -> str:
    """containerd's pull error -> what went wrong, in a few words (pure)."""
    low = message.lower()
    for words, why in PULL_FAILURES:
        if any(w in low for w in words):
            return why
    return "containerd's pull failed"


class ContainerdImages:
    """The CRI ImageService of the containerd at ``socket`` (connected on first use)."""

    def __init__(self, socket: Path = DEFAULT_SOCKET) -> None:
        self.socket = Path(socket)
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def _call(self, method: str, request: Any, reply: Callable[[bytes], Any], timeout: float) -> Any:
        import grpc

        with self._lock:
            if self._channel is None:
                self._channel = grpc.insecure_channel(f"unix://{self.socket}", options=CHANNEL_OPTIONS)
            channel = self._channel
        call = channel.unary_unary(
            SERVICE + method, request_serializer=lambda m: m.SerializeToString(), response_deserializer=reply
        )
        return call(request, timeout=timeout)

    def _unavailable(self, e: grpc.RpcError) -> ImageError:
        return ImageError(
            "containerd does not answer on this node (VM disks of OCI images come from containerd's image "
            "store): is containerd running, and is the kvm option containerd_socket its socket?",
            detail=f"containerd at {self.socket}: {_details(e)}",
        )

    def status(self, image: str, timeout: float = STATUS_TIMEOUT_S) -> LocalImage | None:
        """The image ``image`` (a reference or an image ID) names in containerd's store, or None."""
        import grpc

        api = protos.api()
        req = api.ImageStatusRequest(image=api.ImageSpec(image=image))
        try:
            resp = self._call("ImageStatus", req, api.ImageStatusResponse.FromString, timeout)
        except grpc.RpcError as e:
            if _code(e) == grpc.StatusCode.NOT_FOUND:
                return None
            if _code(e) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise self._unavailable(e) from None
            raise ImageError(
                f"containerd could not tell whether it holds {image}", detail=_details(e)
            ) from None
        if not resp.HasField("image") or not resp.image.id:
            return None
        return LocalImage(str(resp.image.id), tuple(resp.image.repo_digests), tuple(resp.image.repo_tags))

    def pull(self, ref: OciRef, timeout: float) -> None:
        """Pull ``ref`` through containerd (no credentials); ImageError naming the registry on failure."""
        import grpc

        api = protos.api()
        req = api.PullImageRequest(image=api.ImageSpec(image=str(ref)))
        try:
            self._call("PullImage", req, api.PullImageResponse.FromString, timeout)
        except grpc.RpcError as e:
            if _code(e) == grpc.StatusCode.UNAVAILABLE:
                raise self._unavailable(e) from None
            why = (
                f"the pull took over {int(timeout)}s (kvm option image_fetch_timeout_s)"
                if _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
                else why_pull_failed(_details(e))
            )
            raise ImageError(
                f"{ref} is not in containerd's image store on this node, and containerd could not pull it "
                f"from registry {ref.registry}: {why}",
                detail=f"PullImage {ref} on containerd at {self.socket}: {_details(e)}",
            ) from None

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None


def _code(e: grpc.RpcError) -> grpc.StatusCode:
    import grpc

    code = e.code() if hasattr(e, "code") else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details(e: grpc.RpcError) -> str:
    details = e.details() if hasattr(e, "details") else None
    return str(details or e)
