"""OCI containerDisks: registry references only; the disk taken from the image's layers.

A containerDisk is an OCI image holding one regular file under ``/disk/`` (KubeVirt's convention).
Its reference must be a registry reference (:func:`parse_reference`, the grammar of
distribution/reference): ``host[:port]/repo[:tag][@sha256:<hex>]``, a Docker Hub short name
(``alpine:3.20`` is ``docker.io/library/alpine:3.20``, as kubelet reads it), or the same behind
``docker://``. Every other transport of skopeo's and containers/image's (``oci:``, ``oci-archive:``,
``docker-archive:``, ``dir:``, ``containers-storage:``, ``docker-daemon:``, ...) would read the node's
own files or daemons, so it is refused by name before anything runs.

Where the image comes from is a :class:`ContainerDiskSource`: on a node, containerd's image store
(:mod:`.containerd_source`; kubelet pulled the image already, and an image it did not pull is pulled
through containerd). :func:`extract_disk_from_oci_layout` takes the disk out of an OCI layout (tests,
and what built the image), every blob verified (:mod:`.disk_layers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

from .disk_layers import Layer, extract_disk
from .errors import ImageError, ValidationError

SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: skopeo transports other than docker://: all refused (they name files or daemons of the node)
OTHER_TRANSPORTS = (
    "oci",
    "oci-archive",
    "docker-archive",
    "dir",
    "containers-storage",
    "docker-daemon",
    "ostree",
    "sif",
    "tarball",
    "atomic",
)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]{{1,5}})?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
DOMAIN_RE = re.compile(_DOMAIN)
PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
MAX_NAME = 255
DOCKER_HUB = "docker.io"


@dataclasses.dataclass(frozen=True)
class OciRef:
    """A registry reference, normalised: registry, repository, and a tag or a digest (or both)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def _bad(field: str, ref: str, problem: str) -> ValidationError:
    return ValidationError(
        field,
        f"{ref!r} {problem}",
        "give a registry reference such as registry.example/vm/disk:1 or "
        "registry.example/vm/disk@sha256:<digest> (docker:// allowed), file:///... under the node's "
        "image roots, or https://...#sha256=<digest>",
    )


def parse_reference(ref: str, field: str = "image") -> OciRef:
    """A registry reference -> :class:`OciRef`; ValidationError for anything else (other skopeo
    transports by name)."""
    transport, sep, _ = ref.partition(":")
    if sep and transport in OTHER_TRANSPORTS:
        raise _bad(field, ref, f"uses skopeo transport {transport!r}, which the kvm handler does not allow")
    raw = ref.removeprefix("docker://")
    if len(raw) > MAX_NAME + 80 or any(c.isspace() for c in raw):
        raise _bad(field, ref, "is not a registry reference")
    name, _, digest = raw.partition("@")
    if digest and not (digest.startswith("sha256:") and SHA256_RE.fullmatch(digest[7:])):
        raise _bad(field, ref, "has a digest that is not sha256:<64 lower-case hex digits>")
    tag = None
    slash, colon = name.rfind("/"), name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not TAG_RE.fullmatch(tag):
            raise _bad(field, ref, "has an invalid tag")
    first, slash_, rest = name.partition("/")
    if slash_ and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, name
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if not DOMAIN_RE.fullmatch(registry) or not PATH_RE.fullmatch(path):
        raise _bad(field, ref, "is not a registry reference")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if len(f"{registry}/{path}") > MAX_NAME:
        raise _bad(field, ref, f"names a repository longer than {MAX_NAME} characters")
    return OciRef(registry, path, tag if tag or digest else "latest", digest or None)


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a reference points at now: the manifest digest and the size of its layers."""

    digest: str  # "sha256:<hex>"
    layer_bytes: int


class ContainerDiskSource(Protocol):
    """Gets the disk of a containerDisk.

    * ``inspect``: what a reference points at now (None: cannot tell now);
    * ``fetch_disk``: the disk file into ``dest`` (a new file) within ``max_bytes`` and ``timeout``
      seconds; the image store passes the reference pinned to the digest ``inspect`` answered. It
      returns the sha256 (hex) of what it wrote when it hashed it on the way (the store then need not
      read the disk again), else None."""

    def inspect(self, ref: OciRef, timeout: float) -> Manifest | None: ...

    def fetch_disk(self, ref: OciRef, dest: Path, max_bytes: int, timeout: float) -> str | None: ...


# ---------------------------------------------------------------- OCI layouts
def _blob(layout: Path, digest: object) -> Path:
    algo, _, hexd = str(digest).partition(":")
    if algo != "sha256" or not SHA256_RE.fullmatch(hexd):
        raise ImageError("the image names a digest that is not sha256")
    return layout / "blobs" / "sha256" / hexd


def _json_blob(layout: Path, digest: object) -> dict[str, Any]:
    data = _blob(layout, digest).read_bytes()
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise ImageError("a manifest of the image does not match its digest", detail=f"{layout}: {digest}")
    out: dict[str, Any] = json.loads(data)
    return out


def _pick_manifest(layout: Path, tag: str | None) -> tuple[dict[str, Any], str]:
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise ImageError(
            "the fetched image is not an OCI layout", detail=f"{layout}/index.json: {e}"
        ) from None
    manifests = index.get("manifests", [])
    if tag is not None:
        manifests = [
            m for m in manifests if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
        ] or manifests
    if not manifests:
        raise ImageError("the image holds no manifest")
    mdesc = manifests[0]
    manifest = _json_blob(layout, mdesc["digest"])
    if "manifests" in manifest:  # an index: take the linux/amd64 (or first) entry
        cands = manifest["manifests"]
        pick = next((m for m in cands if m.get("platform", {}).get("architecture") == "amd64"), cands[0])
        manifest = _json_blob(layout, pick["digest"])
    return manifest, str(mdesc["digest"])


def layers_of(manifest: dict[str, Any]) -> list[Layer]:
    """The layer descriptors of an image manifest (sha256 digests only)."""
    out = []
    layers = manifest.get("layers")
    for d in layers if isinstance(layers, list) else []:
        if not isinstance(d, dict):
            raise ImageError("the image's manifest has a malformed layer descriptor")
        digest, size = str(d.get("digest", "")), d.get("size")
        if not (digest.startswith("sha256:") and SHA256_RE.fullmatch(digest[7:])):
            raise ImageError("the image names a digest that is not sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ImageError("the image's manifest has a layer without a size")
        out.append(Layer(digest, size, str(d.get("mediaType", ""))))
    return out


def extract_disk_from_oci_layout(
    layout: Path, dest: Path, tag: str | None = None, max_bytes: int | None = None
) -> str:
    """Write the single regular file under /disk/ of the image in an OCI layout to ``dest`` (at most
    ``max_bytes``; every blob verified). Returns the manifest digest (:func:`.disk_layers.extract_disk`)."""
    manifest, digest = _pick_manifest(layout, tag)
    extract_disk(
        layers_of(manifest),
        lambda layer: open(_blob(layout, layer.digest), "rb"),  # noqa: SIM115 (extract_disk closes it)
        dest,
        what="the image",
        max_bytes=max_bytes,
    )
    return digest


def extract_disk_from_rootfs(rootfs: Path, dest: Path) -> None:
    """Copy the single regular file under ``rootfs/disk/`` (an unpacked image) to ``dest``."""
    d = rootfs / "disk"
    try:
        files = [p for p in d.iterdir() if p.is_file() and not p.is_symlink()]
    except OSError as e:
        raise ImageError("unpacked containerDisk has no /disk directory", detail=str(e)) from None
    if len(files) != 1:
        raise ImageError(f"containerDisk must hold exactly one regular file under /disk/, found {len(files)}")
    shutil.copyfile(files[0], dest)
