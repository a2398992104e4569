#!/usr/bin/env python3
"""Build the edgevirt image without Docker: Debian packages + the edgevirt wheel + its pinned deps.

One image for every Python component (the controller in cluster and node mode, the macvtap daemon
and CNI plugin copy, the node probe), written as an OCI image layout, reproducibly: the same inputs
give the same digest. Three layers, each cached under ~/.cache/edgevirt/image/layers/ by its inputs:

1. debian: the bookworm rootfs of edgevirt-image.packages (image_rootfs.py),
2. python-deps: the wheels pinned in edgevirt-image.lock (image_pydeps.py),
3. edgevirt: the edgevirt wheel (edgevirt_wheel.py; CRI stubs generated at build time) and the
   daemon-only static macvtap CNI client (macvtap_static.py) that the edgevirt-node DaemonSet copies
   into the host's CNI bin dir (/usr/local/lib/edgevirt/cni/macvtap), and the labeller's loop
   (label-loop.sh, run by the image's busybox sh: /usr/local/lib/edgevirt/label-loop).

Each layer's SOURCE_DATE_EPOCH (every file's mtime) is the time of the last commit that touched its
inputs (or $SOURCE_DATE_EPOCH), so a commit elsewhere does not rebuild it. Default user nonroot
(65532:65532), no entrypoint (a pod names its command: edgevirt-controller, macvtap, ...), labels
org.opencontainers.image.{version,revision,source,created,...}. The layout is
~/.cache/edgevirt/image/oci-<key>/ tagged with the version; `--push [REGISTRY]` copies it with
skopeo to REGISTRY/edgevirt/edgevirt:<version> (default 127.0.0.1:5000, the local cluster's).

CLI: deploy/images/build-edgevirt-image [--push [REGISTRY]] [--version-suffix S] [--no-cache] [--json]
[--relock]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import edgevirt_wheel
import image_pydeps
import image_rootfs
import macvtap_static
import oci_layout

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("EDGEVIRT_CACHE", Path.home() / ".cache" / "edgevirt"))
NAME = "edgevirt/edgevirt"
DEFAULT_REGISTRY = "127.0.0.1:5000"
USER = f"{image_rootfs.NONROOT}:{image_rootfs.NONROOT}"
ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
]
CMD = ["edgevirt-controller", "--help"]
REL = "deploy/images"
KEEP_LAYOUTS = 3  # older image layouts, their layers and unused rootfs trees are removed from the cache
# Inputs of each layer besides its data (for its epoch and key): the code that writes it.
BASE_CODE = (f"{REL}/edgevirt-image.packages", f"{REL}/image_rootfs.py", f"{REL}/oci_layout.py")
DEPS_CODE = (f"{REL}/edgevirt-image.lock", f"{REL}/image_pydeps.py", f"{REL}/oci_layout.py")
#: the labeller's loop (busybox sh), shipped as a file of the edgevirt layer
LABEL_LOOP_SOURCE, LABEL_LOOP_PATH = f"{REL}/label-loop.sh", "usr/local/lib/edgevirt/label-loop"
APP_CODE = (
    f"{REL}/image_pydeps.py", f"{REL}/oci_layout.py", f"{REL}/macvtap_static.py", macvtap_static.SOURCE,
    LABEL_LOOP_SOURCE,
)  # fmt: skip


class Progress:
    """Numbered steps on stderr, each with its time."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0, self.times = total, 0, time.monotonic(), {}

    def step(self, name: str) -> None:
        self.n += 1
        self._start, self._name = time.monotonic(), name
        print(f"[image {self.n}/{self.total}] {name}", file=sys.stderr, flush=True)

    def say(self, msg: str) -> None:
        print(f"      {msg}", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.times[self._name] = round(time.monotonic() - self._start, 1)


def _hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update((p.encode() if isinstance(p, str) else p) + b"\0")
    return h.hexdigest()[:20]


def _files_text(repo: Path, rels: tuple[str, ...]) -> bytes:
    return b"".join(rel.encode() + b"\0" + (repo / rel).read_bytes() for rel in rels)


def _git(repo: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else ""


def labels(repo: Path, version: str, created: str, license_: str) -> dict[str, str]:
    inputs = [*edgevirt_wheel.INPUTS, *edgevirt_wheel.PACKAGES, REL]
    revision = _git(repo, "rev-parse", "HEAD") or "unknown"
    if _git(repo, "status", "--porcelain", "--", *inputs):
        revision += "-dirty"
    source = _git(repo, "remote", "get-url", "origin") or "unknown (the checkout has no git remote 'origin')"
    return {
        "org.opencontainers.image.title": "edgevirt",
        "org.opencontainers.image.description": "edgevirt controllers, macvtap CNI plugin and node probe",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": license_,
    }


def _wheel_meta(wheel: Path) -> tuple[str, str]:
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    fields = dict(line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines() if ": " in line)
    return fields["Version"], fields.get("License", "")


def _staged_layer(wheels: list[Path], out: Path, epoch: int, created_by: str,
                  files: dict[str, Path] | None = None) -> oci_layout.Layer:  # fmt: skip
    """A layer of ``wheels`` installed as the image sees them, with their bytecode, plus ``files``
    (image path: source)."""
    with tempfile.TemporaryDirectory(prefix="edgevirt-stage-") as tmp:
        root = Path(tmp)
        image_pydeps.install_wheels(wheels, root)
        image_pydeps.compile_bytecode(root)
        for rel, src in (files or {}).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
        paths = sorted(os.path.relpath(Path(d) / n, root) for d, ds, fs in os.walk(root) for n in (*ds, *fs))
        return oci_layout.write_layer(root, paths, out, epoch, created_by, owner=(0, 0))


def build_layers(repo: Path, icache: Path, rootfs: Path, spec: image_rootfs.Spec, dep_wheels: list[Path],
                 wheel: Path, use_cache: bool, say,
                 native: Path) -> tuple[list[oci_layout.Layer], int]:  # fmt: skip
    """The three layers (cached by their inputs) and the newest of their epochs. ``native`` is the
    static macvtap client (its bytes are part of the edgevirt layer's key)."""
    base_epoch = edgevirt_wheel.source_date_epoch(repo, BASE_CODE)
    deps_epoch = edgevirt_wheel.source_date_epoch(repo, DEPS_CODE)
    app_epoch = edgevirt_wheel.source_date_epoch(
        repo, (*edgevirt_wheel.INPUTS, *edgevirt_wheel.PACKAGES, *APP_CODE)
    )
    debian_paths = lambda: image_rootfs.selected_paths(rootfs, spec)  # noqa: E731
    debian_what = f"debian {image_rootfs.SUITE}: {' '.join(spec.packages)}"
    plan = [
        ("debian", _hash(rootfs.name, _files_text(repo, BASE_CODE), str(base_epoch)),
         lambda out: oci_layout.write_layer(rootfs, debian_paths(), out, base_epoch, debian_what)),
        ("python-deps", _hash(_files_text(repo, DEPS_CODE), str(deps_epoch)),
         lambda out: _staged_layer(dep_wheels, out, deps_epoch, f"pip: {image_pydeps.LOCK_FILE.name}")),
        ("edgevirt",
         _hash(wheel.read_bytes(), native.read_bytes(), _files_text(repo, APP_CODE), str(app_epoch)),
         lambda out: _staged_layer([wheel], out, app_epoch,
                                   f"wheel: {wheel.name} + {macvtap_static.IMAGE_PATH} + {LABEL_LOOP_PATH}",
                                   {macvtap_static.IMAGE_PATH: native,
                                    LABEL_LOOP_PATH: repo / LABEL_LOOP_SOURCE})),
    ]  # fmt: skip
    layers = []
    for name, key, make in plan:
        if not use_cache:
            (icache / "layers" / f"{name}-{key}.json").unlink(missing_ok=True)
        layer, cached = oci_layout.cached_layer(icache, f"{name}-{key}", make)
        mib = f"{layer.size / 2**20:.1f} MiB ({layer.tar_size / 2**20:.1f} MiB uncompressed)"
        say(f"{name}: {'cached' if cached else 'written'} {layer.digest[:19]} {mib}")
        layers.append(layer)
    return layers, max(base_epoch, deps_epoch, app_epoch)


def write_image(repo: Path, icache: Path, layers: list[oci_layout.Layer], epoch: int, wheel: Path,
                use_cache: bool, version_suffix: str = "") -> tuple[Path, str, str]:  # fmt: skip
    """The OCI layout of `layers` with its config (cached by content): (layout, tag, manifest digest).
    The tag is the wheel's version, plus `-<version_suffix>` when given (also in the version label,
    so the image is another one: a test of an upgrade, a local build told apart)."""
    version, license_ = _wheel_meta(wheel)
    if version_suffix:
        version = f"{version}-{version_suffix}"
    created = oci_layout.iso_time(epoch)
    config = oci_layout.image_config(layers, epoch, USER, ENV, CMD, labels(repo, version, created, license_))
    labels_ = config["config"]["Labels"]
    annotations = {k: v for k, v in labels_.items() if k.endswith((".version", ".revision"))}
    layout = icache / f"oci-{_hash(oci_layout.canonical_json(config), *[la.digest for la in layers])}"
    if not (use_cache and (layout / "index.json").is_file()):
        oci_layout.write_layout(layout, layers, config, version, annotations)
    index = json.loads((layout / "index.json").read_text())
    return layout, version, index["manifests"][0]["digest"]


def prune(icache: Path, in_use: set[Path], keep_layouts: int = KEEP_LAYOUTS) -> int:
    """Bound the cache: the newest `keep_layouts` layouts and the layers they hold, and of the rootfs
    trees, wheel downloads and static macvtap clients only those `in_use` (which also names the layout
    just written; static clients are kept an hour).
    Returns how many entries were removed."""
    layouts = sorted(icache.glob("oci-*"), key=lambda d: d.stat().st_mtime, reverse=True)
    kept = {*layouts[:keep_layouts], *(d for d in in_use if d.name.startswith("oci-"))}
    removed = [d for d in layouts if d not in kept]
    removed += [d for d in (*icache.glob("rootfs-*"), *icache.glob("pywheels-*")) if d not in in_use]
    # static clients of other sources, once no build of another checkout can still be using them
    old = time.time() - 3600
    removed += [f for f in icache.glob("native/macvtap-*") if f not in in_use and f.stat().st_mtime < old]
    blobs = {b.name for d in kept for b in (d / "blobs" / "sha256").iterdir()}
    for meta in (icache / "layers").glob("*.json"):
        if json.loads(meta.read_text())["digest"].split(":", 1)[1] not in blobs:
            removed += [meta, meta.with_suffix(".tar.gz")]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return len(removed)


def build(repo: Path = REPO, cache: Path = CACHE, use_cache: bool = True, push_to: str | None = None,
          tls_verify: bool | None = None, version_suffix: str = "") -> dict:  # fmt: skip
    """Build (or find) the image; optionally push it. Returns a summary (digest, layout, sizes, times)."""
    icache = cache / "image"
    p = Progress(7 if push_to else 6)
    p.step("wheel: edgevirt with its CRI stubs")
    wheel = edgevirt_wheel.build_wheel(repo, cache / "wheel", use_cache)
    p.done()
    p.step(f"static macvtap CNI client (daemon-only): {macvtap_static.SOURCE}")
    native = macvtap_static.build(repo, icache / "native")
    p.say(f"{native.stat().st_size / 2**10:.0f} KiB, {macvtap_static.compiler_version()}")
    p.done()
    p.step(f"python dependencies: {image_pydeps.LOCK_FILE.name}")
    pins = image_pydeps.check_lock(wheel)
    pywheels = icache / f"pywheels-{_hash(image_pydeps.LOCK_FILE.read_bytes())}"
    dep_wheels = image_pydeps.download(pywheels)
    p.say(f"{len(pins)} pins, {len(dep_wheels)} wheels")
    p.done()
    p.step("debian: bookworm rootfs (mmdebstrap)")
    spec = image_rootfs.read_spec()
    rootfs = image_rootfs.build_rootfs(icache, spec, use_cache, say=p.say)
    p.done()
    p.step("layers: debian, python-deps, edgevirt")
    layers, epoch = build_layers(repo, icache, rootfs, spec, dep_wheels, wheel, use_cache, p.say, native)
    p.done()
    p.step("OCI image layout")
    layout, tag, digest = write_image(repo, icache, layers, epoch, wheel, use_cache, version_suffix)
    p.say(f"{layout} tag {tag}: {digest}")
    if pruned := prune(icache, {layout, rootfs, pywheels, native}):
        p.say(f"cache: removed {pruned} old layouts, layers or rootfs")
    p.done()
    summary: dict = {
        "layout": str(layout),
        "ref": f"oci:{layout}:{tag}",
        "tag": tag,
        "digest": digest,
        "wheel": str(wheel),
        "compressed_bytes": sum(la.size for la in layers),
        "uncompressed_bytes": sum(la.tar_size for la in layers),
        "layers": [{"digest": la.digest, "size": la.size, "tar_size": la.tar_size} for la in layers],
    }
    if push_to:
        target = f"{push_to}/{NAME}:{tag}"
        p.step(f"push: {target}")
        verify = (
            tls_verify if tls_verify is not None else not push_to.startswith(("127.", "localhost", "[::1]"))
        )
        summary["pushed"] = {"target": target, "digest": oci_layout.push(layout, tag, target, verify)}
        p.say(f"pushed {summary['pushed']['digest']}")
        p.done()
    summary["seconds"] = round(time.monotonic() - p.t0, 1)
    summary["step_seconds"] = p.times
    mib = f"{summary['compressed_bytes'] / 2**20:.1f} MiB compressed, "
    mib += f"{summary['uncompressed_bytes'] / 2**20:.1f} MiB uncompressed"
    print(f"[image] {summary['ref']} {digest} {mib}, {summary['seconds']} s", file=sys.stderr)
    return summary


def version_suffix(text: str) -> str:
    """--version-suffix: what an image tag may hold after `<version>-` (letters, digits, . _ -);
    "" is none."""
    if text and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use up to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build-edgevirt-image", description=__doc__.splitlines()[0])
    push_help = f"also copy the image to REGISTRY/{NAME}:<version> (default {DEFAULT_REGISTRY})"
    ap.add_argument("--push", nargs="?", const=DEFAULT_REGISTRY, metavar="REGISTRY", help=push_help)
    ap.add_argument("--tls-verify", choices=["true", "false"], help="for --push (default: false on loopback)")
    ap.add_argument("--no-cache", action="store_true", help="rebuild the wheel, the rootfs and the layers")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help=f"cache root (default {CACHE})")
    ap.add_argument(
        "--version-suffix",
        type=version_suffix,
        default="",
        metavar="SUFFIX",
        help="tag and version label <version>-SUFFIX (another image with the same layers)",
    )
    ap.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    ap.add_argument(
        "--relock", action="store_true", help=f"re-resolve {image_pydeps.LOCK_FILE.name} and exit"
    )
    args = ap.parse_args(argv)
    if shutil.which("mmdebstrap") is None and not args.relock:
        print("build-edgevirt-image: mmdebstrap is missing: apt-get install mmdebstrap", file=sys.stderr)
        return 1
    try:
        if args.relock:
            wheel = edgevirt_wheel.build_wheel(REPO, args.cache_dir / "wheel")
            n = image_pydeps.relock(wheel)
            print(f"build-edgevirt-image: {n} pins written to {image_pydeps.LOCK_FILE}", file=sys.stderr)
            return 0
        tls = None if args.tls_verify is None else args.tls_verify == "true"
        summary = build(REPO, args.cache_dir, not args.no_cache, args.push, tls, args.version_suffix)
    except (image_pydeps.LockError, image_rootfs.RootfsError, macvtap_static.BuildError, RuntimeError) as e:
        print(f"build-edgevirt-image: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1) if args.json else summary["ref"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
