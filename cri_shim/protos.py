"""The CRI runtime.v1 protobuf stubs, generated from the upstream `k8s.io/cri-api` module.

The API is never copied into the repository: `write_stubs()` finds `api.proto` of the pinned cri-api
version (`CRI_API_VERSION` in deploy/versions.env) in the Go module cache, downloads it through the
Go module proxy when it is missing (`go mod download -json k8s.io/cri-api@VERSION`), and runs
grpc_tools.protoc (plus mypy-protobuf's plugins for typed `.pyi`, when installed) into a directory.

Two users: the wheel build (setup.py) writes the stubs into the wheel at BUILD time, so an installed
edgevirt needs neither Go nor grpcio-tools and `api()` only imports them; in a source checkout
(`deploy/versions.env` beside the package) `generate()` writes them into the git-ignored
`cri_shim/_generated/`, stamped with the version so a second run does nothing, and `api()`
regenerates them when the pinned version changed.

Run `python -m cri_shim.protos [--force]` (deploy/install/gen-cri-stubs does) to generate.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parent
GENERATED = PACKAGE_DIR / "_generated"
STAMP = GENERATED / "CRI_API_VERSION"
VERSIONS_ENV = PACKAGE_DIR.parent / "deploy" / "versions.env"
MODULE = "k8s.io/cri-api"
PROTO_IN_MODULE = Path("pkg/apis/runtime/v1/api.proto")
DEFAULT_VERSION = "v0.34.4"


class StubError(RuntimeError):
    """The stubs could not be generated; the message says what is missing and how to fix it."""


def cri_api_version() -> str:
    """The pinned cri-api version: $EDGEVIRT_CRI_API_VERSION, else deploy/versions.env (a checkout),
    else the stamp of the stubs a wheel ships, else the version this code was written against."""
    env = os.environ.get("EDGEVIRT_CRI_API_VERSION")
    if env:
        return env
    try:
        for line in VERSIONS_ENV.read_text().splitlines():
            if line.strip().startswith("CRI_API_VERSION="):
                return line.split("=", 1)[1].strip()
    except OSError:
        pass
    try:
        return STAMP.read_text().strip() or DEFAULT_VERSION
    except OSError:
        return DEFAULT_VERSION


def _go() -> str:
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if not go:
        raise StubError(
            f"cannot find {MODULE}@{cri_api_version()}'s api.proto: the Go toolchain ('go') is not on PATH; "
            "install Go (deploy/install/install expects it) or set EDGEVIRT_CRI_PROTO=/path/to/api.proto"
        )
    return go


def find_proto(version: str) -> Path:
    """api.proto of cri-api `version`: $EDGEVIRT_CRI_PROTO, the Go module cache, or downloaded."""
    explicit = os.environ.get("EDGEVIRT_CRI_PROTO")
    if explicit:
        if not Path(explicit).is_file():
            raise StubError(f"EDGEVIRT_CRI_PROTO={explicit} does not exist")
        return Path(explicit)
    go = _go()
    modcache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True, check=True)
    cached = Path(modcache.stdout.strip()) / f"{MODULE}@{version}" / PROTO_IN_MODULE
    if cached.is_file():
        return cached
    res = subprocess.run(
        [go, "mod", "download", "-json", f"{MODULE}@{version}"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        env={**os.environ, "GOFLAGS": "-mod=mod", "GO111MODULE": "on"},
    )
    if res.returncode != 0:
        raise StubError(
            f"go mod download {MODULE}@{version} failed: {res.stdout.strip()} {res.stderr.strip()}"
        )
    proto = Path(json.loads(res.stdout)["Dir"]) / PROTO_IN_MODULE
    if not proto.is_file():
        raise StubError(f"{MODULE}@{version} has no {PROTO_IN_MODULE}")
    return proto


def in_checkout() -> bool:
    """True in a source checkout (editable install or PYTHONPATH), where the stubs are generated on
    demand; False in an installed wheel, whose stubs were generated when it was built."""
    return VERSIONS_ENV.is_file()


def up_to_date(version: str | None = None) -> bool:
    version = version or cri_api_version()
    try:
        return STAMP.read_text().strip() == version and (GENERATED / "api_pb2.py").is_file()
    except OSError:
        return False


def _mypy_plugins() -> list[str]:
    """protoc flags for mypy-protobuf's typed `.pyi` output, or [] when it is not installed."""
    flags = []
    for plugin, out in (("protoc-gen-mypy", "mypy_out"), ("protoc-gen-mypy_grpc", "mypy_grpc_out")):
        exe = shutil.which(plugin) or shutil.which(plugin, path=str(Path(sys.executable).parent))
        if exe is None:
            return []
        flags += [f"--plugin={plugin}={exe}", f"--{out}={{out}}"]
    return flags


def write_stubs(dest: Path, version: str, typed: bool | None = None) -> Path:
    """Generate the runtime.v1 stubs of cri-api `version` into `dest` (replaced if it exists):
    api_pb2.py, api_pb2_grpc.py, with typed=True (or None and mypy-protobuf installed) also
    api_pb2.pyi and api_pb2_grpc.pyi; plus __init__.py and the CRI_API_VERSION stamp."""
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise StubError("grpcio-tools is not installed: pip install -e .[test] (or grpcio-tools)") from e
    mypy_flags = _mypy_plugins()
    if typed and not mypy_flags:
        raise StubError("typed stubs need mypy-protobuf (protoc-gen-mypy on PATH): pip install mypy-protobuf")
    proto = find_proto(version)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix="._gen-") as tmp:
        src = Path(tmp) / "src"
        out = Path(tmp) / "out"
        src.mkdir()
        out.mkdir()
        shutil.copyfile(proto, src / "api.proto")
        args = [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
        ]
        args += [f.format(out=out) for f in mypy_flags] if typed is not False else []
        rc = protoc.main([*args, str(src / "api.proto")])
        if rc != 0:
            raise StubError(f"grpc_tools.protoc failed on {proto} (exit {rc})")
        # The grpc stub imports `api_pb2` as a top-level module; make it package-relative.
        for name in ("api_pb2_grpc.py", "api_pb2_grpc.pyi"):
            if (out / name).is_file():
                text = (out / name).read_text()
                (out / name).write_text(text.replace("import api_pb2 as", "from . import api_pb2 as"))
        (out / "__init__.py").write_text(f'"""Generated from {MODULE}@{version} {PROTO_IN_MODULE}."""\n')
        (out / "CRI_API_VERSION").write_text(version + "\n")
        # Swap the whole directory in at once so a concurrent reader never sees half of it.
        old = dest.parent / f"._old-{os.getpid()}"
        if dest.exists():
            dest.rename(old)
        out.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    return dest


def generate(force: bool = False) -> Path:
    """Generate the stubs into cri_shim/_generated/ of this checkout (idempotent, keyed by the
    cri-api version). Returns the directory."""
    version = cri_api_version()
    if not force and up_to_date(version):
        return GENERATED
    write_stubs(GENERATED, version)
    importlib.invalidate_caches()
    return GENERATED


def api() -> ModuleType:
    """The runtime.v1 message module (cri_shim._generated.api_pb2). In a checkout the stubs are
    generated first when missing or stale; an installed wheel only imports the ones it ships."""
    if in_checkout() and not up_to_date():
        generate()
    try:
        return importlib.import_module("cri_shim._generated.api_pb2")
    except ImportError as e:
        raise StubError(
            f"the CRI stubs are not installed ({e}): a wheel ships them (reinstall edgevirt); "
            "in a checkout run deploy/install/gen-cri-stubs"
        ) from e


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        out = generate(force="--force" in argv)
    except StubError as e:
        print(f"gen-cri-stubs: error: {e}", file=sys.stderr)
        return 1
    print(f"gen-cri-stubs: {MODULE}@{cri_api_version()} stubs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
