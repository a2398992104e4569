"""An edgevirt-cri process of a test's own (config, socket, state dir under /var/tmp), in front of a
containerd (usually a :class:`helpers.containerd.PrivateContainerd`), with crictl as the client.
Used by the CRI tests, deploy/cri/run_critest.py and bench/cri."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from helpers import REPO, processes
from helpers.containerd import unix_socket_answers
from helpers.crictl import Crictl
from helpers.waiting import wait_for

PYTHON = str(REPO / ".venv" / "bin" / "python")


@dataclass
class Shim:
    """An edgevirt-cri process with its own config, socket and state dir."""

    root: Path
    containerd_socket: Path
    extra_config: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls, containerd_socket: Path, extra_config: dict | None = None) -> Shim:
        root = Path(tempfile.mkdtemp(prefix="edgevirt-cri-", dir="/var/tmp"))
        return cls(root=root, containerd_socket=containerd_socket, extra_config=dict(extra_config or {}))

    @property
    def socket(self) -> Path:
        return self.root / "cri.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "edgevirt-cri.log"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def crictl(self) -> Crictl:
        """crictl against this edgevirt-cri: ``shim.crictl("pods", ...)``."""
        return Crictl(self.endpoint)

    def write_config(self) -> Path:
        import yaml

        cfg = {
            "socket": str(self.socket),
            "state_dir": str(self.state_dir),
            "backends": {"containerd": {"type": "containerd", "socket": str(self.containerd_socket)}},
            "handlers": {"": "containerd", "runc": "containerd", "kata": "containerd"},
            **self.extra_config,
        }
        self.config.write_text(yaml.safe_dump(cfg))
        return self.config

    def start(self) -> Shim:
        self.write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "cri_shim.cli", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
            )
        wait_for(f"edgevirt-cri on {self.socket} (log {self.log})", self._ready, 60, 0.1, retry_on=(OSError,))
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"edgevirt-cri exited ({self.proc.returncode}); log:\n{self.log.read_text()}")
        return unix_socket_answers(self.socket)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            processes.stop(self.proc, grace=15)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
