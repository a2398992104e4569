"""The Debian part of the edgevirt image: a bookworm root filesystem made by mmdebstrap, cached.

`edgevirt-image.packages` names the packages and the paths left out. mmdebstrap's `extract`
variant unpacks them with their hard dependencies (no recommends, no maintainer scripts, so no shell
is needed and none is added) from the mirror apt is configured with on this machine; then this
module does what the skipped maintainer scripts would have: the dpkg status database (from the
downloaded packages' control files, so scanners see what is inside), the CA bundle, and the users
(root, and `nonroot` with uid/gid 65532 and home /home/nonroot, the image's default user).

The rootfs is kept in <cache>/rootfs-<key>/, keyed by the package file, the apt sources and the
mmdebstrap version; a second build with the same inputs reuses it. The mirror moves on (security
updates): the cached rootfs, and its dpkg status, are what the image was built from.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import image_bytecode

HERE = Path(__file__).resolve().parent
PACKAGES_FILE = HERE / "edgevirt-image.packages"
SUITE = "bookworm"
NONROOT = 65532
DEFAULT_SOURCES = (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list"))
COMPLETE = ".edgevirt-rootfs-complete"
#: Debian's Python files, compiled at build time (mmdebstrap's extract variant runs no py3compile;
#: without bytecode every process compiles the standard library it imports at every start)
PYTHON_DIRS = ["usr/lib/python3.11", "usr/lib/python3/dist-packages"]
#: part of the rootfs key: a cached tree made without bytecode is made again
BYTECODE = "bytecode: unchecked-hash, PYTHONHASHSEED=0"
PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"nonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/usr/sbin/nologin\n"
)
GROUP = f"root:x:0:\nnonroot:x:{NONROOT}:\n"


class RootfsError(RuntimeError):
    """The rootfs could not be made; the message says what is missing and how to fix it."""


@dataclass
class Spec:
    """edgevirt-image.packages, parsed."""

    text: str
    packages: list[str] = field(default_factory=list)
    drop: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)


def read_spec(path: Path = PACKAGES_FILE) -> Spec:
    text = path.read_text()
    spec = Spec(text)
    kinds = {"package": spec.packages, "drop": spec.drop, "keep": spec.keep}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(" ")
        if kind not in kinds or not value.strip() or " " in value.strip():
            raise RootfsError(f"{path}:{n}: {raw!r}: write 'package NAME', 'drop GLOB' or 'keep GLOB'")
        kinds[kind].append(value.strip())
    if not spec.packages:
        raise RootfsError(f"{path}: names no package")
    return spec


def apt_sources() -> Path:
    """The apt sources this machine uses ($EDGEVIRT_APT_SOURCES overrides)."""
    env = os.environ.get("EDGEVIRT_APT_SOURCES")
    candidates = (Path(env),) if env else DEFAULT_SOURCES
    for c in candidates:
        if c.is_file() and c.read_text().strip():
            return c
    raise RootfsError(
        f"no apt sources found at {', '.join(map(str, candidates))}: "
        "set EDGEVIRT_APT_SOURCES to a .sources or .list file naming a Debian 12 mirror"
    )


def mmdebstrap_version() -> str:
    if shutil.which("mmdebstrap") is None:
        raise RootfsError(
            "mmdebstrap is not installed: apt-get install mmdebstrap (deploy/install/install does)"
        )
    return subprocess.run(
        ["mmdebstrap", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()


def rootfs_key(spec: Spec, sources: Path) -> str:
    h = hashlib.sha256()
    for part in (SUITE, spec.text, sources.read_text(), mmdebstrap_version(), PASSWD, GROUP, BYTECODE):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:20]


def build_rootfs(cache: Path, spec: Spec, use_cache: bool = True, say=print) -> Path:
    """The rootfs directory for `spec` (made, or found in `cache`)."""
    sources = apt_sources()
    out = cache / f"rootfs-{rootfs_key(spec, sources)}"
    if use_cache and (out / COMPLETE).is_file():
        say(f"cached: {out}")
        return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    argv = [
        "mmdebstrap", "--variant=extract", "--format=directory", "--quiet",
        "--skip=cleanup/apt/cache",  # the downloaded packages feed the dpkg status below
        f"--include={','.join(spec.packages)}", SUITE, str(tmp), str(sources),
    ]  # fmt: skip
    say(f"mmdebstrap {SUITE}: {len(spec.packages)} packages and their dependencies (sources: {sources})")
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RootfsError(f"mmdebstrap failed (exit {r.returncode}):\n{r.stderr.strip()[-3000:]}")
    try:
        n = write_dpkg_status(tmp)
        write_ca_bundle(tmp)
        write_users(tmp)
        image_bytecode.compile_tree(tmp, PYTHON_DIRS)
        (tmp / COMPLETE).write_text(f"{n} packages\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    say(f"rootfs of {n} Debian packages in {out}")
    return out


def write_dpkg_status(root: Path) -> int:
    """var/lib/dpkg/status from the control files of the packages mmdebstrap unpacked; the packages
    themselves are deleted. Returns how many."""
    archives = root / "var/cache/apt/archives"
    entries = {}
    for deb in sorted(archives.glob("*.deb")):
        control = subprocess.run(
            ["dpkg-deb", "--field", str(deb)], capture_output=True, text=True, check=True
        )
        lines = control.stdout.rstrip("\n").split("\n")
        name = lines[0].split(":", 1)[1].strip()
        entries[name] = "\n".join([lines[0], "Status: install ok installed", *lines[1:]]) + "\n"
        deb.unlink()
    if not entries:
        raise RootfsError(f"no packages in {archives}: did mmdebstrap --skip=cleanup/apt/cache work?")
    status = root / "var/lib/dpkg/status"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text("\n".join(entries[k] for k in sorted(entries)))
    return len(entries)


def write_ca_bundle(root: Path) -> None:
    """etc/ssl/certs/ca-certificates.crt: every certificate ca-certificates ships, in name order (what
    its postinst's update-ca-certificates would assemble)."""
    certs = sorted((root / "usr/share/ca-certificates").rglob("*.crt"))
    if not certs:
        return
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_bytes(b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))
    bundle.chmod(0o644)


def write_users(root: Path) -> None:
    """root and nonroot (65532) in /etc/passwd and /etc/group; their homes; a world-writable /tmp."""
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    for path, mode, owner in (("root", 0o700, 0), ("home", 0o755, 0), ("home/nonroot", 0o755, NONROOT)):
        d = root / path
        d.mkdir(exist_ok=True)
        os.chown(d, owner, owner)
        d.chmod(mode)
    (root / "tmp").mkdir(exist_ok=True)
    (root / "tmp").chmod(0o1777)


def selected_paths(root: Path, spec: Spec) -> list[str]:
    """The rootfs paths that go into the image, sorted (a directory before what it holds): all but
    `drop` matches (and what is under them), except `keep` matches and their directories."""
    everything = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in (*dirnames, *filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel != COMPLETE:
                everything.append(rel)

    def dropped(rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch.fnmatchcase(p, g) for p in prefixes for g in spec.drop)

    chosen = set()
    for rel in everything:
        if not dropped(rel):
            chosen.add(rel)
        elif any(fnmatch.fnmatchcase(rel, g) for g in spec.keep):
            parts = rel.split("/")
            chosen.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(chosen)
