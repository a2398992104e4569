"""Kubeconfigs that act as edgevirt's service accounts, for the tests and the benchmarks: the
controllers run as their accounts (never as the cluster admin), so RBAC and the admission policies
of deploy/ hold as on a real cluster. The node account's token is bound to a Node: its user info
then carries the node's name (``authentication.kubernetes.io/node-name``), which the policy
edgevirt-node-own-vms-only compares with the VM's node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

NAMESPACE = "edgevirt-system"
NODE_ACCOUNT = "edgevirt-node"


def service_account_kubeconfig(
    kubectl: list[str],
    admin_kubeconfig: Path,
    sa: str,
    path: Path,
    *,
    node: str | None = None,
    duration: str = "2h",
) -> Path:
    """A kubeconfig at ``path`` with a fresh token of ``edgevirt-system/<sa>`` (minted through
    ``kubectl``, an argv prefix with the admin's credentials), bound to Node ``node`` for the node
    account (which needs one)."""
    bind = []
    if sa == NODE_ACCOUNT:
        if not node:
            raise ValueError(f"{sa}: give the node its token is bound to")
        bind = ["--bound-object-kind", "Node", "--bound-object-name", node]
    token = subprocess.run(
        [*kubectl, "create", "token", sa, "-n", NAMESPACE, f"--duration={duration}", *bind],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    return token_kubeconfig(admin_kubeconfig, sa, token, path)


def token_kubeconfig(admin_kubeconfig: Path, user: str, token: str, path: Path) -> Path:
    """A kubeconfig at ``path`` for the admin kubeconfig's cluster that authenticates with ``token``."""
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path
