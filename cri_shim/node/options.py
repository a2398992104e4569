"""The installer's settings (:class:`NodeOptions`) and their checks.

Every path the installer writes and every socket it points at is a setting with a flag, so the
local cluster can put everything under its own state directory. Paths are as the node's services
see them; ``root`` (``--root``) only prefixes where the installer writes (tests, image builds). What
the written files point at - containerd's socket, the VM network's conflist, the binaries - is
checked where it is, and a problem is an :class:`InstallError` naming the flag and the fix
(``--no-socket-check`` makes a missing socket a warning: staging, or containerd starting later).
Checks that cannot make the install wrong, only the node's VMs unhappy, are warnings.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..ops_http import AddressError, parse_address

CRI_UNIT = "edgevirt-cri.service"
MACVTAP_UNIT = "edgevirt-macvtap.service"
KUBELET_UNIT = "kubelet.service"
DROPIN_NAME = "50-edgevirt.conf"
DEFAULT_MACVTAP_SOCKET = Path("/run/edgevirt/macvtap.sock")  # the plugin's own default (cni_macvtap)
# Options of the kvm backend the installer writes itself; --kvm-option may not set them.
OWN_KVM_OPTIONS = {
    "state_dir": "--kvm-state-dir",
    "cni_conflist": "--vm-conflist",
    "vm_state_dir": "--vm-state-dir",
    "cni_bin_dirs": "--cni-bin-dir",
    "libvirt_uri": "--libvirt-uri",
    "image_roots": "--image-root",
    "insecure_registries": "--insecure-registry",
    "host_disk_root": "--host-disk-root",
    "kubelet_root_dir": "--kubelet-root-dir",
    "containerd_socket": "--containerd-socket",
    "containerd_root": "--containerd-root",
}


class InstallError(Exception):
    """The install cannot go ahead; the message names the flag(s) and the fix. Nothing was changed."""


@dataclass(frozen=True)
class NodeOptions:
    """What to install and where. Defaults are those of a real node."""

    root: Path = Path("/")
    # files the installer writes
    config_path: Path = Path("/etc/edgevirt/cri.yaml")
    unit_dir: Path = Path("/etc/systemd/system")
    kubelet_config_dir: Path = Path("/etc/kubernetes/kubelet.conf.d")
    kubelet_unit_dropin_dir: Path | None = None  # None: <unit_dir>/kubelet.service.d
    kubelet_evented_pleg: bool = False  # the drop-in turns kubelet's EventedPLEG gate on
    qemu_conf: Path = Path("/etc/libvirt/qemu.conf")
    record: Path = Path("/var/lib/edgevirt/node-install.json")
    # edgevirt-cri
    cri_binary: Path | None = None  # None: found next to this Python, else on PATH
    socket: Path = Path("/run/edgevirt/cri.sock")
    state_dir: Path = Path("/var/lib/edgevirt/cri")
    containerd_socket: Path = Path("/run/containerd/containerd.sock")
    containerd_root: Path = Path("/var/lib/containerd")  # its `root`: the kvm handler reads layers there
    check_sockets: bool = True  # False: a socket that is not there yet is a warning (staging, boot order)
    ops_address: str = "127.0.0.1:9641"
    log_level: str = "info"
    log_format: str = "json"
    # the kvm backend
    kvm: bool = True
    kvm_state_dir: Path = Path("/var/lib/edgevirt/cri-kvm")
    vm_state_dir: Path = Path("/var/lib/edgevirt/vm")
    vm_conflist: Path = Path("/etc/edgevirt/cni-vm/10-edgevirt-vm.conflist")
    cni_bin_dirs: tuple[Path, ...] = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    libvirt_uri: str = "qemu:///system"
    image_roots: tuple[Path, ...] = (Path("/var/lib/edgevirt/images"),)
    insecure_registries: tuple[str, ...] = ()
    host_disk_root: Path | None = None  # None: not written (the handler's default applies)
    kubelet_root_dir: Path | None = None  # None: not written (the handler's default applies)
    kvm_options: tuple[tuple[str, Any], ...] = ()
    # the macvtap daemon
    macvtap_daemon: bool = True
    macvtap_binary: Path | None = None
    macvtap_socket: Path = DEFAULT_MACVTAP_SOCKET
    macvtap_ops_address: str = "127.0.0.1:9642"
    # libvirt
    libvirt_relaxed: bool = False

    @property
    def kubelet_dropin_dir(self) -> Path:
        return self.kubelet_unit_dropin_dir or self.unit_dir / f"{KUBELET_UNIT}.d"

    def rooted(self, path: Path) -> Path:
        """Where the installer writes ``path`` (``path`` under ``--root``)."""
        return self.root / path.relative_to("/")


def find_binary(name: str) -> Path | None:
    """``name`` next to the running Python (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def with_binaries(opts: NodeOptions) -> NodeOptions:
    """``opts`` with the binaries found when not given (left None when not found: check() says so)."""
    cri = opts.cri_binary or find_binary("edgevirt-cri")
    macvtap = opts.macvtap_binary or (find_binary("macvtap") if opts.macvtap_daemon else None)
    return replace(opts, cri_binary=cri, macvtap_binary=macvtap)


def _absolute(problems: list[str], flag: str, path: Path | None) -> None:
    if path is not None and (not path.is_absolute() or os.path.normpath(path) != str(path)):
        problems.append(f"{flag}: {str(path)!r} must be a normalized absolute path")


def _executable(problems: list[str], flag: str, path: Path | None, what: str, alternative: str) -> None:
    if path is None:
        problems.append(f"{flag}: {what} not found next to {sys.executable} or on PATH; pass it{alternative}")
    elif not (path.is_file() and os.access(path, os.X_OK)):
        problems.append(f"{flag}: {path} is not an executable file; pass the installed {what}{alternative}")


def _socket(problems: list[str], flag: str, path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        problems.append(f"{flag}: no socket at {path} ({e.strerror}): start {what} first, or pass its socket")
        return
    if not stat.S_ISSOCK(mode):
        problems.append(f"{flag}: {path} is not a socket; pass {what}'s socket")


def _address(problems: list[str], flag: str, text: str) -> None:
    try:
        parse_address(text, flag)
    except AddressError as e:
        problems.append(str(e))


def read_conflist(path: Path) -> dict[str, Any]:
    """The VM network's conflist; InstallError naming --vm-conflist when it is not one."""
    fix = "write the VM network's conflist there (example: deploy/cni/10-macvtap.conflist), or pass --no-kvm"
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise InstallError(f"--vm-conflist: cannot read {path} ({e.strerror}); {fix}") from None
    except ValueError as e:
        raise InstallError(f"--vm-conflist: {path} is not JSON ({e}); {fix}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("plugins"), list) or not doc["plugins"]:
        raise InstallError(
            f"--vm-conflist: {path} is not a CNI conflist (no non-empty 'plugins' list); {fix}"
        )
    return doc


def _paths(opts: NodeOptions) -> dict[str, Path | None]:
    paths: dict[str, Path | None] = {
        "--root": opts.root,
        "--config-path": opts.config_path,
        "--unit-dir": opts.unit_dir,
        "--kubelet-config-dir": opts.kubelet_config_dir,
        "--kubelet-unit-dropin-dir": opts.kubelet_unit_dropin_dir,
        "--qemu-conf": opts.qemu_conf,
        "--record": opts.record,
        "--socket": opts.socket,
        "--state-dir": opts.state_dir,
        "--containerd-socket": opts.containerd_socket,
        "--containerd-root": opts.containerd_root,
        "--macvtap-socket": opts.macvtap_socket,
    }
    if opts.kvm:
        paths.update(
            {
                "--kvm-state-dir": opts.kvm_state_dir,
                "--vm-state-dir": opts.vm_state_dir,
                "--vm-conflist": opts.vm_conflist,
                "--host-disk-root": opts.host_disk_root,
                "--kubelet-root-dir": opts.kubelet_root_dir,
            }
        )
        paths.update({f"--cni-bin-dir {d}": d for d in opts.cni_bin_dirs})
        paths.update({f"--image-root {d}": d for d in opts.image_roots})
    return paths


def check(opts: NodeOptions) -> list[str]:
    """Raise InstallError listing every problem; return the warnings."""
    problems: list[str] = []
    for flag, path in _paths(opts).items():
        _absolute(problems, flag.split(" ")[0], path)
    _address(problems, "--ops-address", opts.ops_address)
    _executable(problems, "--cri-binary", opts.cri_binary, "edgevirt-cri", "")
    warnings: list[str] = []
    _socket(
        problems if opts.check_sockets else warnings,
        "--containerd-socket",
        opts.containerd_socket,
        "containerd",
    )
    if opts.socket == opts.containerd_socket:
        problems.append("--socket: edgevirt-cri cannot serve on containerd's socket; choose another path")
    if opts.macvtap_daemon:
        _address(problems, "--macvtap-ops-address", opts.macvtap_ops_address)
        _executable(problems, "--macvtap-binary", opts.macvtap_binary, "macvtap", ", or --no-macvtap-daemon")
    for key, _ in opts.kvm_options:
        if key in OWN_KVM_OPTIONS:
            problems.append(f"--kvm-option {key}=...: use {OWN_KVM_OPTIONS[key]} for that")
    if opts.kvm:
        try:
            warnings += conflist_warnings(opts, read_conflist(opts.vm_conflist))
        except InstallError as e:
            problems.append(str(e))
    if opts.root == Path("/") and os.geteuid() != 0:
        problems.append(
            "--root: writing the node's own files needs root; run as root (or --root DIR to stage)"
        )
    if problems:
        raise InstallError("\n".join(problems))
    return warnings


def conflist_warnings(opts: NodeOptions, conflist: dict[str, Any]) -> list[str]:
    """What in the VM network's conflist will not work with these settings (the install still can)."""
    warnings: list[str] = []
    for plugin in conflist["plugins"]:
        if not isinstance(plugin, dict) or plugin.get("type") != "macvtap":
            continue
        sock = Path(str(plugin.get("daemonSocket") or DEFAULT_MACVTAP_SOCKET))
        if opts.macvtap_daemon and sock != opts.macvtap_socket:
            warnings.append(
                f"{opts.vm_conflist}: daemonSocket {sock} is not --macvtap-socket {opts.macvtap_socket}: "
                "the plugin will not reach the daemon (it still works, slower)"
            )
        owner, group = str(plugin.get("tapOwner", "root")), str(plugin.get("tapGroup", "root"))
        mode = int(str(plugin.get("tapMode", "0600")), 8)
        qemu_can_open = owner == "libvirt-qemu" or (
            group in ("kvm", "libvirt-qemu") and mode & 0o060 == 0o060
        )
        if not opts.libvirt_relaxed and not qemu_can_open:
            warnings.append(
                f"{opts.vm_conflist}: with libvirt's secure defaults QEMU runs as libvirt-qemu:kvm and "
                f'cannot open a tap node owned {owner}:{group} mode {mode:04o}; set "tapGroup": "kvm" and '
                '"tapMode": "0660" in the macvtap plugin'
            )
    return warnings
