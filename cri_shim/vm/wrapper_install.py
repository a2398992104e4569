"""Install :mod:`.tapwrap` as an executable file that libvirt can use as ``<emulator>``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import tapwrap

WRAPPER_NAME = "edgevirt-qemu"


def wrapper_text(python: str = sys.executable) -> str:
    src = Path(tapwrap.__file__).read_text()
    note = "# Installed by cri_shim.vm.wrapper_install; edit cri_shim/vm/tapwrap.py instead."
    return f"#!{python} -I\n{note}\n{src}"


def install_wrapper(bin_dir: Path, python: str = sys.executable) -> Path:
    """Write the wrapper to ``bin_dir/edgevirt-qemu`` (only if it changed: libvirt re-probes QEMU
    capabilities whenever the emulator file changes) and return its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / WRAPPER_NAME
    text = wrapper_text(python)
    try:
        if path.read_text() == text and os.access(path, os.X_OK):
            return path
    except OSError:
        pass
    tmp = path.with_name(f".{WRAPPER_NAME}.{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    return path
