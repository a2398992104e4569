"""OCI containerDisks: registry references only, fetched with skopeo, the disk taken from the layers.

A containerDisk is an OCI image holding one regular file under ``/disk/`` (KubeVirt's convention).
Its reference must be a registry reference (:func:`parse_reference`, the grammar of
distribution/reference): ``host[:port]/repo[:tag][@sha256:<hex>]``, a Docker Hub short name
(``alpine:3.20`` is ``docker.io/library/alpine:3.20``, as kubelet reads it), or the same behind
``docker://``. Every other skopeo transport (``oci:``, ``oci-archive:``, ``docker-archive:``,
``dir:``, ``containers-storage:``, ``docker-daemon:``, ...) would read the node's own files or
daemons, so it is refused before anything runs; skopeo only ever sees ``docker://<canonical ref>``.

:class:`SkopeoSource` asks the registry what a reference points at (``skopeo inspect``: the manifest
digest and the layers' sizes, refused over the size cap before any layer is fetched), copies it into
an OCI layout in a temporary folder of the image store (also skopeo's ``TMPDIR``, so a failed copy
leaves nothing in ``/var/tmp``) and extracts the disk (:func:`extract_disk_from_oci_layout`); every
skopeo run has a deadline.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from .errors import ImageError, ValidationError
from .sizes import format_bytes

SHA256_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20
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
    """Gets the disk of a containerDisk: what a reference points at (None: cannot tell now), and the
    disk file into ``dest`` (a new file) within ``max_bytes`` and ``timeout`` seconds."""

    def inspect(self, ref: OciRef, timeout: float) -> Manifest | None: ...

    def fetch_disk(self, ref: OciRef, dest: Path, max_bytes: int, timeout: float) -> None: ...


# ---------------------------------------------------------------- OCI layouts
def _layer_members(layer: Path, media_type: str) -> tarfile.TarFile:
    if "zstd" in media_type:
        raise ImageError("a layer of the containerDisk is zstd-compressed; rebuild it with gzip layers")
    return tarfile.open(layer, "r:*")


def _disk_member_name(name: str) -> str | None:
    """'disk/x.qcow2' or './disk/x.qcow2' -> 'x.qcow2'; anything else -> None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) == 2 and parts[0] == "disk" and parts[1] not in ("..",):
        return parts[1]
    return None


def _pick_manifest(layout: Path, tag: str | None) -> tuple[dict[str, object], str]:
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
    manifest = json.loads(_blob(layout, mdesc["digest"]).read_text())
    if "manifests" in manifest:  # an index: take the linux/amd64 (or first) entry
        cands = manifest["manifests"]
        pick = next((m for m in cands if m.get("platform", {}).get("architecture") == "amd64"), cands[0])
        manifest = json.loads(_blob(layout, pick["digest"]).read_text())
    return manifest, str(mdesc["digest"])


def _blob(layout: Path, digest: str) -> Path:
    algo, _, hexd = str(digest).partition(":")
    if algo != "sha256" or not SHA256_RE.fullmatch(hexd):
        raise ImageError("the image names a digest that is not sha256")
    return layout / "blobs" / "sha256" / hexd


def extract_disk_from_oci_layout(
    layout: Path, dest: Path, tag: str | None = None, max_bytes: int | None = None
) -> str:
    """Write the single regular file under /disk/ of the image in an OCI layout to ``dest`` (at most
    ``max_bytes``). Returns the manifest digest. Layers are applied in order (whiteouts honoured)."""
    manifest, digest = _pick_manifest(layout, tag)
    owner: dict[str, tuple[Path, str, str, int]] = {}  # disk file -> the layer holding its last version
    layers = manifest.get("layers", [])
    for layer in layers if isinstance(layers, list) else []:
        path = _blob(layout, layer["digest"])
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
                    owner[base] = (path, layer.get("mediaType", ""), m.name, m.size)
                else:
                    owner.pop(base, None)
    if len(owner) != 1:
        raise ImageError(
            f"containerDisk must hold exactly one regular file under /disk/, found {sorted(owner) or 'none'}"
        )
    (path, media, member, size) = next(iter(owner.values()))
    if max_bytes is not None and size > max_bytes:
        raise ImageError(f"the disk in the image is {format_bytes(size)}, over this node's limit of "
                         f"{format_bytes(max_bytes)} per image (kvm option max_image_bytes)")  # fmt: skip
    with _layer_members(path, media) as tf:
        src = tf.extractfile(member)
        if src is None:
            raise ImageError(f"cannot read /disk/{Path(member).name} from the image")
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
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


# ---------------------------------------------------------------- skopeo
class SkopeoSource:
    """containerDisk fetcher: ``skopeo inspect`` / ``skopeo copy docker://<ref> oci:<tmp>:disk``."""

    def __init__(self, insecure_registries: Iterable[str] = ("127.0.0.1:5000", "localhost:5000")) -> None:
        self.insecure = set(insecure_registries)

    def _run(self, argv: list[str], tmp: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TMPDIR": str(tmp)}  # skopeo's big temporary files: /var/tmp otherwise
        cmd = ["skopeo", "--command-timeout", f"{max(1, int(timeout))}s", *argv]
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=timeout + 5, env=env
            )
        except subprocess.TimeoutExpired:
            raise ImageError(
                f"fetching the image took over {int(timeout)}s (kvm option image_fetch_timeout_s)"
            ) from None

    def _tls(self, ref: OciRef, flag: str) -> list[str]:
        return [f"{flag}=false"] if ref.registry in self.insecure else []

    def inspect(self, ref: OciRef, timeout: float = 60.0) -> Manifest | None:
        """What ``ref`` points at now (None when the registry does not say)."""
        with tempfile.TemporaryDirectory(prefix="edgevirt-skopeo-") as tmp:
            r = self._run(
                ["inspect", *self._tls(ref, "--tls-verify"), "--", f"docker://{ref}"], Path(tmp), timeout
            )
        if r.returncode != 0:
            return None
        try:
            out = json.loads(r.stdout)
            digest = str(out["Digest"])
            sizes = [int(layer.get("Size") or 0) for layer in out.get("LayersData") or []]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if not (digest.startswith("sha256:") and SHA256_RE.fullmatch(digest[7:])):
            return None
        return Manifest(digest, sum(sizes))

    def fetch_disk(self, ref: OciRef, dest: Path, max_bytes: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with tempfile.TemporaryDirectory(prefix=".oci-", dir=dest.parent) as tmp:
            argv = ["copy", "--quiet", *self._tls(ref, "--src-tls-verify"), "--", f"docker://{ref}",
                    f"oci:{tmp}/layout:disk"]  # fmt: skip
            r = self._run(argv, Path(tmp), timeout)
            if r.returncode != 0:
                raise ImageError(
                    f"cannot fetch {ref} from its registry (missing, not allowed, or the registry is down)",
                    detail=f"skopeo copy docker://{ref}: {r.stderr.strip()[-1000:]}",
                )
            if time.monotonic() > deadline:
                raise ImageError(
                    f"fetching the image took over {int(timeout)}s (kvm option image_fetch_timeout_s)"
                )
            extract_disk_from_oci_layout(Path(tmp) / "layout", dest, tag="disk", max_bytes=max_bytes)
