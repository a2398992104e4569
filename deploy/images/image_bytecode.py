"""Bytecode for the edgevirt image's Python files, written at build time.

The image runs with PYTHONDONTWRITEBYTECODE=1 (its files are read-only to its non-root user), so
without shipped bytecode every start compiles every module it imports again, and the compiler's
garbage stays in the process's heap: the kubernetes client's API modules alone left ~77 MiB behind
in each process that built one (bench/RESULTS.md, "Node memory"). The bytecode is

* hash-based and unchecked: the layers' files all carry one mtime, so timestamp-checked .pyc files
  would be stale; the .py next to it is never read to check it (a layer is rebuilt whole when its
  sources change, so the two cannot diverge);
* reproducible: a fixed PYTHONHASHSEED keeps set and frozenset constants in one order;
* written for the paths the image shows (tracebacks name /usr/..., not the staging directory).

It is written by this build's interpreter, which must be a CPython 3.11 like the image's (the
bytecode format changes between minor versions, not within one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

IMAGE_PYTHON = (3, 11)

_COMPILE = (
    "import compileall, py_compile, sys; "
    "ok = all(compileall.compile_dir(d, quiet=1, stripdir=sys.argv[1], prependdir='/', workers=1, "
    "invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH) for d in sys.argv[2:]); "
    "sys.exit(0 if ok else 1)"
)


def compile_tree(root: Path, rel_dirs: list[str]) -> None:
    """Compile every .py under ``root``/``rel_dir`` (``root`` is where the image's / is staged)."""
    if sys.version_info[:2] != IMAGE_PYTHON:
        raise RuntimeError(
            f"bytecode for the image's CPython {'.'.join(map(str, IMAGE_PYTHON))} needs an interpreter "
            f"of the same version to write it; this is {sys.version.split()[0]}: run the build with "
            ".venv/bin/python"
        )
    dirs = [str(root / rel) for rel in rel_dirs if (root / rel).is_dir()]
    if not dirs:
        return
    env = dict(os.environ, PYTHONHASHSEED="0")
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE, str(root), *dirs], env=env, capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"compiling the image's Python files failed:\n{(r.stdout + r.stderr)[-3000:]}")
