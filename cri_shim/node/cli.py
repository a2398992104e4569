"""``edgevirt-node install|uninstall|status|install-cni-plugin|label``: the node tools' command line.

``install``, ``uninstall`` and ``status`` are the node installer (host services). The other two
run in the DaemonSets: ``install-cni-plugin`` (the edgevirt-node DaemonSet's init container copies
the static macvtap plugin to the host, :mod:`.cni_plugin`) and ``label`` (the node labeller,
:mod:`.labeller`); ``uninstall`` also removes what they left (:mod:`.node_cleanup`).

Exit codes: 0 done (status: installed as recorded), 2 a flag is wrong or something the flags point
at is missing (nothing was changed; the message names the flag), 1 an operation failed halfway
(the record says what was done; run the command again), 3 status: not installed or not as
recorded. ``--json`` prints the outcome as one JSON document on stdout (an error as
``{"ok": false, "error": ...}``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .. import logsetup
from .node_cleanup import DEFAULT_CNI_BIN_DIRS, DEFAULT_KUBECONFIG, NodeCleanup
from .options import InstallError, NodeOptions
from .outcome import Outcome
from .record import RecordError

D = NodeOptions()


def _path(text: str) -> Path:
    return Path(text)


def _kvm_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. max_volumes=16)")
    return key, yaml.safe_load(value) if value else ""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=_path, default=D.root, help="write under this directory (tests, staging)")
    p.add_argument("--record", type=_path, default=D.record, help=f"the install record (default {D.record})")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")


def _files(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("files written")
    g.add_argument(
        "--config-path", type=_path, default=D.config_path, help=f"edgevirt-cri's config ({D.config_path})"
    )
    g.add_argument(
        "--unit-dir", type=_path, default=D.unit_dir, help=f"systemd unit directory ({D.unit_dir})"
    )
    g.add_argument(
        "--kubelet-config-dir",
        type=_path,
        default=D.kubelet_config_dir,
        help=f"kubelet's --config-dir ({D.kubelet_config_dir})",
    )
    g.add_argument(
        "--kubelet-unit-dropin-dir",
        type=_path,
        default=None,
        help="kubelet.service's drop-in directory (<unit-dir>/kubelet.service.d)",
    )
    g.add_argument(
        "--qemu-conf", type=_path, default=D.qemu_conf, help=f"libvirt's qemu.conf ({D.qemu_conf})"
    )
    g.add_argument(
        "--kubelet-evented-pleg",
        action="store_true",
        help="kubelet's drop-in also turns on its EventedPLEG feature gate (beta, off upstream): "
        "kubelet acts on edgevirt-cri's container events, e.g. restarts a VM the moment it died",
    )


def _cri(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edgevirt-cri")
    g.add_argument(
        "--cri-binary", type=_path, help="edgevirt-cri (default: next to this Python, else on PATH)"
    )
    g.add_argument(
        "--socket", type=_path, default=D.socket, help=f"its CRI socket, kubelet's endpoint ({D.socket})"
    )
    g.add_argument("--state-dir", type=_path, default=D.state_dir, help=f"its ID index, 0700 ({D.state_dir})")
    g.add_argument(
        "--containerd-socket",
        type=_path,
        default=D.containerd_socket,
        help=f"containerd's socket, must exist ({D.containerd_socket})",
    )
    g.add_argument(
        "--containerd-root",
        type=_path,
        default=D.containerd_root,
        help=f"containerd's root (its config's `root`): the kvm handler reads OCI disk layers from its "
        f"content store ({D.containerd_root})",
    )
    g.add_argument(
        "--no-socket-check",
        dest="check_sockets",
        action="store_false",
        help="a --containerd-socket that does not exist yet is a warning, not an error (staging, boot order)",
    )
    g.add_argument(
        "--ops-address", default=D.ops_address, help=f"/healthz /readyz /metrics ({D.ops_address}; '' off)"
    )
    g.add_argument("--log-level", default=D.log_level, choices=logsetup.LEVELS, help="of both services")
    g.add_argument(
        "--log-format", default=D.log_format, choices=logsetup.FORMATS, help="of both services (json)"
    )


def _kvm(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the kvm backend")
    g.add_argument("--no-kvm", dest="kvm", action="store_false", help="containerd only (no kvm handler)")
    g.add_argument("--kvm-state-dir", type=_path, default=D.kvm_state_dir, help=f"0700 ({D.kvm_state_dir})")
    g.add_argument(
        "--vm-state-dir", type=_path, default=D.vm_state_dir, help=f"VM disks, 0711 ({D.vm_state_dir})"
    )
    g.add_argument(
        "--vm-conflist",
        type=_path,
        default=D.vm_conflist,
        help=f"the VM network, must exist ({D.vm_conflist})",
    )
    g.add_argument(
        "--cni-bin-dir", type=_path, action="append", help="repeatable (/opt/cni/bin, /usr/lib/cni)"
    )
    g.add_argument("--libvirt-uri", default=D.libvirt_uri, help=f"({D.libvirt_uri})")
    g.add_argument(
        "--image-root",
        type=str,
        action="append",
        help="file:// image root, 0711, repeatable (/var/lib/edgevirt/images); --image-root= for none",
    )
    g.add_argument("--insecure-registry", action="append", default=[], help="repeatable")
    g.add_argument("--host-disk-root", type=_path, help="hostDisk root, 0711 (default: the handler's own)")
    g.add_argument("--kubelet-root-dir", type=_path, help="kubelet's --root-dir (default: the handler's own)")
    g.add_argument(
        "--kvm-option",
        type=_kvm_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other kvm handler option (YAML value), repeatable",
    )


def _node(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("macvtap daemon and libvirt")
    g.add_argument("--no-macvtap-daemon", dest="macvtap_daemon", action="store_false", help="no macvtap unit")
    g.add_argument(
        "--macvtap-binary", type=_path, help="macvtap (default: next to this Python, else on PATH)"
    )
    g.add_argument("--macvtap-socket", type=_path, default=D.macvtap_socket, help=f"({D.macvtap_socket})")
    g.add_argument(
        "--macvtap-ops-address", default=D.macvtap_ops_address, help=f"({D.macvtap_ops_address}; '' off)"
    )
    g.add_argument(
        "--libvirt-relaxed",
        action="store_true",
        help="guests as root, no security driver, no cgroups (machines without systemd/udev only)",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="edgevirt-node", description="install edgevirt's host services on a node"
    )
    sub = ap.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="write config, units and drop-ins (idempotent)")
    for add in (_common, _files, _cri, _kvm, _node):
        add(install)
    uninstall = sub.add_parser(
        "uninstall", help="remove what install wrote, put back what it changed, and what the DaemonSets left"
    )
    _common(uninstall)
    uninstall.add_argument("--purge", action="store_true", help="also remove state directories with content")
    _cleanup(uninstall)
    status = sub.add_parser("status", help="compare the node with the install record")
    _common(status)
    _daemonset_commands(sub)
    return ap


def _cleanup(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what the DaemonSets left (run after deleting them)")
    g.add_argument(
        "--cni-bin-dir",
        type=_path,
        action="append",
        dest="cleanup_cni_bin_dir",
        help=f"where the DaemonSet copied the macvtap plugin, repeatable ({DEFAULT_CNI_BIN_DIRS[0]}); "
        "removed only when its marker says it is ours",
    )
    g.add_argument(
        "--kubeconfig",
        help=f"the kubelet's kubeconfig, to remove the Node's edgevirt.io/ labels ({DEFAULT_KUBECONFIG}; "
        "'' leaves them)",
    )
    g.add_argument("--node-name", help="the Node (default: the one the kubeconfig's credentials belong to)")


def _daemonset_commands(sub: Any) -> None:
    plugin = sub.add_parser("install-cni-plugin", help="copy the static macvtap plugin into a CNI bin dir")
    plugin.add_argument("--source", type=_path, required=True, help="the plugin binary (in the image)")
    plugin.add_argument("--bin-dir", type=_path, required=True, help="the host's CNI bin dir, as mounted")
    plugin.add_argument("--json", action="store_true", help="print the outcome as JSON")
    label = sub.add_parser("label", help="the node labeller: the probe's verdict and the CRI's handlers")
    label.add_argument("--node", help="the Node (default $NODE_NAME, else the credentials' node)")
    label.add_argument("--kubeconfig", help="default: the pod's service account token")
    label.add_argument(
        "--cri-socket", type=_path, default=D.socket, help=f"edgevirt-cri's socket ({D.socket})"
    )
    label.add_argument("--probe-cache", type=_path, help="the probe's cache file (default: none)")
    label.add_argument(
        "--kvm-timeout", type=float, default=15.0, help="seconds a KVM guest gets to boot (15)"
    )
    label.add_argument("--interval", type=float, default=600.0, help="seconds between passes (600)")
    label.add_argument("--retry", type=float, default=30.0, help="seconds before retrying a failed pass (30)")
    label.add_argument("--once", action="store_true", help="one pass, then exit (1 if it failed)")
    label.add_argument("--log-level", default="info", choices=logsetup.LEVELS)
    label.add_argument("--log-format", default="text", choices=logsetup.FORMATS)


def cleanup(args: argparse.Namespace) -> NodeCleanup:
    """What uninstall removes of the DaemonSets'. The kubelet's default kubeconfig is used only on
    the node itself (--root /): a staged root's labels are another node's business."""
    if args.kubeconfig is not None:
        kubeconfig = Path(args.kubeconfig) if args.kubeconfig else None
    else:
        kubeconfig = DEFAULT_KUBECONFIG if args.root == Path("/") else None
    return NodeCleanup(
        cni_bin_dirs=tuple(args.cleanup_cni_bin_dir or DEFAULT_CNI_BIN_DIRS),
        kubeconfig=kubeconfig,
        kubeconfig_given=bool(args.kubeconfig),
        node_name=args.node_name,
    )


def options(args: argparse.Namespace) -> NodeOptions:
    if args.command != "install":
        return NodeOptions(root=args.root, record=args.record)
    roots = D.image_roots if args.image_root is None else tuple(Path(r) for r in args.image_root if r)
    return NodeOptions(
        root=args.root,
        record=args.record,
        config_path=args.config_path,
        unit_dir=args.unit_dir,
        kubelet_config_dir=args.kubelet_config_dir,
        kubelet_unit_dropin_dir=args.kubelet_unit_dropin_dir,
        kubelet_evented_pleg=args.kubelet_evented_pleg,
        qemu_conf=args.qemu_conf,
        cri_binary=args.cri_binary,
        socket=args.socket,
        state_dir=args.state_dir,
        containerd_socket=args.containerd_socket,
        containerd_root=args.containerd_root,
        check_sockets=args.check_sockets,
        ops_address=args.ops_address,
        log_level=args.log_level,
        log_format=args.log_format,
        kvm=args.kvm,
        kvm_state_dir=args.kvm_state_dir,
        vm_state_dir=args.vm_state_dir,
        vm_conflist=args.vm_conflist,
        cni_bin_dirs=tuple(args.cni_bin_dir) if args.cni_bin_dir else D.cni_bin_dirs,
        libvirt_uri=args.libvirt_uri,
        image_roots=roots,
        insecure_registries=tuple(args.insecure_registry),
        host_disk_root=args.host_disk_root,
        kubelet_root_dir=args.kubelet_root_dir,
        kvm_options=tuple(args.kvm_option),
        macvtap_daemon=args.macvtap_daemon,
        macvtap_binary=args.macvtap_binary,
        macvtap_socket=args.macvtap_socket,
        macvtap_ops_address=args.macvtap_ops_address,
        libvirt_relaxed=args.libvirt_relaxed,
    )


def run(args: argparse.Namespace) -> Outcome:
    from .apply import install
    from .status import status
    from .undo import uninstall

    opts = options(args)
    if args.command == "install":
        return install(opts)
    if args.command == "uninstall":
        return uninstall(opts, purge=args.purge, cleanup=cleanup(args))
    return status(opts)


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    if args.json:
        print(json.dumps({"ok": False, "command": args.command, "error": message}))
    print(f"edgevirt-node {args.command}: {message}", file=sys.stderr)
    return code


def install_cni_plugin(args: argparse.Namespace) -> int:
    from .cni_plugin import install_plugin

    try:
        change = install_plugin(args.source, args.bin_dir)
    except OSError as e:
        return _fail(args, f"{e.strerror or e}: {e.filename or args.bin_dir}", 1)
    outcome = Outcome("install", change.action != "unchanged", [change])
    sys.stdout.write(
        outcome.to_json() if args.json else f"edgevirt-node install-cni-plugin: {change.line()}\n"
    )
    return 0


def label(args: argparse.Namespace) -> int:
    import signal
    import threading

    from runtimeclass.labels import Cri

    from .kubeapi import KubeNodeApi, NodeApiError
    from .labeller import Labeller, probe_function, resolve_node

    logsetup.configure(args.log_level, args.log_format)
    try:
        api = KubeNodeApi(args.kubeconfig)
        node = resolve_node(api, args.node)
    except (NodeApiError, OSError) as e:
        return _fail(args, str(e), 2)
    except Exception as e:  # the kubernetes client's config errors have no common base
        return _fail(args, f"no credentials: {e}", 2)
    labeller = Labeller(api, node, args.cri_socket, probe_function(args.probe_cache, args.kvm_timeout))
    if args.once:
        try:
            view = labeller.run_once()
        except NodeApiError as e:
            return _fail(args, str(e), 1)
        if view.state is Cri.SILENT:  # the labels were kept as they were: try again soon
            return _fail(args, f"{view.describe()} at {args.cri_socket}", 1)
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    labeller.run(stop, args.interval, args.retry)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "install-cni-plugin":
        return install_cni_plugin(args)
    if args.command == "label":
        args.json = False
        return label(args)
    if not args.root.is_dir():
        return _fail(args, f"--root: {args.root} is not a directory", 2)
    try:
        outcome = run(args)
    except (InstallError, RecordError) as e:
        return _fail(args, str(e), 2)
    except OSError as e:
        return _fail(args, f"{e} (the record lists what was done; run the command again)", 1)
    sys.stdout.write(outcome.to_json() if args.json else outcome.text())
    if outcome.ok:
        return 0
    return 1 if args.command == "uninstall" else 3


if __name__ == "__main__":
    sys.exit(main())
