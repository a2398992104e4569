"""cni_macvtap.hostroot and the daemon's --host-root: the node's CNI_PATH looked up under the
node's root mounted in a container, symlinks (absolute ones re-rooted) included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cni_macvtap import hostroot, ipam
from cni_macvtap.errors import CNIError


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node's tree: Debian's plugin in /usr/lib/cni, a symlink to it in /opt/cni/bin."""
    root = tmp_path / "host"
    (root / "usr/lib/cni").mkdir(parents=True)
    (root / "opt/cni/bin").mkdir(parents=True)
    plugin = root / "usr/lib/cni/host-local"
    plugin.write_text("#!/bin/sh\n")
    plugin.chmod(0o755)
    (root / "opt/cni/bin/host-local").symlink_to("/usr/lib/cni/host-local")
    (root / "opt/cni/bin/static").symlink_to("../../../usr/lib/cni/host-local")
    return root


def test_an_absolute_symlink_is_followed_under_the_root_not_in_the_container(node: Path) -> None:
    assert hostroot.resolve(str(node), "/opt/cni/bin/host-local") == f"{node}/usr/lib/cni/host-local"


def test_a_relative_symlink_and_dotdot_stay_under_the_root(node: Path) -> None:
    assert hostroot.resolve(str(node), "/opt/cni/bin/static") == f"{node}/usr/lib/cni/host-local"
    (node / "opt/cni/bin/escape").symlink_to("../../../../../../../etc/passwd")
    assert hostroot.resolve(str(node), "/opt/cni/bin/escape") == f"{node}/etc/passwd"


def test_a_missing_path_comes_back_unresolved_and_a_loop_is_refused(node: Path) -> None:
    assert hostroot.resolve(str(node), "/opt/cni/bin/nope") == f"{node}/opt/cni/bin/nope"
    (node / "opt/cni/bin/a").symlink_to("/opt/cni/bin/b")
    (node / "opt/cni/bin/b").symlink_to("/opt/cni/bin/a")
    with pytest.raises(OSError, match="more than 40 symbolic links"):
        hostroot.resolve(str(node), "/opt/cni/bin/a")
    with pytest.raises(ValueError, match="must be absolute"):
        hostroot.resolve(str(node), "opt/cni/bin/a")


def test_find_plugin_looks_in_the_nodes_directories(node: Path, monkeypatch) -> None:
    path = ["/opt/cni/bin", "/usr/lib/cni"]
    # without a host root the container's own /opt/cni/bin is searched (no such plugin there)
    monkeypatch.setattr(ipam, "HOST_ROOT", "")
    if not os.path.exists("/opt/cni/bin/edgevirt-test-none"):
        with pytest.raises(CNIError, match="failed to find IPAM plugin 'edgevirt-test-none'"):
            ipam.find_plugin("edgevirt-test-none", path)
    monkeypatch.setattr(ipam, "HOST_ROOT", str(node))
    assert ipam.find_plugin("host-local", path) == f"{node}/usr/lib/cni/host-local"
    with pytest.raises(CNIError, match=f"the node's, under {node}"):
        ipam.find_plugin("dhcp", path)


def test_the_daemon_refuses_a_host_root_that_is_not_a_directory(tmp_path: Path, capsys) -> None:
    from cni_macvtap import daemon

    with pytest.raises(SystemExit):
        daemon.main(["--socket", str(tmp_path / "s.sock"), "--host-root", str(tmp_path / "none")])
    assert "--host-root" in capsys.readouterr().err
