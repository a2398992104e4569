"""The tests' handle on the running local cluster (deploy/local): kubectl and crictl with the right
endpoints, and deploy/local/up and down."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from localcluster.paths import Paths

from helpers import REPO, tokens
from helpers.crictl import Crictl
from helpers.waiting import wait_for


@dataclass
class Cluster:
    """A handle on the running local cluster for tests: kubectl/crictl with the right endpoints."""

    paths: Paths
    node: str
    started_here: bool

    @property
    def env(self) -> dict[str, str]:
        """kubectl's environment; PYTHONPATH starts at this checkout, so the kubectl plugin (a
        console script of the virtualenv) runs this checkout's code."""
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return {
            **os.environ,
            "KUBECONFIG": str(self.paths.kubeconfig),
            "PATH": f"{self.paths.bin}:{os.environ['PATH']}",
            "PYTHONPATH": path,
        }

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120):
        return subprocess.run(
            [self.paths.tool("kubectl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            input=input,
            timeout=timeout,
        )

    def kubectl_json(self, *args: str) -> dict:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)

    def patch(
        self,
        kind: str,
        name: str,
        patch: dict | list,
        *,
        namespace: str | None = None,
        type: str = "merge",
        subresource: str | None = None,
        check: bool = True,
    ):
        """``kubectl patch`` with ``patch`` as JSON (``type`` merge, json or strategic)."""
        where = [
            *(["-n", namespace] if namespace else []),
            *(["--subresource", subresource] if subresource else []),
        ]
        return self.kubectl("patch", kind, name, *where, "--type", type, "-p", json.dumps(patch), check=check)

    def service_account_kubeconfig(
        self, sa: str, path: Path, duration: str = "2h", node: str | None = None
    ) -> Path:
        """A kubeconfig at ``path`` that acts as the service account edgevirt-system/``sa`` (a fresh
        token), so a test exercises that account's RBAC and admission policies; the node account's
        token is bound to Node ``node`` (default: this cluster's node), see :mod:`helpers.tokens`."""
        kubectl = [str(self.paths.tool("kubectl")), "--kubeconfig", str(self.paths.kubeconfig)]
        return tokens.service_account_kubeconfig(
            kubectl, self.paths.kubeconfig, sa, path, node=node or self.node, duration=duration
        )

    def token_kubeconfig(self, user: str, token: str, path: Path) -> Path:
        """A kubeconfig at ``path`` for this cluster that authenticates with a bearer ``token``."""
        return tokens.token_kubeconfig(self.paths.kubeconfig, user, token, path)

    def kubelet_runtime_endpoint(self) -> str:
        """kubelet's CRI endpoint in effect: its config file's, overridden by the drop-ins of its
        ``--config-dir`` (the node installer's, which points it at edgevirt-cri), as kubelet merges them."""
        import yaml

        endpoint = yaml.safe_load((self.paths.etc / "kubelet.yaml").read_text())["containerRuntimeEndpoint"]
        argv = json.loads((self.paths.pids / "kubelet.pid").read_text())["argv"]
        dirs = [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
        for d in dirs:
            for f in sorted(Path(d).glob("*.conf")):
                endpoint = (yaml.safe_load(f.read_text()) or {}).get("containerRuntimeEndpoint", endpoint)
        return endpoint

    def install_vm_crd(self, rbac: bool = False) -> None:
        """Apply the VirtualMachine CRD (and, with ``rbac``, the RBAC and the admission policies, as
        ``kubectl apply -k deploy/`` does); wait until served."""
        self.kubectl("apply", "-f", str(REPO / "deploy/manifests/virtualmachine-crd.yaml"))
        if rbac:
            self.kubectl("apply", "-f", str(REPO / "deploy/manifests/vmcrd-rbac.yaml"))
            self.kubectl("apply", "-f", str(REPO / "deploy/manifests/admission-policies.yaml"))
        self.kubectl(
            "wait", "--for=condition=Established", "crd/virtualmachines.edgevirt.io", "--timeout=60s"
        )

    def vms_in(self, namespace: str | None = None) -> list[dict]:
        """The VirtualMachines of ``namespace`` (all namespaces: None); none without the CRD."""
        where = ["-n", namespace] if namespace else ["-A"]
        r = self.kubectl("get", "virtualmachines.edgevirt.io", *where, "-o", "json", check=False)
        return json.loads(r.stdout)["items"] if r.returncode == 0 else []

    def describe_vms(self, namespace: str | None = None) -> str:
        """One line per VirtualMachine: where, status, deletion and finalizers (for a wait's explain)."""
        lines = []
        for vm in self.vms_in(namespace):
            m = vm["metadata"]
            lines.append(
                f"{m['namespace']}/{m['name']}: {vm.get('status', {}).get('printableStatus')}, "
                f"deleted {m.get('deletionTimestamp')}, finalizers {m.get('finalizers')}"
            )
        return "\n".join(lines) or "(none)"

    @contextlib.contextmanager
    def namespace(self, prefix: str, *, drop_vm_finalizers: bool = False) -> Iterator[str]:
        """A fresh namespace ``<prefix>-<6 hex>``, deleted at the end, waiting until its
        VirtualMachines are gone (their controller stopped them and removed their node state), so
        the next test starts with none. With ``drop_vm_finalizers`` their finalizers are dropped
        instead, until they are gone: no controller is left to run them."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name)
        try:
            # pods are refused until the service-account controller made "default" (slow right
            # after the API server or the controller manager restarted)
            wait_for(
                f"the default service account of {name}",
                lambda: (
                    self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0
                ),
                120,
            )
            yield name
        finally:
            self.kubectl("delete", "namespace", name, "--wait=false", check=False)

            def vms_gone() -> bool:
                vms = self.vms_in(name)
                for vm in vms if drop_vm_finalizers else ():
                    if vm["metadata"].get("finalizers"):
                        no_finalizers = {"metadata": {"finalizers": None}}
                        self.patch("vm", vm["metadata"]["name"], no_finalizers, namespace=name, check=False)
                return not vms

            wait_for(
                f"the VirtualMachines of namespace {name} gone",
                vms_gone,
                240,
                1,
                explain=lambda: self.describe_vms(name),
            )

    def cri(self, via_shim: bool = False) -> Crictl:
        """crictl against the cluster's containerd, or (``via_shim``) its edgevirt-cri, kubelet's endpoint."""
        sock = self.paths.cri_sock if via_shim else self.paths.containerd_sock
        return Crictl(f"unix://{sock}", binary=str(self.paths.tool("crictl")), env=self.env)

    def crictl(self, *args: str, check: bool = True, timeout: float | None = None, via_shim: bool = False):
        return self.cri(via_shim)(*args, check=check, timeout=timeout)

    def up(self, *components: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(REPO / "deploy/local/up"), *components], capture_output=True, text=True, timeout=600
        )

    def down(self) -> subprocess.CompletedProcess:
        return subprocess.run([str(REPO / "deploy/local/down")], capture_output=True, text=True, timeout=300)
