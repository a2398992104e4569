"""The one private containerd of the tests: own root, state, socket and pod network, configured by the
local cluster's own config writer, so destructive tests never touch the shared cluster's containerd.

Two kinds of pod network:

* its own (default): a bridge edgevirt-t<n> with subnet 10.<245+n>.0.0/24, n claimed with a lock
  file so several private containerds (tests, critest, bench) never share a bridge;
* the caller's (``cni_bin_dir=``): the caller writes a conflist with :meth:`write_cni_conflist`
  before :meth:`PrivateContainerd.start` (the macvtap CNI test), and may run containerd inside a
  network namespace (``netns=``).

Everything is removed on close(), also after a failed test: pod sandboxes (through containerd, so it
tears down their netns), shims, mounts, the bridge, the directories. Used by the CRI and CNI tests,
deploy/cri/run_critest.py and bench/cri.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from localcluster import configs, leftovers
from localcluster.components import cni_bin_dirs
from localcluster.paths import PAUSE_IMAGE, REGISTRY_ADDR, Paths

from helpers import processes
from helpers.crictl import CRICTL, Crictl
from helpers.waiting import wait_for

__all__ = ["PAUSE_IMAGE", "PrivateContainerd", "unix_socket_answers"]

EXTRA_MIRRORS = ("k8s.gcr.io",)
NET_LOCKS = Path("/run/edgevirt-cri-test")


def unix_socket_answers(path: Path) -> bool:
    """A connect to the unix socket ``path`` succeeds (OSError while nobody listens yet)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(str(path))
    return True


def claim_pod_network() -> int:
    """A free test pod network n, held by a lock file with our pid (a lock whose owner is gone is
    taken over)."""
    NET_LOCKS.mkdir(parents=True, exist_ok=True)
    for n in range(10):
        lock = NET_LOCKS / f"net{n}"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(lock.read_text() or 0)
            except (OSError, ValueError):
                owner = 0
            if owner and Path(f"/proc/{owner}").exists():
                continue
            lock.unlink(missing_ok=True)  # its owner is gone
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return n
    raise RuntimeError(f"no free test pod network: 10 lock files in {NET_LOCKS} are held")


@dataclass
class PrivateContainerd:
    """containerd 1.6 with its CRI plugin, configured like the cluster's (same config writer) but
    with its own directories and socket; see the module docstring for its pod network."""

    root: Path
    net: int | None = 0  # the claimed bridge network; None: the caller's CNI config
    netns: str | None = None  # run containerd in this named network namespace
    cni_bin_dir: str | None = None
    crictl_binary: str = CRICTL  # the crictl of :attr:`crictl` (close() removes pods with it)
    proc: subprocess.Popen | None = None

    @classmethod
    def create(
        cls, *, netns: str | None = None, cni_bin_dir: str | Path | None = None, crictl_binary: str = CRICTL
    ) -> PrivateContainerd:
        """A private containerd (not started) with a root under /var/tmp; without ``cni_bin_dir`` it
        claims a free bridge network of its own."""
        root = Path(tempfile.mkdtemp(prefix="edgevirt-cri-ctd-", dir="/var/tmp"))
        mine = {"root": root, "netns": netns, "crictl_binary": crictl_binary}
        if cni_bin_dir is not None:
            return cls(**mine, net=None, cni_bin_dir=str(cni_bin_dir))
        try:
            return cls(**mine, net=claim_pod_network())
        except RuntimeError:
            shutil.rmtree(root, ignore_errors=True)
            raise

    @property
    def bridge(self) -> str:
        return f"edgevirt-t{self.net}"

    @property
    def cidr(self) -> str:
        return f"10.{245 + (self.net or 0)}.0.0/24"

    @property
    def paths(self) -> Paths:
        # A short run dir: unix socket paths are limited to 108 bytes.
        return Paths(state=self.root / "state", run=self.root / "run")

    @property
    def socket(self) -> Path:
        return self.paths.containerd_sock

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "containerd.log"

    @property
    def crictl(self) -> Crictl:
        """crictl against this containerd: ``ctd.crictl("pods", ...)``."""
        return Crictl(self.endpoint, binary=self.crictl_binary)

    def ctr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``ctr`` in the k8s.io namespace (CRI's) of this containerd."""
        return subprocess.run(
            ["ctr", "--address", str(self.socket), "-n", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def write_cni_conflist(self, conflist: dict, name: str = "10-edgevirt-cri-test.conflist") -> Path:
        """Put a CNI conflist into this containerd's conf dir (before start)."""
        conf_dir = self.paths.cni_conf_dir
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / name).write_text(json.dumps(conflist, indent=2))
        return conf_dir / name

    def _bridge_conflist(self) -> dict:
        p = self.paths
        conf = {
            "cniVersion": "1.0.0",
            "name": f"edgevirt-cri-test{self.net}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(p.cni_data_dir / "host-local"),
                        "ranges": [[{"subnet": self.cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        if not Path(cni_bin_dirs()[0], "portmap").exists():
            conf["plugins"].pop()
        return conf

    def _write_configs(self) -> Path:
        p = self.paths
        cfg = configs.containerd(p, [self.cni_bin_dir] if self.cni_bin_dir else cni_bin_dirs())
        # critest also pulls k8s.gcr.io/pause:3.9 ("same image from different registries"): mirror
        # that old registry name to the local registry too, like the cluster's mirrors.
        for upstream in EXTRA_MIRRORS:
            hosts = p.etc / "containerd" / "certs.d" / upstream / "hosts.toml"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(
                f'server = "https://{upstream}"\n\n[host."http://{REGISTRY_ADDR}"]\n'
                '  capabilities = ["pull", "resolve"]\n  skip_verify = true\n'
            )
        if self.net is not None:
            self.write_cni_conflist(self._bridge_conflist())
        p.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        p.cni_data_dir.mkdir(parents=True, exist_ok=True)
        return cfg

    def start(self) -> PrivateContainerd:
        cfg = self._write_configs()
        argv = [shutil.which("containerd") or "containerd", "--config", str(cfg)]
        if self.netns is not None:
            argv = ["nsenter", f"--net=/run/netns/{self.netns}", *argv]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_for(
            f"private containerd on {self.socket} (log {self.log})", self._ready, 60, 0.1, retry_on=(OSError,)
        )
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"containerd exited ({self.proc.returncode}); log:\n{self.log.read_text()[-3000:]}"
            )
        return unix_socket_answers(self.socket)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the containerd process only (pods' shims keep running, as with a real restart)."""
        if self.running():
            processes.stop(self.proc, grace=15)

    def shim_pids(self) -> set[int]:
        """The containerd shims of this containerd (they name its socket on their command line)."""
        return set(leftovers.shims(self.paths))

    def close(self) -> None:
        """Remove every sandbox through containerd, then stop it and remove everything it left."""
        if self.running():
            with contextlib.suppress(Exception):
                ids = self.crictl("pods", "-q", check=False, timeout=60).stdout.split()
                if ids:
                    self.crictl("rmp", "-f", *ids, check=False, timeout=120)
        self.stop()
        leftovers.kill_shims(self.paths)
        leftovers.unmount_all(self.root)
        if self.net is not None:
            subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.net is not None:
            (NET_LOCKS / f"net{self.net}").unlink(missing_ok=True)
