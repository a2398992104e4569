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


# --- libvirt fixtures (VM layer) ---
# A real libvirtd + virtlogd (reused if one answers on /run/libvirt/libvirt-sock, else configured and
# started per MACHINE.md by tests/libvirt_daemon.py and stopped at the end of the session), the
# test guest kernel/initramfs (deploy/images/build_guest.py) and bootable disk
# (deploy/images/build_vm_disk.py), and a DomainManager per test whose domains all carry a unique
# name prefix: teardown destroys and undefines every domain with that prefix, even after a failure.
@dataclass
class VMEnv:
    """What a VM-layer integration test gets: a manager, its state dir and a name prefix."""

    manager: object  # cri_shim.vm.DomainManager
    state_dir: Path
    prefix: str

    def name(self, suffix: str) -> str:
        return f"{self.prefix}{suffix}"


@pytest.fixture(scope="session")
def libvirtd():
    """A libvirtd that answers on qemu:///system (started here only if none was running)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs libvirtd/virtlogd and QEMU guests")
    import libvirt_daemon

    state = libvirt_daemon.ensure_libvirtd()
    yield state
    libvirt_daemon.stop_started(state)


@pytest.fixture(scope="session")
def test_guest():
    """The test guest (kernel + busybox initramfs) from deploy/images/build_guest.py."""
    import sys

    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_guest

    return build_guest.build_guest()


@pytest.fixture(scope="session")
def vm_disk():
    """The bootable test disk + its OCI layout from deploy/images/build_vm_disk.py."""
    import sys

    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_vm_disk

    return build_vm_disk.build_vm_disk()


#: the test disk as an OCI containerDisk in the local cluster's registry (a real pull by kubelet)
VM_IMAGE = "127.0.0.1:5000/vm/test-disk:1"


@pytest.fixture(scope="session")
def vm_image(cluster, vm_disk) -> str:
    """:data:`VM_IMAGE`, pushed to the local cluster's registry (skopeo; idempotent)."""
    import build_vm_disk

    build_vm_disk.push(vm_disk, VM_IMAGE)
    return VM_IMAGE


@pytest.fixture
def vm_env(libvirtd, tmp_path_factory) -> Iterator[VMEnv]:
    """A DomainManager (TCG unless the probe says KVM works) with its own state dir."""
    import secrets

    import libvirt

    from cri_shim.vm import DomainManager, ImageStore
    from runtimeclass.probe import DEFAULT_CACHE, probe

    state = tmp_path_factory.mktemp("vmstate")
    images = ImageStore(state, file_roots=[Path.home() / ".cache/edgevirt", state / "imgroot"])
    mgr = DomainManager(
        state,
        domain_type=probe(cache_file=DEFAULT_CACHE).domain_type,
        images=images,
        # one stable wrapper path for all sessions: libvirt caches capabilities per emulator path
        wrapper_dir=REPO / ".local/state/vm-tests/bin",
    )
    env = VMEnv(manager=mgr, state_dir=state, prefix=f"evtest-{secrets.token_hex(3)}-")
    try:
        yield env
    finally:
        conn = libvirt.open("qemu:///system")
        try:
            for dom in conn.listAllDomains():
                if dom.name().startswith(env.prefix):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(0)
        finally:
            conn.close()
            mgr.close()
