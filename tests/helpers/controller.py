"""edgevirt-controller as a subprocess of a test or benchmark: output appended to a log file, kill -9,
and a bounded stop. It runs this checkout's code (its root first on PYTHONPATH), also when the
virtualenv is an editable install of another checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO, processes

#: the controller's console script, next to the Python running the tests
CONTROLLER = str(Path(sys.executable).parent / "edgevirt-controller")


class ControllerProcess:
    """``edgevirt-controller <args>`` running, its output appended to ``log``."""

    def __init__(self, args: list[str], log: Path, identity: str) -> None:
        self.identity = identity
        self.log = log
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        with log.open("ab") as out:
            self.p = subprocess.Popen(
                [CONTROLLER, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": path},
            )

    def kill9(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)

    def stop(self) -> None:
        """SIGTERM (a clean stop releases the Lease), SIGKILL after 20 s."""
        processes.stop(self.p, grace=20)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
