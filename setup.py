"""Build hook of the edgevirt wheel: the CRI runtime.v1 stubs are generated at BUILD time.

Everything else is declared in pyproject.toml. `build_py` runs `cri_shim.protos.write_stubs` into
the build tree, so the wheel ships `cri_shim/_generated/` (api_pb2.py, api_pb2_grpc.py and their
typed .pyi) made by the grpcio-tools and mypy-protobuf pinned in `[build-system] requires`, from
the cri-api version pinned in deploy/versions.env: an installed edgevirt needs neither Go nor
grpcio-tools. Editable installs skip the hook (deploy/install/gen-cri-stubs writes the stubs into
the checkout instead).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _protos():  # a module loaded by path: the package itself is not importable here
    """cri_shim/protos.py loaded on its own (it imports only the standard library)."""
    spec = importlib.util.spec_from_file_location("_edgevirt_build_protos", ROOT / "cri_shim" / "protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCriStubs(build_py):
    """build_py that also writes the generated CRI stubs into the build tree."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        protos = _protos()
        version = protos.cri_api_version()
        dest = Path(self.build_lib) / "cri_shim" / "_generated"
        print(f"edgevirt: generating the CRI stubs of {protos.MODULE}@{version} into {dest}")
        protos.write_stubs(dest, version, typed=True)


setup(cmdclass={"build_py": BuildPyWithCriStubs})
