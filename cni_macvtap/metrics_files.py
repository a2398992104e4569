"""Where the macvtap daemon's workers keep their metric values (prometheus_client's multiprocess
mode), standard library only: it must run before prometheus_client is imported, which reads
``PROMETHEUS_MULTIPROC_DIR`` when it is first imported.
"""

from __future__ import annotations

import os
import shutil
import sys

ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(socket_path: str) -> str:
    """``<socket>.metrics``: one daemon per socket, so one directory per daemon."""
    return socket_path + ".metrics"


def enable(path: str) -> None:
    """An empty directory (mode 0700) for this daemon's values, named in the environment; values
    of an earlier daemon on the same socket are dropped."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    shutil.rmtree(path, ignore_errors=True)
    os.mkdir(path, 0o700)
    os.environ[ENV] = path


def disable(path: str) -> None:
    """Remove the directory and its name from the environment."""
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(ENV) == path:
        del os.environ[ENV]
