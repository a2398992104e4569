"""The Python part of the edgevirt image: its exact dependency pins, their wheels, their install.

`edgevirt-image.lock` pins every Python dependency of the edgevirt wheel (with sha256 hashes) for the
image's interpreter: CPython 3.11 on glibc 2.36 (Debian 12), x86_64. libvirt-python is the one
exception: Debian's python3-libvirt provides it (built for Debian's libvirt; see
edgevirt-image.packages). `relock()` re-resolves the pins from the wheel's requirements (pip's
resolver, binary wheels only); `check_lock()` refuses a lock that no longer satisfies them.

Wheels are downloaded with `pip download --require-hashes` (pip's own cache makes that cheap) and
installed with pypa/installer into a staging tree laid out like the image: packages under
/usr/local/lib/python3.11/dist-packages (Debian's python3 looks there), console scripts in
/usr/local/bin with `#!/usr/bin/python3`, no byte-code (nothing with a timestamp).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
LOCK_FILE = HERE / "edgevirt-image.lock"
PYTHON = "/usr/bin/python3"
SITE = "usr/local/lib/python3.11/dist-packages"
PROVIDED_BY_DEBIAN = {"libvirt-python": "python3-libvirt"}
# The image's interpreter, for pip's resolver: CPython 3.11, manylinux up to glibc 2.36, x86_64.
TARGET = [
    "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
    *[a for m in range(17, 37) for a in ("--platform", f"manylinux_2_{m}_x86_64")],
    "--platform", "manylinux2014_x86_64", "--platform", "manylinux1_x86_64",
]  # fmt: skip
LOCK_HEADER = """\
# Every Python dependency of the edgevirt image, pinned with hashes, for CPython 3.11 / glibc 2.36 /
# x86_64 (Debian 12). libvirt-python comes from Debian (python3-libvirt). Generated from the wheel's
# requirements; regenerate with: deploy/images/build-edgevirt-image --relock
"""


class LockError(RuntimeError):
    """The lock is missing or stale; the message says how to fix it."""


def _pip(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True)


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The wheel's unconditional Requires-Dist, without those Debian provides."""
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(z.read(name).decode())
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [
        r for r in reqs
        if r.marker is None and canonicalize_name(r.name) not in PROVIDED_BY_DEBIAN
    ]  # fmt: skip


def read_lock(path: Path = LOCK_FILE) -> dict[str, str]:
    """{canonical name: version} of the lock."""
    if not path.is_file():
        raise LockError(f"{path} is missing: run deploy/images/build-edgevirt-image --relock")
    pins = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "--")):
            name, _, version = line.split()[0].partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def check_lock(wheel: Path, path: Path = LOCK_FILE) -> dict[str, str]:
    """The lock's pins, after checking that they satisfy every requirement of the wheel."""
    pins = read_lock(path)
    for req in wheel_requirements(wheel):
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            raise LockError(
                f"{path.name} pins {req.name}=={version} but the wheel requires {req}: "
                "run deploy/images/build-edgevirt-image --relock"
            )
    return pins


def relock(wheel: Path, path: Path = LOCK_FILE) -> int:
    """Resolve the wheel's requirements for the image's interpreter and write the lock. Returns the
    number of pins."""
    reqs = [str(r) for r in wheel_requirements(wheel)]
    with tempfile.TemporaryDirectory(prefix="edgevirt-lock-") as tmp:
        report = Path(tmp) / "report.json"
        r = _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                 "--target", str(Path(tmp) / "t"), *TARGET, *reqs)  # fmt: skip
        if r.returncode != 0:
            raise LockError(f"pip could not resolve {reqs}:\n{r.stderr.strip()[-2000:]}")
        items = json.loads(report.read_text())["install"]
    lines = []
    for item in sorted(items, key=lambda i: canonicalize_name(i["metadata"]["name"])):
        sha = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{canonicalize_name(item['metadata']['name'])}=={item['metadata']['version']} \\")
        lines.append(f"    --hash=sha256:{sha}")
    path.write_text(LOCK_HEADER + "\n".join(lines) + "\n")
    return len(items)


def download(dest: Path, lock: Path = LOCK_FILE) -> list[Path]:
    """The lock's wheels in `dest` (downloaded, hash-checked, once)."""
    marker = dest / ".complete"
    if marker.is_file():
        return sorted(dest.glob("*.whl"))
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    r = _pip("download", "--quiet", "--no-deps", "--require-hashes", *TARGET, "-r", str(lock), "-d", str(tmp))
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LockError(f"pip download of {lock.name} failed:\n{r.stderr.strip()[-2000:]}")
    (tmp / ".complete").write_text("")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return sorted(dest.glob("*.whl"))


def install_wheels(wheels: list[Path], root: Path) -> None:
    """Install `wheels` into the staging tree `root` as the image's python3 will see them."""
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    scheme = {
        "purelib": f"/{SITE}",
        "platlib": f"/{SITE}",
        "headers": "/usr/local/include/python3.11",
        "scripts": "/usr/local/bin",
        "data": "/usr/local",
    }
    old_umask = os.umask(0o022)
    try:
        for wheel in sorted(wheels):
            dest = SchemeDictionaryDestination(
                scheme,
                interpreter=PYTHON,
                script_kind="posix",
                bytecode_optimization_levels=(),
                destdir=str(root),
            )
            with WheelFile.open(wheel) as source:
                install(source, dest, additional_metadata={"INSTALLER": b"edgevirt-image\n"})
    finally:
        os.umask(old_umask)


def compile_bytecode(root: Path) -> None:
    """Bytecode of the packages staged under `root` (:mod:`image_bytecode`)."""
    import image_bytecode

    image_bytecode.compile_tree(root, [SITE])
