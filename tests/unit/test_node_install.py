"""edgevirt-node install/uninstall/status under a temporary --root: what is written (modes, links),
the record (written before acting, enough to undo a crash halfway), idempotence, updates when the
flags change, files and directories that were there before put back byte for byte, data kept,
later edits of qemu.conf kept, errors that name the flag and leave the root untouched, and the
command line (--json, exit codes)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import stat
import sys
from pathlib import Path

import pytest
import yaml

from cri_shim.node import apply, cli, qemu_conf, record
from cri_shim.node.apply import install
from cri_shim.node.options import InstallError, NodeOptions
from cri_shim.node.status import status
from cri_shim.node.undo import uninstall

pytestmark = pytest.mark.timeout(120)

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "vm",
    "plugins": [{"type": "macvtap", "master": "eth0", "tapGroup": "kvm", "tapMode": "0660"}],
}


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: kind, mode, and content or link target."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode))
        else:
            out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


def mtimes(root: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture
def node(tmp_path):
    """A root to install into, and what its files point at (outside the root, as on a node)."""
    root, live = tmp_path / "root", tmp_path / "live"
    (root / "etc" / "libvirt").mkdir(parents=True)
    (root / "etc" / "libvirt" / "qemu.conf").write_text('# the distribution\'s qemu.conf\n#user = "root"\n')
    live.mkdir()
    containerd = live / "containerd.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(containerd))
    (live / "vm.conflist").write_text(json.dumps(CONFLIST))
    opts = NodeOptions(
        root=root,
        containerd_socket=containerd,
        vm_conflist=live / "vm.conflist",
        cri_binary=Path(sys.executable),
        macvtap_binary=Path(sys.executable),
    )
    return root, opts


def test_install_writes_everything_with_its_mode_and_a_record(node):
    root, opts = node
    outcome = install(opts)
    assert outcome.changed and outcome.warnings == []
    mode = lambda p: stat.S_IMODE((root / p).lstat().st_mode)  # noqa: E731
    assert mode("var/lib/edgevirt/cri") == 0o700 and mode("var/lib/edgevirt/cri-kvm") == 0o700
    assert mode("var/lib/edgevirt/vm") == 0o711 and mode("var/lib/edgevirt/images") == 0o711
    for f in (
        "etc/edgevirt/cri.yaml",
        "etc/systemd/system/edgevirt-cri.service",
        "etc/systemd/system/edgevirt-macvtap.service",
        "etc/systemd/system/kubelet.service.d/50-edgevirt.conf",
        "etc/kubernetes/kubelet.conf.d/50-edgevirt.conf",
    ):
        assert mode(f) == 0o644, f
    wants = root / "etc/systemd/system/multi-user.target.wants/edgevirt-cri.service"
    assert os.readlink(wants) == "/etc/systemd/system/edgevirt-cri.service"
    assert (root / "etc/libvirt/qemu.conf").read_text().startswith("# the distribution")  # secure: untouched
    rec = record.load(root / "var/lib/edgevirt/node-install.json")
    assert rec is not None and mode("var/lib/edgevirt/node-install.json") == 0o600
    assert {e.path for e in rec.entries} >= {
        "/etc/edgevirt/cri.yaml",
        "/var/lib/edgevirt/cri",
        "/etc/edgevirt",
    }
    info = outcome.info["units"]["edgevirt-cri.service"]
    assert info["exec_start"][0] == sys.executable and "--config=/etc/edgevirt/cri.yaml" in info["exec_start"]


def test_install_twice_is_a_no_op_and_uninstall_leaves_the_root_as_it_was(node):
    root, opts = node
    before = snapshot(root)
    install(opts)
    after_first = mtimes(root)
    again = install(opts)
    assert not again.changed and mtimes(root) == after_first
    assert uninstall(opts).changed
    assert snapshot(root) == before
    assert not uninstall(opts).changed  # nothing left to undo


def test_the_record_is_written_before_acting_so_a_crash_halfway_can_be_undone(node, monkeypatch):
    root, opts = node
    before = snapshot(root)
    real_make = apply._make
    made = []

    def crash_after_four(*args):
        if len(made) == 4:
            raise OSError("disk on fire")
        made.append(args[1].path)
        return real_make(*args)

    monkeypatch.setattr(apply, "_make", crash_after_four)
    with pytest.raises(OSError, match="disk on fire"):
        install(dataclasses.replace(opts, libvirt_relaxed=True))
    rec = record.load(root / "var/lib/edgevirt/node-install.json")
    assert rec is not None and len(rec.entries) > len(made)  # it names what was about to be made too
    monkeypatch.undo()
    uninstall(opts)
    assert snapshot(root) == before


def test_what_was_there_before_is_put_back_exactly(node):
    root, opts = node
    (root / "etc/edgevirt").mkdir(parents=True)
    (root / "etc/edgevirt/cri.yaml").write_text("a hand-written config\n")
    os.chmod(root / "etc/edgevirt/cri.yaml", 0o600)
    (root / "var/lib/edgevirt/cri").mkdir(parents=True, mode=0o755)
    os.chmod(root / "var/lib/edgevirt/cri", 0o755)
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "edgevirt-cri.service").symlink_to("/lib/systemd/system/somewhere-else.service")
    before = snapshot(root)
    install(dataclasses.replace(opts, libvirt_relaxed=True))
    assert stat.S_IMODE((root / "var/lib/edgevirt/cri").stat().st_mode) == 0o700
    assert (root / "etc/libvirt/qemu.conf").read_text().startswith(qemu_conf.BEGIN)
    uninstall(opts)
    assert snapshot(root) == before


def test_changed_flags_update_the_node_and_drop_what_is_no_longer_wanted(node):
    root, opts = node
    before = snapshot(root)
    install(opts)
    unit = root / "etc/systemd/system/edgevirt-cri.service"
    outcome = install(dataclasses.replace(opts, macvtap_daemon=False, ops_address="127.0.0.1:19641"))
    assert outcome.changed and "--ops-address=127.0.0.1:19641" in unit.read_text()
    assert not (root / "etc/systemd/system/edgevirt-macvtap.service").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/edgevirt-macvtap.service").is_symlink()
    rec = record.load(root / "var/lib/edgevirt/node-install.json")
    assert rec is not None and not any("macvtap" in e.path for e in rec.entries)
    uninstall(opts)
    assert snapshot(root) == before


def test_state_with_data_is_kept_unless_purged(node):
    root, opts = node
    install(opts)
    (root / "var/lib/edgevirt/vm/disk.qcow2").write_bytes(b"a VM's disk")
    outcome = uninstall(opts)
    kept = [c for c in outcome.changes if c.action == "kept"]
    assert [c.path for c in kept] == ["/var/lib/edgevirt/vm"] and "--purge" in kept[0].note
    assert (root / "var/lib/edgevirt/vm/disk.qcow2").exists()
    assert not (root / "var/lib/edgevirt/node-install.json").exists()
    assert not (root / "etc/edgevirt").exists() and not (root / "var/lib/edgevirt/cri").exists()
    install(opts)  # the directory with the disk is there before this install: never its to remove
    uninstall(opts, purge=True)
    assert (root / "var/lib/edgevirt/vm/disk.qcow2").exists()


def test_purge_removes_state_directories_the_install_made_with_their_content(node):
    root, opts = node
    before = snapshot(root)
    install(opts)
    (root / "var/lib/edgevirt/vm/disk.qcow2").write_bytes(b"a VM's disk")
    (root / "var/lib/edgevirt/cri/sandboxes").mkdir()
    uninstall(opts, purge=True)
    assert snapshot(root) == before


def test_edits_of_qemu_conf_after_install_stay_and_only_the_block_goes(node):
    root, opts = node
    conf = root / "etc/libvirt/qemu.conf"
    original = conf.read_text()
    install(dataclasses.replace(opts, libvirt_relaxed=True))
    conf.write_text(conf.read_text() + "max_files = 4096\n")
    outcome = uninstall(opts)
    assert conf.read_text() == original + "max_files = 4096\n"
    assert any("only our block" in c.note for c in outcome.changes)


def test_relaxed_libvirt_on_a_node_without_qemu_conf_creates_and_removes_it(node):
    root, opts = node
    (root / "etc/libvirt/qemu.conf").unlink()
    before = snapshot(root)
    install(dataclasses.replace(opts, libvirt_relaxed=True))
    assert (root / "etc/libvirt/qemu.conf").read_text() == qemu_conf.block()
    uninstall(opts)
    assert snapshot(root) == before


@pytest.mark.parametrize(
    ("change", "flag"),
    [
        (lambda o, live: dataclasses.replace(o, containerd_socket=live / "none.sock"), "--containerd-socket"),
        (
            lambda o, live: dataclasses.replace(o, containerd_socket=live / "vm.conflist"),
            "--containerd-socket",
        ),
        (lambda o, live: dataclasses.replace(o, vm_conflist=live / "missing.conflist"), "--vm-conflist"),
        (lambda o, live: dataclasses.replace(o, vm_conflist=live / "containerd.sock"), "--vm-conflist"),
        (lambda o, live: dataclasses.replace(o, cri_binary=live / "vm.conflist"), "--cri-binary"),
        (lambda o, live: dataclasses.replace(o, macvtap_binary=live / "nope"), "--macvtap-binary"),
        (lambda o, live: dataclasses.replace(o, state_dir=Path("var/lib/x")), "--state-dir"),
        (lambda o, live: dataclasses.replace(o, kvm_options=(("state_dir", "/x"),)), "--kvm-state-dir"),
        (lambda o, live: dataclasses.replace(o, ops_address="localhost"), "--ops-address"),
        (lambda o, live: dataclasses.replace(o, socket=o.containerd_socket), "--socket"),
    ],
)
def test_a_bad_flag_is_named_and_nothing_is_written(node, change, flag):
    root, opts = node
    before = snapshot(root)
    with pytest.raises(InstallError, match=flag):
        install(change(opts, opts.containerd_socket.parent))
    assert snapshot(root) == before


def test_without_the_socket_check_a_missing_containerd_socket_is_a_warning(node):
    root, opts = node
    later = opts.containerd_socket.parent / "later.sock"
    outcome = install(dataclasses.replace(opts, containerd_socket=later, check_sockets=False))
    assert outcome.changed and any(
        w.startswith(f"--containerd-socket: no socket at {later}") for w in outcome.warnings
    )
    assert f"socket: {later}" in (root / "etc/edgevirt/cri.yaml").read_text()


def test_something_in_the_way_is_named_and_nothing_is_written(node):
    root, opts = node
    (root / "var/lib/edgevirt").mkdir(parents=True)
    (root / "var/lib/edgevirt/cri").write_text("a file where the state directory goes")
    before = snapshot(root)
    with pytest.raises(
        InstallError, match="--state-dir: /var/lib/edgevirt/cri exists and is not a directory"
    ):
        install(opts)
    assert snapshot(root) == before


def test_without_kvm_no_conflist_is_needed(node):
    root, opts = node
    install(dataclasses.replace(opts, kvm=False, vm_conflist=Path("/nonexistent/x.conflist")))
    config = yaml.safe_load((root / "etc/edgevirt/cri.yaml").read_text())
    assert set(config["backends"]) == {"containerd"} and "kvm" not in config["handlers"]
    assert not (root / "var/lib/edgevirt/vm").exists()


def test_conflist_warnings(node):
    _, opts = node
    tap_root = {**CONFLIST, "plugins": [{"type": "macvtap", "daemonSocket": "/run/other.sock"}]}
    opts.vm_conflist.write_text(json.dumps(tap_root))
    warnings = install(opts).warnings
    assert any("tapGroup" in w and "libvirt-qemu" in w for w in warnings)
    assert any("/run/other.sock" in w and "--macvtap-socket" in w for w in warnings)
    relaxed = install(dataclasses.replace(opts, libvirt_relaxed=True)).warnings
    assert not any("tapGroup" in w for w in relaxed)


def test_status_reports_missing_and_modified(node):
    root, opts = node
    assert not status(opts).ok
    install(opts)
    good = status(opts)
    assert good.ok and {c.action for c in good.changes} == {"ok"}
    assert good.info == {"edgevirt-cri socket": "not serving", "macvtap-daemon socket": "not serving"}
    (root / "etc/systemd/system/edgevirt-cri.service").write_text("[Unit]\n")
    (root / "etc/kubernetes/kubelet.conf.d/50-edgevirt.conf").unlink()
    bad = {c.path: c.action for c in status(opts).changes if c.action != "ok"}
    assert bad == {
        "/etc/systemd/system/edgevirt-cri.service": "modified",
        "/etc/kubernetes/kubelet.conf.d/50-edgevirt.conf": "missing",
    }
    assert not status(opts).ok
    assert install(opts).changed and status(opts).ok  # install repairs it


def _argv(opts: NodeOptions, *extra: str) -> list[str]:
    return [
        "install",
        f"--root={opts.root}",
        f"--containerd-socket={opts.containerd_socket}",
        f"--vm-conflist={opts.vm_conflist}",
        f"--cri-binary={opts.cri_binary}",
        f"--macvtap-binary={opts.macvtap_binary}",
        *extra,
    ]


def test_the_command_line(node, capsys):
    root, opts = node
    before = snapshot(root)
    assert cli.main([*_argv(opts), "--json", "--image-root=", "--kvm-option", "max_volumes=8"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["changed"] and out["ok"] and out["info"]["sockets"]["edgevirt-cri"] == "/run/edgevirt/cri.sock"
    assert out["info"]["units"]["edgevirt-macvtap.service"]["exec_start"][1] == "daemon"
    config = (root / "etc/edgevirt/cri.yaml").read_text()
    assert "image_roots: []" in config and "max_volumes: 8" in config
    assert cli.main(["status", f"--root={root}"]) == 0
    (root / "etc/edgevirt/cri.yaml").write_text("changed\n")
    assert cli.main(["status", f"--root={root}", "--json"]) == 3
    capsys.readouterr()
    assert cli.main(["uninstall", f"--root={root}"]) == 0
    assert snapshot(root) == before
    assert cli.main(["status", f"--root={root}"]) == 3


def test_command_line_errors_name_the_flag_in_json_too(node, capsys):
    root, opts = node
    bad = [
        a if not a.startswith("--containerd-socket") else "--containerd-socket=/nonexistent.sock"
        for a in _argv(opts)
    ]
    assert cli.main([*bad, "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False and "--containerd-socket: no socket at /nonexistent.sock" in doc["error"]
    assert "--containerd-socket" in captured.err
    assert cli.main(["install", f"--root={root / 'missing'}"]) == 2
    with pytest.raises(SystemExit):
        cli.main([*_argv(opts), "--kvm-option", "novalue"])
