"""Image store: resolve a VM image reference to a verified local base disk in a content-addressed cache.

Reference forms (the ``image`` field of a VirtualMachine or a kvm pod):

* ``file:///abs/path.qcow2`` - must lie under one of the allowed image roots after resolving
  symlinks; ``..`` is rejected outright.
* ``https://host/path.img#sha256=<64 hex>`` - downloaded, hashed while streaming, kept only if the
  digest matches. Plain ``http://`` only when the store was built with ``allow_http=True`` (tests).
* anything else is an OCI "containerDisk" reference (``registry/repo:tag``, ``docker://...``,
  ``oci:/layout/dir:tag``): the one regular file under ``/disk/`` in the image. Fetching is behind
  :class:`ContainerDiskSource`; :class:`SkopeoSource` copies the image to a local OCI layout with
  ``skopeo copy`` and extracts the disk from its layers, :func:`extract_disk_from_rootfs` takes it
  from an image that is already unpacked (e.g. a containerd snapshot mount). The cache is keyed by
  the manifest digest the reference resolves to (``skopeo inspect``), so a tag is re-fetched only
  when it moved.

Every base disk is checked with ``qemu-img info``: format raw or qcow2 and no backing file (a qcow2
that names a backing file could make QEMU read any host file). Blobs live at
``<state>/images/blobs/sha256/<hex>``; ``refs/`` remembers which reference gave which blob.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any, Protocol

from .errors import ImageError, ValidationError

SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class BaseImage:
    """A verified base disk in the cache."""

    path: Path
    format: str
    digest: str
    virtual_size: int
    ref: str


def qemu_img_info(path: Path) -> dict[str, Any]:
    r = subprocess.run(
        ["qemu-img", "info", "--output=json", "--force-share", "--", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise ImageError(f"qemu-img info {path} failed: {r.stderr.strip()}")
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
            f"the qcow2 image names a backing file ({info.get('backing-filename')!r})",
            "flatten it with 'qemu-img convert -O qcow2' first",
        )
    return fmt, int(info.get("virtual-size", 0))


def _hash_copy(src: IO[bytes], dst: IO[bytes], total: int | None, progress: Progress | None) -> str:
    h = hashlib.sha256()
    done = 0
    while chunk := src.read(CHUNK):
        h.update(chunk)
        dst.write(chunk)
        done += len(chunk)
        if progress:
            progress(done, total)
    return h.hexdigest()


class ContainerDiskSource(Protocol):
    """Gets the disk file of an OCI containerDisk image into ``dest`` (a new file path), and may tell
    the manifest digest a reference points at now (``None``: unknown, always fetch)."""

    def fetch_disk(self, ref: str, dest: Path, progress: Progress | None = None) -> None: ...

    def manifest_digest(self, ref: str) -> str | None: ...


def _layer_members(layer: Path, media_type: str) -> tarfile.TarFile:
    if "zstd" in media_type:
        raise ImageError(f"layer {layer.name} is zstd-compressed; rebuild the containerDisk with gzip layers")
    return tarfile.open(layer, "r:*")


def _disk_member_name(name: str) -> str | None:
    """'disk/x.qcow2' or './disk/x.qcow2' -> 'x.qcow2'; anything else -> None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) == 2 and parts[0] == "disk" and parts[1] not in ("..",):
        return parts[1]
    return None


def extract_disk_from_oci_layout(layout: Path, dest: Path, tag: str | None = None) -> str:
    """Write the single regular file under /disk/ of the image in an OCI layout to ``dest``.
    Returns the manifest digest. Layers are applied in order (whiteouts honoured)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise ImageError(f"{layout} is not an OCI layout (index.json: {e})") from None
    manifests = index.get("manifests", [])
    if tag is not None:
        manifests = [
            m for m in manifests if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        ] or manifests
    if not manifests:
        raise ImageError(f"OCI layout {layout} holds no image")
    mdesc = manifests[0]

    def blob(digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or not SHA256_RE.fullmatch(hexd):
            raise ImageError(f"unsupported digest {digest!r} in {layout}")
        return layout / "blobs" / "sha256" / hexd

    manifest = json.loads(blob(mdesc["digest"]).read_text())
    if "manifests" in manifest:  # an index: take the linux/amd64 (or first) entry
        cands = manifest["manifests"]
        pick = next((m for m in cands if m.get("platform", {}).get("architecture") == "amd64"), cands[0])
        manifest = json.loads(blob(pick["digest"]).read_text())
    # which layer holds the final version of each disk file
    owner: dict[str, tuple[Path, str, str]] = {}
    for layer in manifest.get("layers", []):
        path = blob(layer["digest"])
        with _layer_members(path, layer.get("mediaType", "")) as tf:
            for m in tf:
                base = _disk_member_name(m.name)
                if base is None:
                    continue
                if base == ".wh..wh..opq":
                    owner.clear()
                elif base.startswith(".wh."):
                    owner.pop(base[4:], None)
                elif m.isreg():
                    owner[base] = (path, layer.get("mediaType", ""), m.name)
                else:
                    owner.pop(base, None)
    if len(owner) != 1:
        raise ImageError(
            f"containerDisk must hold exactly one regular file under /disk/, found {sorted(owner) or 'none'}"
        )
    (path, media, member) = next(iter(owner.values()))
    with _layer_members(path, media) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise ImageError(f"cannot read {member} from layer {path.name}")
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    return str(mdesc["digest"])


def extract_disk_from_rootfs(rootfs: Path, dest: Path) -> None:
    """Copy the single regular file under ``rootfs/disk/`` (an unpacked image) to ``dest``."""
    d = rootfs / "disk"
    try:
        files = [p for p in d.iterdir() if p.is_file() and not p.is_symlink()]
    except OSError as e:
        raise ImageError(f"unpacked containerDisk has no /disk directory: {e}") from None
    if len(files) != 1:
        raise ImageError(f"containerDisk must hold exactly one regular file under /disk/, found {len(files)}")
    shutil.copyfile(files[0], dest)


class SkopeoSource:
    """containerDisk fetcher: ``skopeo copy <ref> oci:<tmp>:disk``, then extract /disk/ from the layers."""

    def __init__(self, insecure_registries: Iterable[str] = ("127.0.0.1:5000", "localhost:5000")) -> None:
        self.insecure = set(insecure_registries)

    def source_ref(self, ref: str) -> tuple[str, list[str]]:
        """The skopeo transport reference and extra flags for ``ref``."""
        if ref.startswith(("oci:", "oci-archive:", "docker-archive:", "dir:")):
            return ref, []
        if ref.startswith("docker://"):
            ref = ref[len("docker://") :]
        registry = ref.split("/", 1)[0]
        flags = ["--src-tls-verify=false"] if registry in self.insecure else []
        return f"docker://{ref}", flags

    def manifest_digest(self, ref: str) -> str | None:
        """``skopeo inspect`` of the manifest only (no layers); None if that fails."""
        src, flags = self.source_ref(ref)
        flags = [f.replace("--src-tls-verify", "--tls-verify") for f in flags]
        argv = ["skopeo", "inspect", *flags, "--format", "{{.Digest}}", "--", src]
        r = subprocess.run(argv, capture_output=True, text=True, check=False)
        d = r.stdout.strip()
        return d if r.returncode == 0 and d.startswith("sha256:") and SHA256_RE.fullmatch(d[7:]) else None

    def fetch_disk(self, ref: str, dest: Path, progress: Progress | None = None) -> None:
        src, flags = self.source_ref(ref)
        with tempfile.TemporaryDirectory(prefix=".oci-", dir=dest.parent) as tmp:
            argv = ["skopeo", "copy", "--quiet", *flags, "--", src, f"oci:{tmp}/layout:disk"]
            r = subprocess.run(argv, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise ImageError(f"skopeo copy {src} failed: {r.stderr.strip()[-500:]}")
            extract_disk_from_oci_layout(Path(tmp) / "layout", dest, tag="disk")


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
    ) -> None:
        self.root = Path(state_dir) / "images"
        self.blobs = self.root / "blobs" / "sha256"
        self.refs = self.root / "refs"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.refs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.file_roots = [Path(os.path.realpath(r)) for r in file_roots]
        self.container_disks = container_disks if container_disks is not None else SkopeoSource()
        self.ssl_context = ssl_context
        self.allow_http = allow_http
        self.timeout = timeout

    # -- public
    def resolve(self, ref: str, field: str = "image", progress: Progress | None = None) -> BaseImage:
        """Return the cached base disk for ``ref``, fetching and verifying it if needed."""
        if not isinstance(ref, str) or not ref.strip() or any(ord(c) < 32 for c in ref):
            raise ValidationError(
                field, "is empty or has control characters", "give file://, https:// or an OCI ref"
            )
        if ref.startswith("file:"):
            return self._resolve_file(ref, field)
        if ref.startswith(("https://", "http://")):
            return self._resolve_url(ref, field, progress)
        if "://" in ref and not ref.startswith("docker://"):
            raise ValidationError(
                field,
                f"unsupported scheme in {ref!r}",
                "use file://, https://...#sha256=, or an OCI image reference",
            )
        return self._resolve_container_disk(ref, field, progress)

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
                field, "file:// images are disabled on this node", "configure an image root"
            )
        real = Path(os.path.realpath(raw))
        if not any(real == r or r in real.parents for r in self.file_roots):
            roots = ", ".join(map(str, self.file_roots))
            raise ValidationError(
                field,
                f"{raw!r} resolves to {str(real)!r}, outside the allowed image roots",
                f"put it under {roots}",
            )
        if not real.is_file():
            raise ValidationError(field, f"{raw!r} is not a regular file", "point at an existing disk image")
        st = real.stat()
        key = f"file:{real}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        cached = self._lookup_ref(key)
        if cached:
            return cached
        with open(real, "rb") as src:
            return self._ingest(src, key, ref, field, expected=None, total=st.st_size, progress=None)

    # -- https://
    def _resolve_url(self, ref: str, field: str, progress: Progress | None) -> BaseImage:
        url, _, frag = ref.partition("#")
        if ref.startswith("http://") and not self.allow_http:
            raise ValidationError(field, "plain http is not allowed", "use https://...#sha256=<hex>")
        m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", frag)
        if not m:
            raise ValidationError(
                field,
                f"{ref!r} has no '#sha256=<64 hex digits>' fragment",
                "append the image's sha256 digest",
            )
        expected = m.group(1).lower()
        blob = self.blobs / expected
        if blob.exists():
            return self._record(f"url:{url}", ref, expected, field)
        req = urllib.request.Request(url, headers={"User-Agent": "edgevirt-image-store"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self.ssl_context) as resp:
                total = resp.headers.get("Content-Length")
                return self._ingest(
                    resp, f"url:{url}", ref, field, expected, int(total) if total else None, progress
                )
        except urllib.error.URLError as e:
            raise ImageError(f"{field}: download of {url} failed: {e.reason}") from None

    # -- containerDisk
    def _resolve_container_disk(self, ref: str, field: str, progress: Progress | None) -> BaseImage:
        # a tag can move: the cache key is the manifest digest the reference points at right now
        lookup = getattr(self.container_disks, "manifest_digest", None)
        digest = lookup(ref) if callable(lookup) else None
        key = f"oci-manifest:{digest}" if digest else None
        cached = self._lookup_ref(key) if key else None
        if cached:
            return dataclasses.replace(cached, ref=ref)
        fd, tmpname = tempfile.mkstemp(dir=self.tmp, prefix="disk-")
        os.close(fd)
        tmp = Path(tmpname)
        try:
            self.container_disks.fetch_disk(ref, tmp, progress)
            with open(tmp, "rb") as src:
                return self._ingest(src, key or f"oci:{ref}", ref, field, None, tmp.stat().st_size, None)
        finally:
            tmp.unlink(missing_ok=True)

    # -- cache
    def _ingest(
        self,
        src: IO[bytes],
        key: str,
        ref: str,
        field: str,
        expected: str | None,
        total: int | None,
        progress: Progress | None,
    ) -> BaseImage:
        fd, tmpname = tempfile.mkstemp(dir=self.tmp, prefix="blob-")
        tmp = Path(tmpname)
        try:
            with os.fdopen(fd, "wb") as out:
                digest = _hash_copy(src, out, total, progress)
            if expected is not None and digest != expected:
                raise ImageError(f"{field}: sha256 mismatch for {ref}: got {digest}, expected {expected}")
            check_disk_file(tmp, field)
            tmp.chmod(0o444)
            os.replace(tmp, self.blobs / digest)
        finally:
            tmp.unlink(missing_ok=True)
        return self._record(key, ref, digest, field)

    def _ref_file(self, key: str) -> Path:
        return self.refs / hashlib.sha256(key.encode()).hexdigest()

    def _record(self, key: str, ref: str, digest: str, field: str) -> BaseImage:
        path = self.blobs / digest
        fmt, vsize = check_disk_file(path, field)
        img = BaseImage(path=path, format=fmt, digest=f"sha256:{digest}", virtual_size=vsize, ref=ref)
        tmp = self._ref_file(key).with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"key": key, "ref": ref, "digest": digest, "format": fmt, "virtual_size": vsize})
        )
        tmp.replace(self._ref_file(key))
        return img

    def _lookup_ref(self, key: str) -> BaseImage | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            d = json.loads(self._ref_file(key).read_text())
            path = self.blobs / d["digest"]
            if d["key"] == key and path.is_file():
                return BaseImage(
                    path, d["format"], f"sha256:{d['digest']}", int(d["virtual_size"]), d.get("ref", key)
                )
        return None
