"""Unit tests of the image builder's pure parts (deploy/images): the package file, which rootfs paths
go into the image, reproducible layers, and the lock check against the wheel's requirements."""

from __future__ import annotations

import gzip
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy" / "images"))

import image_pydeps
import image_rootfs
import oci_layout


def test_spec_parses_and_names_the_bad_line(tmp_path: Path) -> None:
    good = tmp_path / "good.packages"
    good.write_text("# c\npackage python3  # why\ndrop usr/share/doc/*\nkeep usr/share/doc/*/copyright\n")
    spec = image_rootfs.read_spec(good)
    assert (spec.packages, spec.drop, spec.keep) == (
        ["python3"],
        ["usr/share/doc/*"],
        ["usr/share/doc/*/copyright"],
    )
    bad = tmp_path / "bad.packages"
    bad.write_text("package python3\ninclude foo\n")
    with pytest.raises(image_rootfs.RootfsError, match=r"bad.packages:2: 'include foo'"):
        image_rootfs.read_spec(bad)


def test_selected_paths_drop_and_keep(tmp_path: Path) -> None:
    for rel in (
        "usr/share/doc/a/copyright",
        "usr/share/doc/a/README",
        "usr/share/man/man1/x.1.gz",
        "usr/bin/x",
    ):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    (tmp_path / image_rootfs.COMPLETE).write_text("")
    spec = image_rootfs.Spec(
        "", ["x"], drop=["usr/share/doc/*", "usr/share/man"], keep=["usr/share/doc/*/copyright"]
    )
    assert image_rootfs.selected_paths(tmp_path, spec) == [
        "usr",
        "usr/bin",
        "usr/bin/x",
        "usr/share",
        "usr/share/doc",
        "usr/share/doc/a",
        "usr/share/doc/a/copyright",
    ]


def _tree(root: Path) -> list[str]:
    (root / "d").mkdir(parents=True)
    (root / "d/f").write_text("content")
    (root / "d/f").chmod(0o600)
    os.link(root / "d/f", root / "d/hard")
    (root / "d/link").symlink_to("f")
    return ["d", "d/f", "d/hard", "d/link"]


def test_layers_are_reproducible_and_normalised(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    layers = []
    for root in (a, b):
        paths = _tree(root)
        os.utime(root / "d/f", (1, 1 if root == a else 999))  # the source mtime must not matter
        layers.append(
            oci_layout.write_layer(root, paths, tmp_path / f"{root.name}.tar.gz", 1234, "t", owner=(0, 0))
        )
    assert layers[0].digest == layers[1].digest and layers[0].diff_id == layers[1].diff_id
    data = Path(layers[0].path).read_bytes()
    assert data[4:8] == b"\0\0\0\0"
    with tarfile.open(fileobj=gzip.GzipFile(fileobj=io.BytesIO(data))) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["d", "d/f", "d/hard", "d/link"]
    assert {m.mtime for m in members.values()} == {1234}
    assert members["d/hard"].islnk() and members["d/hard"].linkname == "d/f"
    assert members["d/link"].issym() and members["d/link"].linkname == "f"
    assert members["d/f"].mode == 0o644 and (members["d/f"].uid, members["d/f"].uname) == (0, "")


def _wheel(tmp_path: Path, requires: list[str]) -> Path:
    path = tmp_path / "edgevirt-1.0-py3-none-any.whl"
    meta = "Metadata-Version: 2.4\nName: edgevirt\nVersion: 1.0\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("edgevirt-1.0.dist-info/METADATA", meta)
    return path


def test_lock_check(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path, ["grpcio>=1.85.1,<2", "libvirt-python>=9,<10", 'pytest; extra == "test"'])
    lock = tmp_path / "edgevirt-image.lock"
    lock.write_text("# pins\ngrpcio==1.85.3 \\\n    --hash=sha256:00\n")
    assert image_pydeps.check_lock(wheel, lock) == {"grpcio": "1.85.3"}  # libvirt-python: Debian's
    lock.write_text("grpcio==1.80.0 \\\n    --hash=sha256:00\n")
    with pytest.raises(image_pydeps.LockError, match=r"pins grpcio==1.80.0 .* --relock"):
        image_pydeps.check_lock(wheel, lock)


def test_bytecode_is_unchecked_hash_reproducible_and_names_image_paths(tmp_path: Path) -> None:
    import marshal

    pycs = []
    for name in ("a", "b"):
        src = tmp_path / name / image_pydeps.SITE / "pkg" / "mod.py"
        src.parent.mkdir(parents=True)
        src.write_text("X = {'a', 'b', 'c', 'd'}\n\ndef f(x):\n    return x in {'p', 'q', 'r'}\n")
        os.utime(src, (1, 1 if name == "a" else 999))  # the source mtime must not matter
        image_pydeps.compile_bytecode(tmp_path / name)
        (pyc,) = (src.parent / "__pycache__").glob("mod.cpython-311.pyc")
        pycs.append(pyc.read_bytes())
    assert pycs[0] == pycs[1]
    assert int.from_bytes(pycs[0][4:8], "little") == 0b01  # hash-based, source never checked
    code = marshal.loads(pycs[0][16:])
    assert code.co_filename == f"/{image_pydeps.SITE}/pkg/mod.py"
