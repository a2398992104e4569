"""containerDisks from containerd's own image store: no second download, no registry once pulled.

kubelet already pulled a VM pod's container image through containerd. :class:`ContainerdSource`
(a :class:`~.oci.ContainerDiskSource` of the image store) asks containerd what a reference points at
(:mod:`.containerd_images`: ``ImageStatus``, answered from containerd's store; ``PullImage`` for an
image containerd does not hold, e.g. a VM's image volume), and reads the manifest and the layers
from containerd's content store on disk (``<containerd root>/io.containerd.content.v1.content/
blobs/sha256/<hex>``): an index is resolved to its linux/amd64 manifest, every blob is verified
against its digest and size while it is read, and the disk is taken out of the layers in one pass
(:mod:`.disk_layers`). The image store caches the disk keyed by the manifest digest, so a cached
disk is found with neither the registry nor skopeo: a tag is looked up in containerd's store.

containerd must keep the compressed layers after unpacking them (its CRI option
``discard_unpacked_layers = false``, the default): a layer it dropped is named as such.

Progress of a large disk: a log line every :data:`LOG_EVERY_BYTES` and the metrics of
:mod:`.image_metrics`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import IO, Any

from . import image_metrics
from .containerd_images import ContainerdImages
from .disk_layers import Layer, extract_disk
from .errors import ImageError
from .oci import SHA256_RE, Manifest, OciRef, layers_of
from .sizes import format_bytes

log = logging.getLogger("edgevirt.vm.images")

DEFAULT_ROOT = Path("/var/lib/containerd")
CONTENT_BLOBS = Path("io.containerd.content.v1.content/blobs/sha256")
MAX_MANIFEST_BYTES = 4 << 20
MAX_SCANNED_BYTES = 64 << 10  # manifests looked through for an image known by tag only
LOG_EVERY_BYTES = 256 << 20
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
PLATFORM = ("linux", "amd64")


class ContentStore:
    """Verified reads from containerd's content store under ``root`` (containerd's ``root``)."""

    def __init__(self, root: Path = DEFAULT_ROOT) -> None:
        self.root = Path(root)
        self.blobs = self.root / CONTENT_BLOBS

    def path(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not SHA256_RE.fullmatch(hexd):
            raise ImageError("the image names a digest that is not sha256")
        return self.blobs / hexd

    def _missing(self, what: str, digest: str) -> ImageError:
        return ImageError(
            f"{what}: a blob of the image is not in containerd's content store on this node (has containerd "
            "dropped unpacked layers, CRI option discard_unpacked_layers? is the kvm option containerd_root "
            "containerd's root?); remove the image from containerd and pull it again",
            detail=f"{self.path(digest)} is missing",
        )

    def open(self, layer: Layer, what: str) -> IO[bytes]:
        try:
            f = open(self.path(layer.digest), "rb")  # noqa: SIM115 (the caller closes it)
        except FileNotFoundError:
            raise self._missing(what, layer.digest) from None
        if os.fstat(f.fileno()).st_size != layer.size:
            f.close()
            raise ImageError(
                f"{what}: a blob in containerd's content store does not have the size the image says",
                detail=f"{self.path(layer.digest)}: expected {layer.size} bytes",
            )
        return f

    def read_json(self, digest: str, what: str) -> dict[str, Any]:
        """A manifest or index blob, verified against ``digest``."""
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise self._missing(what, digest) from None
        if len(data) > MAX_MANIFEST_BYTES or f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise ImageError(f"{what}: a manifest in containerd's content store does not match its digest",
                             detail=f"{self.path(digest)}")  # fmt: skip
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise ImageError(f"{what}: the image's manifest is not a JSON object")
        return doc

    def manifest_of_config(self, config: str) -> str | None:
        """The digest of a manifest in the store whose config is ``config`` (an image ID), for an
        image containerd holds by tag only (``ctr images import``: no repository digest); a scan
        of the store's small blobs."""
        try:
            entries = list(os.scandir(self.blobs))
        except OSError:
            return None
        for e in entries:
            try:
                if not e.is_file() or e.stat().st_size > MAX_SCANNED_BYTES:
                    continue
                with open(e.path, "rb") as f:
                    data = f.read(MAX_SCANNED_BYTES)
                doc = json.loads(data) if data[:1] == b"{" else None
            except (OSError, ValueError):
                continue
            cfg = doc.get("config") if isinstance(doc, dict) else None
            if isinstance(cfg, dict) and cfg.get("digest") == config and SHA256_RE.fullmatch(e.name):
                return f"sha256:{e.name}"  # (verified when read: the name is the content's digest)
        return None

    def image_manifest(self, digest: str, what: str) -> dict[str, Any]:
        """The image manifest ``digest`` names: itself, or an index's linux/amd64 manifest."""
        doc = self.read_json(digest, what)
        if doc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
            entries = [m for m in doc.get("manifests") or [] if isinstance(m, dict)]
            pick = [m for m in entries if _platform(m) == PLATFORM]
            if not pick:
                raise ImageError(f"{what}: the image has no {'/'.join(PLATFORM)} manifest")
            doc = self.read_json(str(pick[0].get("digest", "")), what)
        if "layers" not in doc:
            raise ImageError(f"{what}: the image's manifest lists no layers")
        return doc


def _platform(entry: dict[str, Any]) -> tuple[str, str]:
    p = entry.get("platform") or {}
    return (str(p.get("os", "")), str(p.get("architecture", ""))) if isinstance(p, dict) else ("", "")


class _Progress:
    """Log lines every LOG_EVERY_BYTES and the bytes counter, for one disk."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total = what, total
        self.t0 = time.monotonic()
        self.counted = 0
        self.next_log = LOG_EVERY_BYTES

    def __call__(self, written: int) -> None:
        image_metrics.EXTRACTED_BYTES.labels("containerd").inc(written - self.counted)
        self.counted = written
        if written >= self.next_log:
            self.next_log += LOG_EVERY_BYTES
            rate = written / max(time.monotonic() - self.t0, 1e-3)
            log.info("taking the disk out of %s: %s written (layers %s), %s/s", self.what,
                     format_bytes(written), format_bytes(self.total), format_bytes(int(rate)))  # fmt: skip


class ContainerdSource:
    """containerDisks from the containerd at ``socket`` whose root is ``root``."""

    def __init__(self, socket: Path | None = None, root: Path = DEFAULT_ROOT) -> None:
        self.images = ContainerdImages(socket) if socket is not None else ContainerdImages()
        self.store = ContentStore(root)

    def inspect(self, ref: OciRef, timeout: float) -> Manifest:
        """The manifest digest containerd has for ``ref`` and the size of its layers; an image
        containerd does not hold is pulled through it first (ImageError when that fails)."""
        image = self.images.status(str(ref))
        if image is None:
            log.info("%s is not in containerd's store: pulling it through containerd", ref)
            t0 = time.monotonic()
            self.images.pull(ref, timeout)
            log.info("containerd pulled %s in %.1fs", ref, time.monotonic() - t0)
            image = self.images.status(str(ref))
        if image is None:
            raise ImageError(f"containerd pulled {ref} but does not show it; try again")
        # by the repository's digest; an image imported by tag only has none: by its config
        digest = image.digest_of(ref) or self.store.manifest_of_config(image.id)
        if digest is None:
            raise ImageError(
                f"containerd holds {ref}, but its manifest is not in containerd's content store "
                "(is the kvm option containerd_root containerd's root?)",
                detail=f"containerd's record: {image}; content store {self.store.blobs}",
            )
        layers = layers_of(self.store.image_manifest(digest, str(ref)))
        return Manifest(digest, sum(layer.size for layer in layers))

    def fetch_disk(self, ref: OciRef, dest: Path, max_bytes: int, timeout: float) -> str:
        """The disk of the image ``ref`` (pinned to a digest by the image store) into ``dest``, from
        containerd's content store; returns its sha256 (hex)."""
        digest = ref.digest or self.inspect(ref, timeout).digest
        what = str(OciRef(ref.registry, ref.repository, ref.tag, digest))
        layers = layers_of(self.store.image_manifest(digest, what))
        progress = _Progress(what, sum(layer.size for layer in layers))
        log.info("taking the disk out of %s (%s of layers) from containerd's content store",
                 what, format_bytes(progress.total))  # fmt: skip
        outcome = "failed"
        try:
            disk = extract_disk(
                layers,
                lambda layer: self.store.open(layer, what),
                dest,
                what=what,
                max_bytes=max_bytes,
                deadline=time.monotonic() + timeout,
                progress=progress,
            )
            outcome = "ok"
        finally:
            seconds = time.monotonic() - progress.t0
            image_metrics.EXTRACT_SECONDS.labels("containerd", outcome).observe(seconds)
        log.info("took the disk (%s) out of %s in %.1fs", format_bytes(disk.size), what, seconds)
        return disk.sha256

    def close(self) -> None:
        self.images.close()
