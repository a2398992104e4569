#!/usr/bin/env python3
"""Build a bootable test VM disk (MBR + FAT16 + SYSLINUX) and package it as an OCI containerDisk.

The disk holds the test guest of ``build_guest.py`` (kernel + busybox initramfs) and boots it from
disk through SeaBIOS -> syslinux MBR -> syslinux on the FAT partition -> kernel, so VM pods that
boot from an image exercise the real path. No loop mounts: the filesystem is made in a file with
``mkfs.vfat -C``, filled with ``mcopy``, made bootable with the mtools-based ``syslinux
--offset``, and the MBR (``/usr/lib/syslinux/mbr/mbr.bin`` + one partition entry) is written
from Python.

The containerDisk is a proper OCI image layout (``oci-layout``, ``index.json``, blobs): one gzip
layer holding ``disk/disk.qcow2`` (KubeVirt's convention: the one file under ``/disk/``). Push it
with ``--push 127.0.0.1:5000/vm/test-disk:1`` (``skopeo copy``, TLS verification off for that
loopback registry) or let the foundation push ``oci:<dir>:<tag>`` itself.

Needs: qemu-utils, dosfstools, mtools, syslinux, syslinux-common (Debian).

    python3 deploy/images/build_vm_disk.py [--cmdline-extra "edgevirt.poweroff=5"] [--push REF]
    -> prints disk=<qcow2> oci=<layout dir> tag=<tag>

Output is cached in ~/.cache/edgevirt/vmdisk/<hash of inputs>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_guest  # sibling module (deploy/images is not a package)

MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
PART_START = 2048  # sectors (1 MiB alignment)
SECTOR = 512
OCI_TAG = "1"
TOOLS = {"mkfs.vfat": "dosfstools", "mcopy": "mtools", "syslinux": "syslinux", "qemu-img": "qemu-utils"}


@dataclasses.dataclass(frozen=True)
class VMDisk:
    """A built disk: the qcow2 file and the OCI layout that carries it."""

    qcow2: Path
    raw_size: int
    oci_layout: Path
    tag: str
    manifest_digest: str


def syslinux_cfg(cmdline: str) -> str:
    return (
        "SERIAL 0 115200\nDEFAULT edgevirt\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL edgevirt\n  KERNEL vmlinuz\n  INITRD initrd.img\n  APPEND {cmdline}\n"
    )


def _run(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"build_vm_disk: {argv[0]} failed ({r.returncode}): {r.stderr.strip()}")


def check_tools() -> None:
    missing = [f"{t} (apt-get install {pkg})" for t, pkg in TOOLS.items() if shutil.which(t) is None]
    if not MBR_BIN.is_file():
        missing.append(f"{MBR_BIN} (apt-get install syslinux-common)")
    if missing:
        raise SystemExit("build_vm_disk: missing " + ", ".join(missing))


def mbr_partition_table(start: int, sectors: int, ptype: int = 0x0E) -> bytes:
    """The 64-byte partition table + 0x55AA: one bootable LBA partition (CHS fields maxed out)."""
    entry = struct.pack("<B3sB3sII", 0x80, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", start, sectors)
    return entry + bytes(48) + b"\x55\xaa"


def build_raw_disk(kernel: Path, initrd: Path, cmdline: str, out: Path, tmp: Path) -> int:
    """Write the bootable raw disk to ``out``; returns its size."""
    payload = kernel.stat().st_size + initrd.stat().st_size
    part_mib = max(32, (payload * 5 // 4) // 2**20 + 8)  # FAT16 wants >= ~16 MiB; keep slack
    part_sectors = part_mib * 2**20 // SECTOR
    part = tmp / "part.img"
    _run(["mkfs.vfat", "-F", "16", "-n", "EDGEVIRT", "-C", str(part), str(part_mib * 1024)])
    cfg = tmp / "syslinux.cfg"
    cfg.write_text(syslinux_cfg(cmdline))
    for src, name in ((kernel, "vmlinuz"), (initrd, "initrd.img"), (cfg, "syslinux.cfg")):
        _run(["mcopy", "-i", str(part), "-o", str(src), f"::/{name}"])
    total = (PART_START + part_sectors) * SECTOR
    with open(out, "wb") as f:
        f.truncate(total)
        f.seek(0)
        f.write(MBR_BIN.read_bytes()[:440])
        f.seek(446)
        f.write(mbr_partition_table(PART_START, part_sectors))
        f.seek(PART_START * SECTOR)
        with open(part, "rb") as p:
            shutil.copyfileobj(p, f, 1 << 20)
    _run(["syslinux", "--offset", str(PART_START * SECTOR), "--install", str(out)])
    part.unlink()
    return total


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_layout(disk: Path, layout: Path, tag: str = OCI_TAG) -> str:
    """An OCI image layout with ``disk`` as /disk/disk.qcow2; returns the manifest digest."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = _sha(data)
        (blobs / d.split(":", 1)[1]).write_bytes(data)
        return d

    raw_tar = io.BytesIO()
    with tarfile.open(fileobj=raw_tar, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("disk")
        d.type, d.mode, d.uid, d.gid, d.mtime = tarfile.DIRTYPE, 0o555, 107, 107, 0
        tf.addfile(d)
        f = tarfile.TarInfo("disk/disk.qcow2")
        f.size, f.mode, f.uid, f.gid, f.mtime = disk.stat().st_size, 0o444, 107, 107, 0
        with open(disk, "rb") as src:
            tf.addfile(f, src)
    tar_bytes = raw_tar.getvalue()
    layer = gzip.compress(tar_bytes, compresslevel=6, mtime=0)
    layer_digest = put(layer)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [_sha(tar_bytes)]},
        },
        sort_keys=True,
    ).encode()
    config_digest = put(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
            "annotations": {"org.opencontainers.image.title": "edgevirt test VM disk"},
        },
        sort_keys=True,
    ).encode()
    manifest_digest = put(manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))
    return manifest_digest


def build_vm_disk(cmdline_extra: str = "", cache_dir: Path | None = None, tag: str = OCI_TAG) -> VMDisk:
    """Build (or reuse) the bootable test disk and its OCI layout."""
    check_tools()
    guest = build_guest.build_guest()
    cmdline = build_guest.kernel_cmdline(extra=cmdline_extra)
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in (guest.kernel, guest.initrd):
        h.update(hashlib.sha256(p.read_bytes()).digest())
    h.update(cmdline.encode() + tag.encode())
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgevirt" / "vmdisk"
    out = root / h.hexdigest()[:16]
    meta = out / "disk.json"
    if meta.is_file():
        m = json.loads(meta.read_text())
        return VMDisk(out / "disk.qcow2", m["raw_size"], out / "oci", tag, m["manifest_digest"])
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        print(f"build_vm_disk: building {out} (kernel {guest.version}, cmdline {cmdline!r})", file=sys.stderr)
        raw = tmp / "disk.raw"
        size = build_raw_disk(guest.kernel, guest.initrd, cmdline, raw, tmp)
        _run(
            ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-c", str(raw), str(tmp / "disk.qcow2")]
        )
        raw.unlink()
        print("build_vm_disk: writing OCI layout", file=sys.stderr)
        digest = write_oci_layout(tmp / "disk.qcow2", tmp / "oci", tag)
        (tmp / "disk.json").write_text(
            json.dumps({"raw_size": size, "manifest_digest": digest, "cmdline": cmdline})
        )
        try:
            os.rename(tmp, out)
        except OSError:
            if not meta.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return build_vm_disk(cmdline_extra, cache_dir, tag)


def push(disk: VMDisk, ref: str, tls_verify: bool = False) -> None:
    """``skopeo copy oci:<layout>:<tag> docker://<ref>``."""
    _run(
        [
            "skopeo",
            "copy",
            "--quiet",
            f"--dest-tls-verify={'true' if tls_verify else 'false'}",
            f"oci:{disk.oci_layout}:{disk.tag}",
            f"docker://{ref}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cmdline-extra", default="", help="appended to the guest kernel command line")
    ap.add_argument("--cache-dir", type=Path, help="cache root (default ~/.cache/edgevirt/vmdisk)")
    ap.add_argument("--tag", default=OCI_TAG, help="tag inside the OCI layout")
    ap.add_argument("--push", metavar="REF", help="push to a registry, e.g. 127.0.0.1:5000/vm/test-disk:1")
    ap.add_argument("--tls-verify", action="store_true", help="verify the registry's TLS certificate")
    args = ap.parse_args(argv)
    disk = build_vm_disk(args.cmdline_extra, args.cache_dir, args.tag)
    if args.push:
        print(f"build_vm_disk: pushing to {args.push}", file=sys.stderr)
        push(disk, args.push, args.tls_verify)
    print(f"disk={disk.qcow2}\noci={disk.oci_layout}\ntag={disk.tag}\nmanifest={disk.manifest_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
