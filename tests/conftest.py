"""Shared pytest fixtures: the local single-node cluster, libvirt and the VM test images.

Fixtures only; what they hand out lives in tests/helpers/ (imported as ``helpers.<module>``: pytest
puts tests/ on sys.path for this rootdir conftest). Each block belongs to one part of the system;
keep fixtures in their block.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import REPO, libvirt_daemon
from helpers.cluster import Cluster
from helpers.cni_env import Topology, topology
from helpers.installed import Installed, paused
from helpers.root import require_root
from helpers.vm_env import VM_IMAGE, VMEnv, remove_domains
from helpers.waiting import wait_for
from localcluster import cluster as localcluster
from localcluster import clusterside
from localcluster.paths import Paths, node_name


# --- local cluster fixtures (foundation) ---
@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local single-node cluster: reuses a running one, else brings one up (deploy/local/up) and
    takes it down again at the end of the session. ``up`` runs either way (it only starts what is
    missing or out of date); with ``EDGEVIRT_NO_UP=1`` a Ready cluster is used exactly as it is (to
    test a branch's code against a cluster another checkout runs)."""
    require_root("the local cluster runs containerd, kubelet and network namespaces")
    paths = Paths.default()
    was_running = localcluster.node_ready(paths) if paths.kubeconfig.exists() else False
    c = Cluster(paths=paths, node=node_name(), started_here=not was_running)
    if os.environ.get("EDGEVIRT_NO_UP"):
        assert was_running, "EDGEVIRT_NO_UP=1, but the local cluster is not Ready: run deploy/local/up"
        c.started_here = False
    else:
        res = c.up()
        assert res.returncode == 0, f"deploy/local/up failed:\n{res.stdout}\n{res.stderr}"
    yield c
    if c.started_here and not os.environ.get("EDGEVIRT_KEEP_CLUSTER"):
        res = c.down()
        assert res.returncode == 0, f"deploy/local/down left things behind:\n{res.stdout}\n{res.stderr}"


# --- edgevirt's cluster side, installed as an operator installs it ---
@pytest.fixture(scope="session")
def edgevirt_installed(cluster) -> Iterator[Installed]:
    """edgevirt-controller (both modes) installed by deploy/local/install-edgevirt: this checkout's
    image built (cached by its inputs: seconds when nothing changed) and pushed, `kubectl apply -k
    deploy/` pinned to its digest, the rollouts waited for. Tests use these controllers, never their
    own. Removed at the end of the session if the session installed it (after every VM is gone),
    unless EDGEVIRT_KEEP_CLUSTER is set."""
    was_installed = (
        cluster.kubectl(
            "get", "deployment", clusterside.DEPLOYMENT, "-n", clusterside.NAMESPACE, check=False
        ).returncode
        == 0
    )
    image = clusterside.install(cluster.paths, quiet=True)
    yield Installed(cluster, image)
    if was_installed or os.environ.get("EDGEVIRT_KEEP_CLUSTER"):
        return
    cluster.kubectl("delete", "vm", "--all", "-A", "--wait=false", check=False)
    wait_for("every VirtualMachine gone", lambda: not clusterside.virtual_machines(cluster.paths), 300, 2)
    clusterside.uninstall(cluster.paths)


@pytest.fixture(scope="module")
def installed_controllers_paused(cluster) -> Iterator[None]:
    """For modules that run controllers of their own (or write what controllers write): the installed
    ones stand aside for the module (helpers.installed.paused) and come back afterwards."""
    with paused(cluster):
        yield


# --- macvtap CNI fixtures ---
@pytest.fixture
def topo(tmp_path) -> Iterator[Topology]:
    """A macvtap CNI topology (helpers/cni_env.py) with its daemon running, torn down after the test.
    Modules that need another (both modes, module scope, the VM network's own) define their ``topo``."""
    with topology(tmp_path, daemon=True) as t:
        yield t


# --- libvirt fixtures (VM layer) ---
# A real libvirtd + virtlogd (reused if one answers on /run/libvirt/libvirt-sock, else configured and
# started by helpers/libvirt_daemon.py and stopped at the end of the session), the test guest
# kernel/initramfs (deploy/images/build_guest.py) and bootable disk (deploy/images/build_vm_disk.py),
# and a DomainManager per test whose domains all carry a unique name prefix: teardown destroys and
# undefines every domain with that prefix, even after a failure.
@pytest.fixture(scope="session")
def libvirtd():
    """A libvirtd that answers on qemu:///system (started here only if none was running)."""
    require_root("runs libvirtd/virtlogd and QEMU guests")
    state = libvirt_daemon.ensure_libvirtd()
    yield state
    libvirt_daemon.stop_started(state)


@pytest.fixture(scope="session")
def test_guest():
    """The test guest (kernel + busybox initramfs) from deploy/images/build_guest.py."""
    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_guest

    return build_guest.build_guest()


@pytest.fixture(scope="session")
def vm_disk():
    """The bootable test disk + its OCI layout from deploy/images/build_vm_disk.py."""
    sys.path.insert(0, str(REPO / "deploy/images"))
    import build_vm_disk

    return build_vm_disk.build_vm_disk()


@pytest.fixture(scope="session")
def vm_image(cluster, vm_disk) -> str:
    """:data:`helpers.vm_env.VM_IMAGE`, pushed to the local cluster's registry (skopeo; idempotent)
    and pulled into its containerd: the kvm handler boots what containerd holds under the tag (as
    kubelet's IfNotPresent does), so a rebuilt test disk must replace the tag there too."""
    import build_vm_disk

    build_vm_disk.push(vm_disk, VM_IMAGE)
    cluster.crictl("pull", VM_IMAGE, timeout=300)
    return VM_IMAGE


@pytest.fixture
def vm_env(libvirtd, tmp_path_factory) -> Iterator[VMEnv]:
    """A DomainManager (TCG unless the probe says KVM works) with its own state dir."""
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
        try:
            remove_domains(env.prefix)
        finally:
            mgr.close()
