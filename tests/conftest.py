"""Shared pytest fixtures: the local single-node cluster, network namespaces, libvirt.

Each block below belongs to one part of the system; keep fixtures in their block.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from localcluster import cluster as localcluster
from localcluster.paths import Paths, node_name

REPO = Path(__file__).resolve().parents[1]


# --- local cluster fixtures (foundation) ---
@dataclass
class Cluster:
    """A handle on the running local cluster for tests: kubectl/crictl with the right endpoints."""

    paths: Paths
    node: str
    started_here: bool

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.paths.kubeconfig),
            "PATH": f"{self.paths.bin}:{os.environ['PATH']}",
        }

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120):
        return subprocess.run(
            [self.paths.tool("kubectl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=timeout,
        )

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def crictl(self, *args: str, check: bool = True, timeout: float = 60):
        return subprocess.run(
            [
                self.paths.tool("crictl"),
                "--runtime-endpoint",
                f"unix://{self.paths.containerd_sock}",
                "--image-endpoint",
                f"unix://{self.paths.containerd_sock}",
                *args,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def up(self, *components: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / "deploy/local/up"), *components], capture_output=True, text=True, timeout=600
        )

    def down(self) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / "deploy/local/down")], capture_output=True, text=True, timeout=300)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the local cluster runs containerd, kubelet and network namespaces")


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local single-node cluster: reuses a running one, else brings one up (deploy/local/up) and
    takes it down again at the end of the session."""
    _require_root()
    paths = Paths.default()
    was_running = localcluster.node_ready(paths) if paths.kubeconfig.exists() else False
    c = Cluster(paths=paths, node=node_name(), started_here=not was_running)
    res = c.up()
    assert res.returncode == 0, f"deploy/local/up failed:\n{res.stdout}\n{res.stderr}"
    yield c
    if c.started_here and not os.environ.get("EDGEVIRT_KEEP_CLUSTER"):
        res = c.down()
        assert res.returncode == 0, f"deploy/local/down left things behind:\n{res.stdout}\n{res.stderr}"
