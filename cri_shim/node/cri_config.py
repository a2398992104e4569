"""edgevirt-cri's config file as the installer writes it (``/etc/edgevirt/cri.yaml``).

The document is built as data and dumped with a YAML library, then read back by edgevirt-cri's
own parser (:func:`cri_shim.config.parse`), so the installer never writes a config the shim would
refuse. Handlers ``""``, ``runc`` and ``kata`` go to containerd; ``kvm`` to the kvm handler
(``cri_shim.kvm:create``) unless ``--no-kvm``.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from .. import config as cri_config
from .options import NodeOptions

HEADER = (
    "# edgevirt-cri's config, written by `edgevirt-node install`; `edgevirt-node uninstall` removes it.\n"
    "# Edits are overwritten: change the installer's flags and run it again.\n"
)
KVM_FACTORY = "cri_shim.kvm:create"


def kvm_options(opts: NodeOptions) -> dict[str, Any]:
    """The kvm backend's options (cri_shim/kvm/factory.py); optional ones only when given."""
    options: dict[str, Any] = {
        "state_dir": str(opts.kvm_state_dir),
        "vm_state_dir": str(opts.vm_state_dir),
        "cni_conflist": str(opts.vm_conflist),
        "cni_bin_dirs": [str(d) for d in opts.cni_bin_dirs],
        "libvirt_uri": opts.libvirt_uri,
        "image_roots": [str(d) for d in opts.image_roots],
        # containerDisks come from the same containerd kubelet pulls through (CRI ImageService, its
        # content store)
        "containerd_socket": str(opts.containerd_socket),
        "containerd_root": str(opts.containerd_root),
        "insecure_registries": list(opts.insecure_registries),
    }
    if opts.host_disk_root is not None:
        options["host_disk_root"] = str(opts.host_disk_root)
    if opts.kubelet_root_dir is not None:
        options["kubelet_root_dir"] = str(opts.kubelet_root_dir)
    options.update(dict(opts.kvm_options))
    return options


def document(opts: NodeOptions) -> dict[str, Any]:
    backends: dict[str, Any] = {"containerd": {"type": "containerd", "socket": str(opts.containerd_socket)}}
    handlers = {"": "containerd", "runc": "containerd", "kata": "containerd"}
    if opts.kvm:
        backends["kvm"] = {"type": "plugin", "factory": KVM_FACTORY, "options": kvm_options(opts)}
        handlers["kvm"] = "kvm"
    return {
        "socket": str(opts.socket),
        "socket_mode": "0660",
        "state_dir": str(opts.state_dir),
        "backends": backends,
        "handlers": handlers,
    }


def render(opts: NodeOptions) -> str:
    """The config file's text; ConfigError if edgevirt-cri would refuse it."""
    doc = document(opts)
    handlers = doc.pop("handlers")
    # PyYAML writes the empty key "" as a complex key (`? ''`); JSON strings are YAML and read better.
    text = HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False) + "handlers:\n"
    text += "".join(f"  {json.dumps(h)}: {json.dumps(b)}\n" for h, b in handlers.items())
    cri_config.parse(yaml.safe_load(text), str(opts.config_path))
    return text
