"""What ``uninstall`` removes besides the install record: what the DaemonSets left on the node.

* the ``macvtap`` CNI plugin the edgevirt-node DaemonSet copied into the CNI bin dir(s), only when
  its marker says it is ours (:mod:`.cni_plugin` puts back a file it replaced);
* the Node's ``edgevirt.io/`` labels (the labeller's), removed with the kubelet's own kubeconfig:
  the NodeRestriction admission plugin lets a kubelet change labels of its own Node outside the
  ``kubernetes.io``/``k8s.io`` namespaces, so no edgevirt credential has to outlive the uninstall.

Run after the DaemonSets are deleted (a labeller still running writes its labels again; an init
container copies the plugin again). Idempotent: a second run finds nothing to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtimeclass.labels import removal_patch

from .cni_plugin import remove_plugin
from .kubeapi import KubeNodeApi, NodeApi, NodeApiError
from .options import InstallError, NodeOptions
from .outcome import Change

DEFAULT_KUBECONFIG = Path("/etc/kubernetes/kubelet.conf")
DEFAULT_CNI_BIN_DIRS = (Path("/opt/cni/bin"),)


@dataclass(frozen=True)
class NodeCleanup:
    """Where the DaemonSets' leftovers are. ``kubeconfig`` None: leave the labels alone."""

    cni_bin_dirs: tuple[Path, ...] = DEFAULT_CNI_BIN_DIRS
    kubeconfig: Path | None = DEFAULT_KUBECONFIG
    kubeconfig_given: bool = False  # a --kubeconfig that does not exist is an error, the default a note
    node_name: str | None = None
    api: Callable[[str], NodeApi] = KubeNodeApi


def check(cleanup: NodeCleanup) -> None:
    """InstallError (nothing done yet) for a --kubeconfig that is not there."""
    if cleanup.kubeconfig is not None and cleanup.kubeconfig_given and not cleanup.kubeconfig.is_file():
        raise InstallError(f"--kubeconfig: {cleanup.kubeconfig} is not a file; pass the kubelet's kubeconfig")


def remove_plugins(opts: NodeOptions, cleanup: NodeCleanup) -> list[Change]:
    changes = []
    for d in cleanup.cni_bin_dirs:
        change = remove_plugin(opts.rooted(d))
        if change is not None:
            change.path = str(d / Path(change.path).name)
            changes.append(change)
    return changes


def remove_labels(cleanup: NodeCleanup) -> tuple[list[Change], list[str]]:
    """(changes, warnings): the Node's edgevirt.io/ labels removed with the kubelet's kubeconfig."""
    from .labeller import resolve_node

    if cleanup.kubeconfig is None:
        return [], []
    if not cleanup.kubeconfig.is_file():
        return [], [
            f"no kubeconfig at {cleanup.kubeconfig}: the Node's edgevirt.io/ labels were left; pass "
            "--kubeconfig (the kubelet's), or --kubeconfig '' to leave them on purpose"
        ]
    api = cleanup.api(str(cleanup.kubeconfig))
    node = resolve_node(api, cleanup.node_name)
    patch = removal_patch(api.labels(node))
    if patch is None:
        return [], []
    api.patch_labels(node, patch)
    gone = sorted(patch["metadata"]["labels"])  # type: ignore[index]
    return [Change("removed", "label", f"node/{node}", "the labeller's labels", ", ".join(gone))], []


def clean(opts: NodeOptions, cleanup: NodeCleanup) -> tuple[list[Change], list[str], bool]:
    """(changes, warnings, ok): the plugin copies, then the labels (an API failure is not ok)."""
    changes = remove_plugins(opts, cleanup)
    try:
        label_changes, warnings = remove_labels(cleanup)
    except NodeApiError as e:
        return changes, [f"the Node's edgevirt.io/ labels were not removed: {e}; run uninstall again"], False
    return changes + label_changes, warnings, True
