"""Image store: resolve a VM image reference to a verified local base disk in a content-addressed cache.

Reference forms (the ``image`` field of a VirtualMachine or a kvm pod):

* ``file:///abs/path.qcow2`` - must lie under one of the allowed image roots after resolving
  symlinks; ``..`` is rejected outright.
* ``https://host/path.img#sha256=<64 hex>`` - downloaded (:mod:`.https_fetch`: https only, also
  after redirects; a size cap and a deadline), hashed while streaming, kept only if the digest
  matches. Plain ``http://`` only when the store was built with ``allow_http=True`` (tests).
* a registry reference (:mod:`.oci`): an OCI containerDisk, from containerd's image store
  (:mod:`.containerd_source`: kubelet pulled it already, or containerd pulls it); no other transport.
  The cache is keyed by the repository and the manifest digest the reference resolves to in
  containerd's store, so a tag is taken out of an image again only when it moved, and a cached disk
  is found without the registry; a reference by digest is served from the cache without asking
  containerd at all.

A cached disk answers only the reference that brought it: the same https URL with the same digest,
the same repository with the same manifest digest, the same file. Knowing a digest is not enough
to get another user's image out of the cache (``refs/`` records which reference gave which blob).
A known URL and digest, a known repository digest, or a tag containerd holds whose digest is cached,
never download again: VMs boot with the network gone.

Every base disk is checked with ``qemu-img info``: format raw or qcow2 and no backing file (a qcow2
that names a backing file could make QEMU read any host file). Blobs live at
``<state>/images/blobs/sha256/<hex>``. Error messages hold neither host paths nor digests; the
details go to the error's ``detail`` for the node's log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import ssl
import subprocess
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from . import https_fetch, image_metrics
from .containerd_source import ContainerdSource
from .errors import ImageError, ValidationError, VMError
from .oci import ContainerDiskSource, parse_reference
from .private import private_dir
from .sizes import DiskLimits, format_bytes

SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**30
DEFAULT_FETCH_TIMEOUT = 1800.0


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """A verified base disk in the cache."""

    path: Path
    format: str
    digest: str
    virtual_size: int
    ref: str


def qemu_img_info(path: Path) -> dict[str, Any]:
    try:
        r = subprocess.run(
            ["qemu-img", "info", "--output=json", "--force-share", "--", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        raise ImageError("qemu-img info took over 120s", detail=str(path)) from None
    if r.returncode != 0:
        raise ImageError("the disk image cannot be read", detail=f"qemu-img info {path}: {r.stderr.strip()}")
    info: dict[str, Any] = json.loads(r.stdout)
    return info


def check_disk_file(path: Path, field: str) -> tuple[str, int]:
    """(format, virtual size) of a base disk; raw or qcow2 without backing file, else ValidationError."""
    info = qemu_img_info(path)
    fmt = info.get("format")
    if fmt not in ("raw", "qcow2"):
        raise ValidationError(
            field, f"disk image format {fmt!r} is not supported", "convert it to qcow2 or raw"
        )
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ValidationError(
            field,
            "the qcow2 image names a backing file",
            "flatten it with 'qemu-img convert -O qcow2' first",
            detail=f"{path}: backing file {info.get('backing-filename')!r}",
        )
    return fmt, int(info.get("virtual-size", 0))


def _hash_copy(src: IO[bytes], dst: IO[bytes]) -> str:
    h = hashlib.sha256()
    read = getattr(src, "read1", src.read)
    while chunk := read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
    return h.hexdigest()


class ImageStore:
    """Resolves image references to :class:`BaseImage` in a content-addressed cache."""

    def __init__(
        self,
        state_dir: Path,
        file_roots: Iterable[Path] = (),
        container_disks: ContainerDiskSource | None = None,
        ssl_context: ssl.SSLContext | None = None,
        allow_http: bool = False,
        timeout: float = 60.0,
        *,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        fetch_timeout: float = DEFAULT_FETCH_TIMEOUT,
        limits: DiskLimits | None = None,
    ) -> None:
        self.root = Path(state_dir) / "images"
        self.blobs = self.root / "blobs" / "sha256"
        self.refs = self.root / "refs"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.refs, self.tmp):
            private_dir(d)
        self.file_roots = [Path(os.path.realpath(r)) for r in file_roots]
        self.container_disks = container_disks if container_disks is not None else ContainerdSource()
        self.opener = https_fetch.opener(ssl_context, allow_http)
        self.allow_http = allow_http
        self.timeout = timeout  # per read
        self.max_image_bytes = max_image_bytes
        self.fetch_timeout = fetch_timeout
        self.limits = limits if limits is not None else DiskLimits()
        self._local = threading.local()  # whether this thread's resolve() fetched (for the metrics)

    # -- public
    def resolve(self, ref: str, field: str = "image", progress: Progress | None = None) -> BaseImage:
        """Return the cached base disk for ``ref``, fetching and verifying it if needed."""
        if not isinstance(ref, str) or not ref.strip() or any(ord(c) < 32 or ord(c) == 127 for c in ref):
            raise ValidationError(
                field, "is empty or has control characters", "give file://, https:// or an OCI ref"
            )
        if "://" in ref and not ref.startswith(("file:", "https://", "http://", "docker://")):
            raise ValidationError(
                field,
                f"unsupported scheme in {ref!r}",
                "use file://, https://...#sha256=, or an OCI image reference",
            )
        kind = "file" if ref.startswith("file:") else "oci"
        if ref.startswith(("https://", "http://")):
            kind = "https"
        self._local.fetched = False
        try:
            if kind == "file":
                img = self._resolve_file(ref, field)
            elif kind == "https":
                img = self._resolve_url(ref, field, progress)
            else:
                img = self._resolve_container_disk(ref, field)
        except VMError:
            image_metrics.RESOLUTIONS.labels(kind, "failed").inc()
            raise
        image_metrics.RESOLUTIONS.labels(kind, "fetched" if self._local.fetched else "cached").inc()
        return img

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.removeprefix("sha256:")

    # -- file://
    def _resolve_file(self, ref: str, field: str) -> BaseImage:
        u = urllib.parse.urlparse(ref)
        if u.netloc not in ("", "localhost"):
            raise ValidationError(field, f"file URL {ref!r} names a host", "use file:///absolute/path")
        raw = urllib.parse.unquote(u.path)
        if not raw.startswith("/") or ".." in Path(raw).parts or "\x00" in raw:
            raise ValidationError(
                field, f"{raw!r} is not a clean absolute path", "use file:///abs/path without '..'"
            )
        if not self.file_roots:
            raise ValidationError(
                field,
                "file:// images are disabled on this node",
                "ask its administrator (kvm option image_roots)",
            )
        real = Path(os.path.realpath(raw))
        if not any(real == r or r in real.parents for r in self.file_roots):
            raise ValidationError(
                field,
                f"{raw!r} is outside the node's image roots (after resolving symlinks)",
                "use an image under the node's image roots (kvm option image_roots)",
                detail=f"{raw} resolves to {real}; roots: {', '.join(map(str, self.file_roots))}",
            )
        if not real.is_file():
            raise ValidationError(field, f"{raw!r} is not a regular file", "point at an existing disk image")
        st = real.stat()
        key = f"file:{real}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        cached = self._lookup_ref(key)
        if cached:
            return cached
        with open(real, "rb") as src:
            return self._ingest(lambda dst: _hash_copy(src, dst), key, ref, field, None, st.st_size)

    # -- https://
    def _resolve_url(self, ref: str, field: str, progress: Progress | None) -> BaseImage:
        url, _, frag = ref.partition("#")
        if ref.startswith("http://") and not self.allow_http:
            raise ValidationError(field, "plain http is not allowed", "use https://...#sha256=<hex>")
        m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", frag)
        if not m:
            raise ValidationError(
                field,
                f"{url!r} has no '#sha256=<64 hex digits>' fragment",
                "append the image's sha256 digest",
            )
        expected = m.group(1).lower()
        key = f"url:{url}#sha256={expected}"  # the cache answers this URL with this digest only
        cached = self._lookup_ref(key) or self._lookup_ref(f"url:{url}", digest=expected)
        if cached:  # (the second: recorded by an edgevirt that keyed https images by URL alone)
            return cached

        def fetch(dst: IO[bytes]) -> str:
            return https_fetch.download(
                url,
                dst,
                op=self.opener,
                max_bytes=self.max_image_bytes,
                timeout=self.fetch_timeout,
                read_timeout=self.timeout,
                progress=progress,
            )

        return self._ingest(fetch, key, ref, field, expected, None)

    # -- containerDisk
    def _resolve_container_disk(self, ref: str, field: str) -> BaseImage:
        oref = parse_reference(ref, field)
        pinned = f"oci:{oref.name}@{oref.digest}" if oref.digest else None
        cached = self._lookup_ref(pinned) if pinned else None
        if cached:  # a digest reference taken out before: no need to ask containerd
            return dataclasses.replace(cached, ref=ref)
        # a tag can move: the cache key is the manifest digest the reference points at right now
        manifest = self.container_disks.inspect(oref, self.fetch_timeout)
        key = f"oci:{oref.name}@{manifest.digest}" if manifest else None
        cached = self._lookup_ref(key) if key else None
        if cached:
            return dataclasses.replace(cached, ref=ref)
        if manifest and manifest.layer_bytes > self.max_image_bytes:
            raise ImageError(
                f"{ref} is {format_bytes(manifest.layer_bytes)}, over this node's limit of "
                f"{format_bytes(self.max_image_bytes)} per image (kvm option max_image_bytes)"
            )
        self.limits.check_free(field, self.tmp, manifest.layer_bytes if manifest else 0)
        fd, tmpname = tempfile.mkstemp(dir=self.tmp, prefix="disk-")
        os.close(fd)
        tmp = Path(tmpname)
        try:
            at = dataclasses.replace(oref, digest=manifest.digest) if manifest else oref
            sha = self.container_disks.fetch_disk(at, tmp, self.max_image_bytes, self.fetch_timeout)
            keys = [k for k in (key, pinned) if k]
            if sha is not None:  # hashed while written: moved into the cache as it is
                img = self._adopt(tmp, sha, keys[0] if keys else None, ref, field)
            else:
                with open(tmp, "rb") as src:
                    size = tmp.stat().st_size
                    img = self._ingest(
                        lambda dst: _hash_copy(src, dst), keys[0] if keys else None, ref, field, None, size
                    )
            for k in keys[1:]:
                self._record(k, ref, img.digest.removeprefix("sha256:"), field)
            return img
        finally:
            tmp.unlink(missing_ok=True)

    # -- cache
    def _ingest(
        self,
        copy: Callable[[IO[bytes]], str],
        key: str | None,
        ref: str,
        field: str,
        expected: str | None,
        total: int | None,
    ) -> BaseImage:
        """Copy into a temporary file (``copy`` returns the sha256), verify, move into the cache."""
        self.limits.check_free(field, self.tmp, total or 0)
        fd, tmpname = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        tmp = Path(tmpname)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = copy(out)
            if expected is not None and digest != expected:
                raise ImageError(
                    f"{field}: the downloaded image does not match the sha256 digest in its reference",
                    detail=f"{ref}: got sha256 {digest}",
                )
            return self._adopt(tmp, digest, key, ref, field)
        finally:
            tmp.unlink(missing_ok=True)

    def _adopt(self, tmp: Path, digest: str, key: str | None, ref: str, field: str) -> BaseImage:
        """Move the verified disk ``tmp`` (sha256 ``digest``) into the cache and record ``key``."""
        check_disk_file(tmp, field)
        tmp.chmod(0o444)
        os.replace(tmp, self.blobs / digest)
        self._local.fetched = True  # (per thread: resolutions run at once)
        return self._record(key, ref, digest, field)

    def _ref_file(self, key: str) -> Path:
        return self.refs / hashlib.sha256(key.encode()).hexdigest()

    def _record(self, key: str | None, ref: str, digest: str, field: str) -> BaseImage:
        path = self.blobs / digest
        fmt, vsize = check_disk_file(path, field)
        img = BaseImage(path=path, format=fmt, digest=f"sha256:{digest}", virtual_size=vsize, ref=ref)
        if key is None:
            return img
        tmp = self._ref_file(key).with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"key": key, "ref": ref, "digest": digest, "format": fmt, "virtual_size": vsize})
        )
        tmp.replace(self._ref_file(key))
        return img

    def _lookup_ref(self, key: str, digest: str | None = None) -> BaseImage | None:
        """The blob recorded for ``key`` (and only if it has ``digest``, when given)."""
        with contextlib.suppress(OSError, ValueError, KeyError):
            d = json.loads(self._ref_file(key).read_text())
            path = self.blobs / d["digest"]
            if d["key"] == key and path.is_file() and digest in (None, d["digest"]):
                return BaseImage(
                    path, d["format"], f"sha256:{d['digest']}", int(d["virtual_size"]), d.get("ref", key)
                )
        return None
