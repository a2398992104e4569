"""What the node should have after ``edgevirt-node install``: directories, files, links and the
libvirt block, in the order they are made (pure: options in, entries out).

=================================================  =====  =======================================
entry                                              mode   when
=================================================  =====  =======================================
``--state-dir``, ``--kvm-state-dir``               0700   always / with kvm
``--vm-state-dir``, ``--image-root``,              0711   with kvm: QEMU (libvirt-qemu under
``--host-disk-root``                                      libvirt's secure defaults) must traverse
                                                          them to its disks; nobody may list them
``--config-path``                                  0644   always
``<unit-dir>/edgevirt-cri.service``                0644   always
``<unit-dir>/edgevirt-macvtap.service``            0644   unless --no-macvtap-daemon
``<unit-dir>/multi-user.target.wants/<unit>``      link   the units enabled (what systemctl enable does)
``<kubelet unit drop-in dir>/50-edgevirt.conf``    0644   always
``<kubelet config dir>/50-edgevirt.conf``          0644   always
``--qemu-conf`` block                              kept   only with --libvirt-relaxed
=================================================  =====  =======================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from . import cri_config, units
from .options import CRI_UNIT, DROPIN_NAME, MACVTAP_UNIT, NodeOptions

Kind = Literal["dir", "file", "link", "block"]
STATE_MODE = 0o700
TRAVERSE_MODE = 0o711
FILE_MODE = 0o644
WANTS = "multi-user.target.wants"


@dataclass(frozen=True)
class Want:
    """One thing the node should have. ``content`` is a file's text or a link's target."""

    kind: Kind
    path: Path
    role: str
    flag: str
    mode: int = FILE_MODE
    content: str = ""


def _dirs(opts: NodeOptions) -> list[Want]:
    wants = [Want("dir", opts.state_dir, "edgevirt-cri state", "--state-dir", STATE_MODE)]
    if opts.kvm:
        wants.append(Want("dir", opts.kvm_state_dir, "kvm handler records", "--kvm-state-dir", STATE_MODE))
        wants.append(Want("dir", opts.vm_state_dir, "VM disks and images", "--vm-state-dir", TRAVERSE_MODE))
        wants += [
            Want("dir", d, "file:// image root", "--image-root", TRAVERSE_MODE) for d in opts.image_roots
        ]
        if opts.host_disk_root is not None:
            wants.append(Want("dir", opts.host_disk_root, "hostDisk root", "--host-disk-root", TRAVERSE_MODE))
    return wants


def _units(opts: NodeOptions) -> list[Want]:
    wants = [
        Want(
            "file", opts.unit_dir / CRI_UNIT, "edgevirt-cri unit", "--unit-dir", content=units.cri_unit(opts)
        )
    ]
    if opts.macvtap_daemon:
        wants.append(
            Want(
                "file",
                opts.unit_dir / MACVTAP_UNIT,
                "macvtap daemon unit",
                "--unit-dir",
                content=units.macvtap_unit(opts),
            )
        )
    for unit in (CRI_UNIT, MACVTAP_UNIT) if opts.macvtap_daemon else (CRI_UNIT,):
        wants.append(
            Want(
                "link",
                opts.unit_dir / WANTS / unit,
                f"{unit} enabled",
                "--unit-dir",
                content=str(opts.unit_dir / unit),
            )
        )
    return wants


def plan(opts: NodeOptions) -> list[Want]:
    """Everything the install makes, in order (a directory before what is in it)."""
    wants = _dirs(opts)
    wants.append(
        Want(
            "file", opts.config_path, "edgevirt-cri config", "--config-path", content=cri_config.render(opts)
        )
    )
    wants += _units(opts)
    wants.append(
        Want(
            "file",
            opts.kubelet_dropin_dir / DROPIN_NAME,
            "kubelet.service drop-in (after edgevirt-cri)",
            "--kubelet-unit-dropin-dir",
            content=units.kubelet_unit_dropin(),
        )
    )
    wants.append(
        Want(
            "file",
            opts.kubelet_config_dir / DROPIN_NAME,
            "kubelet config drop-in (CRI endpoint)",
            "--kubelet-config-dir",
            content=units.kubelet_config_dropin(opts),
        )
    )
    if opts.libvirt_relaxed:
        wants.append(Want("block", opts.qemu_conf, "libvirt relaxed settings", "--qemu-conf"))
    return wants
