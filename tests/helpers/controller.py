"""edgevirt-controller as a subprocess of a test or benchmark: output appended to a log file, kill -9,
and a bounded stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import processes

#: the controller's console script, next to the Python running the tests
CONTROLLER = str(Path(sys.executable).parent / "edgevirt-controller")


class ControllerProcess:
    """``edgevirt-controller <args>`` running, its output appended to ``log``."""

    def __init__(self, args: list[str], log: Path, identity: str) -> None:
        self.identity = identity
        self.log = log
        with log.open("ab") as out:
            self.p = subprocess.Popen([CONTROLLER, *args], stdout=out, stderr=subprocess.STDOUT)

    def kill9(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(30)

    def stop(self) -> None:
        """SIGTERM (a clean stop releases the Lease), SIGKILL after 20 s."""
        processes.stop(self.p, grace=20)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
