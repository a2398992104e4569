"""The former containerDisk path of the kvm handler, kept for the benchmarks only: ``skopeo inspect``
asks the registry what a reference points at, ``skopeo copy docker://<ref>`` downloads the image a
second time (kubelet already pulled it through containerd) into an OCI layout, and the disk is taken
out of it. The product reads containerd's own store instead (cri_shim/vm/containerd_source.py).

* :class:`SkopeoSource` - a :class:`cri_shim.vm.oci.ContainerDiskSource` (returns None from
  ``fetch_disk``: the image store then hashes the disk in a second pass, as it did);
* :func:`create` - a kvm backend factory for edgevirt-cri's config (``factory: skopeo_source:create``,
  with ``bench/vm`` on the shim's PYTHONPATH) whose image store uses skopeo.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cri_shim.kvm import factory
from cri_shim.vm.errors import ImageError
from cri_shim.vm.oci import SHA256_RE, Manifest, OciRef, extract_disk_from_oci_layout


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
            raise ImageError(f"fetching the image took over {int(timeout)}s") from None

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
        if ref.digest:  # skopeo refuses a tag and a digest together
            ref = OciRef(ref.registry, ref.repository, None, ref.digest)
        with tempfile.TemporaryDirectory(prefix=".oci-", dir=dest.parent) as tmp:
            argv = ["copy", "--quiet", *self._tls(ref, "--src-tls-verify"), "--", f"docker://{ref}",
                    f"oci:{tmp}/layout:disk"]  # fmt: skip
            r = self._run(argv, Path(tmp), timeout)
            if r.returncode != 0:
                raise ImageError(f"cannot fetch {ref} from its registry", detail=r.stderr.strip()[-1000:])
            if time.monotonic() > deadline:
                raise ImageError(f"fetching the image took over {int(timeout)}s")
            extract_disk_from_oci_layout(Path(tmp) / "layout", dest, tag="disk", max_bytes=max_bytes)


def create(name: str, options: dict[str, Any]) -> Any:
    """The kvm backend with the former skopeo path (edgevirt-cri's plugin factory)."""
    opts = factory.parse_options(name, options)
    domains = factory.domain_manager(opts)
    domains.images.container_disks = SkopeoSource(opts.insecure_registries or ("127.0.0.1:5000",))
    return factory.build_handler(name, opts, domains=domains)
