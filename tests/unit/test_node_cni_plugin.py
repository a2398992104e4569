"""The DaemonSet's macvtap plugin copy and what uninstall removes of the DaemonSets': the copy is
written atomically with its marker, is idempotent, keeps a foreign file or link it replaces and puts
it back; uninstall removes only a copy that is still ours, the Node's edgevirt.io/ labels with the
kubelet's kubeconfig (a fake API here), works without an install record, is idempotent, and its
command line names a missing --kubeconfig."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import pytest

from cri_shim.node import cli
from cri_shim.node.cni_plugin import backup_path, install_plugin, marker_path, read_marker, remove_plugin
from cri_shim.node.kubeapi import NodeApiError
from cri_shim.node.node_cleanup import NodeCleanup
from cri_shim.node.options import InstallError, NodeOptions
from cri_shim.node.undo import uninstall

pytestmark = pytest.mark.timeout(60)


def tree(d: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for p in sorted(d.iterdir()):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            out[p.name] = ("link", os.readlink(p))
        else:
            out[p.name] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


@pytest.fixture
def bins(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the image's plugin v1, v2, the host's CNI bin dir with a reference plugin in it)"""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.write_bytes(b"\x7fELF plugin v1")
    v2.write_bytes(b"\x7fELF plugin v2")
    bin_dir = tmp_path / "opt-cni-bin"
    bin_dir.mkdir()
    (bin_dir / "host-local").write_bytes(b"reference plugin")
    return v1, v2, bin_dir


def test_install_writes_the_plugin_and_its_marker_and_is_idempotent(bins) -> None:
    v1, _, bin_dir = bins
    assert install_plugin(v1, bin_dir).action == "created"
    assert (bin_dir / "macvtap").read_bytes() == v1.read_bytes()
    assert stat.S_IMODE((bin_dir / "macvtap").stat().st_mode) == 0o755
    marker = json.loads(marker_path(bin_dir).read_text())
    assert marker["file"] == "macvtap" and len(marker["ours"]) == 1 and marker["backup"] is None
    before = tree(bin_dir)
    assert install_plugin(v1, bin_dir).action == "unchanged"
    assert tree(bin_dir) == before
    assert not any(".tmp" in n or "edgevirt-tmp" in n for n in os.listdir(bin_dir))


def test_an_upgrade_replaces_our_copy_and_uninstall_removes_it(bins) -> None:
    v1, v2, bin_dir = bins
    before = tree(bin_dir)
    install_plugin(v1, bin_dir)
    assert install_plugin(v2, bin_dir).action == "updated"
    assert (bin_dir / "macvtap").read_bytes() == v2.read_bytes()
    change = remove_plugin(bin_dir)
    assert change is not None and change.action == "removed"
    assert tree(bin_dir) == before
    assert remove_plugin(bin_dir) is None  # idempotent: nothing of ours left


@pytest.mark.parametrize("kind", ["file", "link"])
def test_a_foreign_plugin_is_kept_and_put_back(bins, kind: str) -> None:
    v1, _, bin_dir = bins
    if kind == "file":
        (bin_dir / "macvtap").write_bytes(b"install-plugin's client")
        (bin_dir / "macvtap").chmod(0o750)
    else:
        (bin_dir / "macvtap").symlink_to("/usr/lib/cni/macvtap")
    before = tree(bin_dir)
    change = install_plugin(v1, bin_dir)
    assert change.action == "replaced" and "uninstall puts it back" in change.note
    assert (bin_dir / "macvtap").read_bytes() == v1.read_bytes()
    install_plugin(v1, bin_dir)  # a restarted init container keeps the first backup
    restored = remove_plugin(bin_dir)
    assert restored is not None and restored.action == "restored"
    assert tree(bin_dir) == before


def test_a_plugin_replaced_since_is_left_alone(bins) -> None:
    v1, _, bin_dir = bins
    install_plugin(v1, bin_dir)
    (bin_dir / "macvtap").write_bytes(b"somebody else's, written later")
    change = remove_plugin(bin_dir)
    assert change is not None and change.action == "kept"
    assert (bin_dir / "macvtap").read_bytes() == b"somebody else's, written later"
    assert not marker_path(bin_dir).exists() and not backup_path(bin_dir).exists()


def test_without_a_readable_marker_nothing_is_ours(bins) -> None:
    v1, _, bin_dir = bins
    install_plugin(v1, bin_dir)
    marker_path(bin_dir).write_text("{not json")
    assert read_marker(bin_dir) is None
    assert remove_plugin(bin_dir) is None
    assert (bin_dir / "macvtap").read_bytes() == v1.read_bytes()


def test_a_directory_in_the_way_is_refused(bins) -> None:
    v1, _, bin_dir = bins
    (bin_dir / "macvtap").mkdir()
    with pytest.raises(FileExistsError, match="not replacing"):
        install_plugin(v1, bin_dir)
    assert not marker_path(bin_dir).exists()


class FakeKubelet:
    """The kubelet's view of the API: its own Node's labels."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self.node = {
            "kubernetes.io/hostname": "n1",
            "edgevirt.io/kvm": "false",
            "edgevirt.io/kvm-handler": "true",
        }
        self.fail = False

    def whoami(self) -> tuple[str, dict[str, list[str]]]:
        return "system:node:n1", {}

    def labels(self, node: str) -> dict[str, str]:
        assert node == "n1"
        return dict(self.node)

    def patch_labels(self, node: str, patch: Mapping[str, object]) -> dict[str, str]:
        if self.fail:
            raise NodeApiError("patch node n1: 403 Forbidden")
        for k, v in patch["metadata"]["labels"].items():  # type: ignore[index]
            assert v is None
            self.node.pop(k)
        return dict(self.node)


@pytest.fixture
def kubelet(tmp_path: Path) -> tuple[FakeKubelet, NodeCleanup]:
    kubeconfig = tmp_path / "kubelet.conf"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    fake = FakeKubelet(str(kubeconfig))
    return fake, NodeCleanup(kubeconfig=kubeconfig, kubeconfig_given=True, api=lambda _: fake)


def test_uninstall_without_a_record_removes_the_plugin_copy_and_the_labels(
    bins, kubelet, tmp_path: Path
) -> None:
    v1, _, bin_dir = bins
    fake, cleanup = kubelet
    root = tmp_path / "root"
    (root / "opt/cni").mkdir(parents=True)
    bin_dir.rename(root / "opt/cni/bin")
    before = tree(root / "opt/cni/bin")
    install_plugin(v1, root / "opt/cni/bin")
    opts = NodeOptions(root=root)
    outcome = uninstall(opts, cleanup=cleanup)
    assert outcome.ok and outcome.changed
    assert [(c.action, c.kind, c.path) for c in outcome.changes] == [
        ("removed", "file", "/opt/cni/bin/macvtap"),
        ("removed", "label", "node/n1"),
    ]
    assert outcome.changes[1].note == "edgevirt.io/kvm, edgevirt.io/kvm-handler"
    assert fake.node == {"kubernetes.io/hostname": "n1"}
    assert tree(root / "opt/cni/bin") == before
    again = uninstall(opts, cleanup=cleanup)
    assert again.ok and not again.changed and again.changes == []


def test_an_api_failure_is_reported_and_not_ok(kubelet, tmp_path: Path) -> None:
    fake, cleanup = kubelet
    fake.fail = True
    outcome = uninstall(NodeOptions(root=tmp_path), cleanup=cleanup)
    assert not outcome.ok and any(
        "403 Forbidden" in w and "run uninstall again" in w for w in outcome.warnings
    )


def test_a_missing_kubeconfig(tmp_path: Path, capsys) -> None:
    default = NodeCleanup(kubeconfig=tmp_path / "absent.conf")
    outcome = uninstall(NodeOptions(root=tmp_path), cleanup=default)
    assert outcome.ok and any("labels were left" in w for w in outcome.warnings)
    given = NodeCleanup(kubeconfig=tmp_path / "absent.conf", kubeconfig_given=True)
    with pytest.raises(InstallError, match="--kubeconfig"):
        uninstall(NodeOptions(root=tmp_path), cleanup=given)
    assert cli.main(["uninstall", f"--root={tmp_path}", f"--kubeconfig={tmp_path / 'absent.conf'}"]) == 2
    assert "--kubeconfig" in capsys.readouterr().err


def test_the_command_line_installs_and_removes_the_copy(bins, tmp_path: Path, capsys) -> None:
    v1, _, bin_dir = bins
    root = tmp_path / "root"
    (root / "opt/cni").mkdir(parents=True)
    bin_dir.rename(root / "opt/cni/bin")
    argv = ["install-cni-plugin", f"--source={v1}", f"--bin-dir={root / 'opt/cni/bin'}", "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["changes"][0]["action"] == "created"
    assert cli.main(["uninstall", f"--root={root}", "--json"]) == 0  # staged root: labels left alone
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and [c["path"] for c in out["changes"]] == ["/opt/cni/bin/macvtap"]
    assert not (root / "opt/cni/bin/macvtap").exists()
