"""The disk of a containerDisk, taken from its layers in one pass, every layer verified by its digest.

A containerDisk is an OCI image holding one regular file under ``/disk/`` (KubeVirt's convention).
:func:`extract_disk` reads the layers in order, each exactly once, as a stream: a ``/disk/`` file
is written to a temporary file next to ``dest`` (hashed while written, zero blocks left as holes so
a raw disk stays sparse), a later layer's file of the same name replaces it, and whiteouts
(``.wh.<name>``, the opaque ``.wh..wh..opq``) remove what lower layers had. A layer is verified
against its digest and size as it is read (:class:`VerifiedReader`): the whole blob, also the bytes
after the end of the tar archive. Exactly one file must be left, and it is renamed to ``dest``.

What reads the layers (an OCI layout, containerd's content store) hands in their descriptors and a
way to open a blob; the bytes written are reported to ``progress`` as they go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, cast

from .errors import ImageError
from .sizes import format_bytes

CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
#: bytes written so far (the disk) -> None; called after every chunk
Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Layer:
    """A layer descriptor of a manifest: its digest (``sha256:<hex>``), size and media type."""

    digest: str
    size: int
    media_type: str = ""


@dataclasses.dataclass(frozen=True)
class DiskFile:
    """The extracted disk: its sha256 (hex) and size."""

    sha256: str
    size: int


class VerifiedReader:
    """A read-only stream over a blob that hashes what is read; :meth:`finish` reads the rest and
    raises :class:`ImageError` unless the blob has exactly the digest and size of its descriptor."""

    def __init__(self, raw: IO[bytes], layer: Layer, what: str) -> None:
        self._raw = raw
        self._layer = layer
        self._what = what
        self._hash = hashlib.sha256()
        self._read = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self._read += len(data)
        if self._read > self._layer.size:
            raise self._mismatch("is larger than its descriptor says")
        return data

    def _mismatch(self, problem: str) -> ImageError:
        return ImageError(
            f"{self._what}: a blob of the image {problem}; the image store holds damaged or altered "
            "content (remove the image and pull it again)",
            detail=f"blob {self._layer.digest}: read {self._read} of {self._layer.size} bytes",
        )

    def finish(self) -> None:
        while self.read(CHUNK):
            pass
        if self._read != self._layer.size:
            raise self._mismatch("is shorter than its descriptor says")
        if f"sha256:{self._hash.hexdigest()}" != self._layer.digest:
            raise self._mismatch("does not match its digest")


def disk_member_name(name: str) -> str | None:
    """'disk/x.qcow2' or './disk/x.qcow2' -> 'x.qcow2'; anything else -> None."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if len(parts) == 2 and parts[0] == "disk" and parts[1] != "..":
        return parts[1]
    return None


def _open_tar(stream: VerifiedReader, layer: Layer, what: str) -> tarfile.TarFile:
    if "zstd" in layer.media_type:
        raise ImageError(
            f"{what}: a layer of the containerDisk is zstd-compressed; rebuild it with gzip layers"
        )
    try:
        return tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|*")  # a stream: read once, in order
    except tarfile.TarError as e:
        raise ImageError(f"{what}: a layer of the image is not a tar archive", detail=str(e)) from None


@dataclasses.dataclass
class _Writer:
    """Writes one /disk/ file into a temporary file: hashed, sparse, within the size cap and deadline."""

    dest_dir: Path
    max_bytes: int | None
    deadline: float | None
    progress: Progress | None
    what: str
    written: int = 0  # by every file of this extraction

    def write(self, src: IO[bytes], size: int) -> tuple[Path, DiskFile]:
        if self.max_bytes is not None and size > self.max_bytes:
            raise ImageError(
                f"{self.what}: the disk in the image is {format_bytes(size)}, over this node's limit of "
                f"{format_bytes(self.max_bytes)} per image (kvm option max_image_bytes)"
            )
        fd, name = tempfile.mkstemp(dir=self.dest_dir, prefix=".disk-")
        path, h, done = Path(name), hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    if chunk == ZEROS[: len(chunk)]:
                        out.seek(len(chunk), os.SEEK_CUR)  # a hole: raw disks stay sparse
                    else:
                        out.write(chunk)
                    done += len(chunk)
                    self.written += len(chunk)
                    self._check_deadline()
                    if self.progress is not None:
                        self.progress(self.written)
                out.truncate(done)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, DiskFile(h.hexdigest(), done)

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ImageError(
                f"{self.what}: taking the disk out of the image took too long "
                "(kvm option image_fetch_timeout_s)"
            )


def _apply_layer(tf: tarfile.TarFile, files: dict[str, tuple[Path, DiskFile]], w: _Writer) -> None:
    """Apply one layer's /disk/ entries to ``files`` (name -> temporary file)."""
    added: set[str] = set()

    def drop(name: str) -> None:
        old = files.pop(name, None)
        if old is not None:
            old[0].unlink(missing_ok=True)

    for m in tf:
        base = disk_member_name(m.name)
        if base is None:
            continue
        if base == ".wh..wh..opq":  # the lower layers' /disk/ is hidden, this layer's files stay
            for name in [n for n in files if n not in added]:
                drop(name)
        elif base.startswith(".wh."):
            drop(base[4:])
        elif m.isreg():
            src = tf.extractfile(m)
            if src is None:
                raise ImageError(f"{w.what}: cannot read /disk/{base} from the image")
            made = w.write(src, m.size)
            drop(base)
            files[base] = made
            added.add(base)
        else:
            drop(base)


def extract_disk(
    layers: Iterable[Layer],
    open_blob: Callable[[Layer], IO[bytes]],
    dest: Path,
    *,
    what: str,
    max_bytes: int | None = None,
    deadline: float | None = None,
    progress: Progress | None = None,
) -> DiskFile:
    """Write the one regular file under /disk/ of the image made of ``layers`` (in order) to ``dest``
    (a new file; left absent on any error). ``open_blob`` opens a layer's blob; ``what`` names the
    image in errors. Raises :class:`ImageError`."""
    files: dict[str, tuple[Path, DiskFile]] = {}
    w = _Writer(dest.parent, max_bytes, deadline, progress, what)
    try:
        for layer in layers:
            with open_blob(layer) as raw:
                stream = VerifiedReader(raw, layer, what)
                with _open_tar(stream, layer, what) as tf:
                    try:
                        _apply_layer(tf, files, w)
                    except (tarfile.TarError, EOFError, OSError) as e:
                        raise ImageError(
                            f"{what}: a layer of the image cannot be read", detail=str(e)
                        ) from None
                stream.finish()
        if len(files) != 1:
            raise ImageError(
                f"{what}: a containerDisk must hold exactly one regular file under /disk/, found "
                f"{sorted(files) or 'none'}"
            )
        ((path, disk),) = files.values()
        os.replace(path, dest)
        files.clear()
        return disk
    finally:
        for path, _ in files.values():
            with contextlib.suppress(OSError):
                path.unlink()
