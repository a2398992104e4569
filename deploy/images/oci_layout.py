"""Reproducible OCI image pieces: layer tarballs, the config, the manifest, an OCI image layout.

Same input tree and epoch, same bytes: entries in sorted order (a directory before its contents),
every mtime set to the epoch, owners numeric (uname/gname empty), hard links as links to the first
path, PAX format, gzip with mtime 0 and no file name. JSON is written with sorted keys and no spaces.
Layers are cached in <cache>/layers/<key>.tar.gz with their digests in <key>.json, so a rebuild with
the same inputs only writes the config and the manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"


@dataclass
class Layer:
    path: str  # the .tar.gz blob
    digest: str  # sha256:... of the compressed blob
    diff_id: str  # sha256:... of the tar
    size: int  # compressed bytes
    tar_size: int  # uncompressed bytes
    created_by: str


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to `out` (None: discard)."""

    def __init__(self, out) -> None:
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _tarinfo(root: Path, rel: str, epoch: int, owner: tuple[int, int] | None, links: dict) -> tarfile.TarInfo:
    st = os.lstat(root / rel)
    info = tarfile.TarInfo(rel)
    info.mtime = epoch
    info.uid, info.gid = owner if owner is not None else (st.st_uid, st.st_gid)
    info.uname = info.gname = ""
    info.mode = stat.S_IMODE(st.st_mode)
    if owner is not None:  # a tree staged by the build: normalise modes too
        info.mode = 0o755 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o644
    if stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(root / rel)
    elif stat.S_ISREG(st.st_mode):
        first = links.setdefault((st.st_dev, st.st_ino), rel) if st.st_nlink > 1 else rel
        if first != rel:
            info.type, info.linkname = tarfile.LNKTYPE, first
        else:
            info.type, info.size = tarfile.REGTYPE, st.st_size
    else:
        raise ValueError(f"{root / rel}: a device, fifo or socket cannot go into a layer (drop it)")
    return info


def write_layer(root: Path, paths: Iterable[str], out: Path, epoch: int, created_by: str,
                owner: tuple[int, int] | None = None) -> Layer:  # fmt: skip
    """Write `paths` (relative to `root`, sorted) as a gzip'd tar layer to `out`. `owner` forces
    uid/gid (and normalised modes) for trees staged by the build."""
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    links: dict = {}
    with open(tmp, "wb") as f:
        blob = _HashingWriter(f)
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=blob, mtime=0) as gz:  # type: ignore[arg-type]
            tar_stream = _HashingWriter(gz)
            with tarfile.open(fileobj=tar_stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for rel in paths:
                    info = _tarinfo(root, rel, epoch, owner, links)
                    if info.type == tarfile.REGTYPE:
                        with open(root / rel, "rb") as content:
                            tar.addfile(info, content)
                    else:
                        tar.addfile(info)
    os.replace(tmp, out)
    return Layer(str(out), f"sha256:{blob.sha.hexdigest()}", f"sha256:{tar_stream.sha.hexdigest()}",
                 blob.size, tar_stream.size, created_by)  # fmt: skip


def cached_layer(cache: Path, key: str, build) -> tuple[Layer, bool]:
    """The layer cached under `key`, or `build(path)` -> Layer stored there. (layer, was_cached)"""
    d = cache / "layers"
    meta = d / f"{key}.json"
    if meta.is_file():
        layer = Layer(**json.loads(meta.read_text()))
        if Path(layer.path).is_file() and Path(layer.path).stat().st_size == layer.size:
            return layer, True
    d.mkdir(parents=True, exist_ok=True)
    layer = build(d / f"{key}.tar.gz")
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_text(json.dumps(asdict(layer), indent=1))
    os.replace(tmp, meta)
    return layer, False


def iso_time(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def image_config(layers: list[Layer], epoch: int, user: str, env: list[str], cmd: list[str],
                 labels: dict[str, str]) -> dict:  # fmt: skip
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": iso_time(epoch),
        "config": {"User": user, "Env": env, "Cmd": cmd, "WorkingDir": "/", "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created": iso_time(epoch), "created_by": layer.created_by} for layer in layers],
    }


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_layout(dest: Path, layers: list[Layer], config: dict, ref: str, annotations: dict[str, str]) -> str:
    """An OCI image layout in `dest` (replaced) holding one image tagged `ref`; returns the
    manifest digest."""
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blobs/sha256").mkdir(parents=True)
    (tmp / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": "1.0.0"}))
    for layer in layers:
        target = tmp / "blobs/sha256" / layer.digest.split(":", 1)[1]
        try:
            os.link(layer.path, target)
        except OSError:
            shutil.copyfile(layer.path, target)
    config_digest, config_size = _put_blob(tmp, canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": la.digest, "size": la.size} for la in layers],
        "annotations": annotations,
    }
    manifest_digest, manifest_size = _put_blob(tmp, canonical_json(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [
            {
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": manifest_digest,
                "size": manifest_size,
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (tmp / "index.json").write_bytes(canonical_json(index))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return manifest_digest


def push(layout: Path, ref: str, target: str, tls_verify: bool) -> str:
    """skopeo copy of the image `ref` in `layout` to docker://`target`, digests preserved; returns the
    digest the registry stored."""
    digest_file = layout.parent / f".{layout.name}.pushed-digest"
    argv = [
        "skopeo", "copy", "--quiet", "--preserve-digests", f"--dest-tls-verify={str(tls_verify).lower()}",
        "--digestfile", str(digest_file), f"oci:{layout}:{ref}", f"docker://{target}",
    ]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"skopeo copy to {target} failed: {r.stderr.strip()[-2000:]}")
    try:
        return digest_file.read_text().strip()
    finally:
        digest_file.unlink(missing_ok=True)
