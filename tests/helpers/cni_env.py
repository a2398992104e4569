"""Test topology for the macvtap CNI plugin: namespaces, a veth master, a peer, and plugin runners.

A "host" netns holds the master (one end of a veth pair), a "peer" netns holds the other end with an
address, and pod namespaces receive the macvtaps. Everything is named uniquely per topology, lives in
10.x test subnets inside these namespaces, and is removed on close() even after a failed test.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, processes
from helpers.netns import Namespaces, ip, links, set_up, sh, veth
from helpers.root import require_root, require_tools
from helpers.waiting import wait_for

__all__ = ["MASTER", "REFERENCE_CNI", "REPO", "PluginResult", "Topology", "links", "sh", "topology", "tree"]

REFERENCE_CNI = "/usr/lib/cni"
MASTER = "vm0"
PLUGIN_TIMEOUT_S = 120  # bounds a hung plugin call; a call takes well under a second


def require_cni_root() -> None:
    """Skip (with the exact reason) where namespaces and links cannot be made."""
    require_root("creates network namespaces, veth and macvtap links")
    require_tools("ip", "nsenter", hint="iproute2 / util-linux")
    if not os.path.exists(f"{REFERENCE_CNI}/host-local"):
        pytest.skip(
            f"needs the reference CNI plugins in {REFERENCE_CNI}: apt-get install containernetworking-plugins"
        )


def tree(path: Path) -> list[str]:
    """Every entry under path (relative), for leak checks."""
    if not path.exists():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@dataclass
class PluginResult:
    """Outcome of one plugin call."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@dataclass
class Topology:
    """Host/peer/pod namespaces plus per-topology plugin dirs."""

    tmp: Path
    tag: str = field(default_factory=lambda: f"evt{os.getpid() % 10000}x{secrets.token_hex(3)}")
    subnet_octet: int = field(default_factory=lambda: 100 + secrets.randbelow(150))
    pods: list[str] = field(default_factory=list)
    daemon: subprocess.Popen[bytes] | None = None
    namespaces: Namespaces = field(default_factory=Namespaces)

    @property
    def host(self) -> str:
        return f"{self.tag}-host"

    @property
    def peer(self) -> str:
        return f"{self.tag}-peer"

    @property
    def prefix(self) -> str:
        return f"10.{self.subnet_octet}.{int(self.tag[-2:], 16) % 250}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    @property
    def device_dir(self) -> Path:
        return self.tmp / "dev"

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    @property
    def ipam_dir(self) -> Path:
        return self.tmp / "ipam"

    @property
    def socket(self) -> str:
        return str(self.tmp / "macvtap.sock")

    def setup(self) -> Topology:
        self.namespaces.add(self.host)
        self.namespaces.add(self.peer)
        veth(self.host, MASTER, self.peer, "vp0")
        set_up(self.host, "lo", MASTER)
        set_up(self.peer, "lo", "vp0")
        ip(self.peer, "addr", "add", f"{self.gateway}/24", "dev", "vp0")
        return self

    def new_pod(self) -> str:
        """A fresh pod netns; returns its path."""
        name = f"{self.tag}-pod{len(self.pods)}"
        path = self.namespaces.add(name)
        self.pods.append(name)
        return path

    def conf(self, version: str = "1.0.0", **overrides: Any) -> dict[str, Any]:
        """A network config for the plugin on this topology (host-local IPAM in a temp dataDir)."""
        doc: dict[str, Any] = {
            "cniVersion": version,
            "name": f"net-{self.tag}",
            "type": "macvtap",
            "master": MASTER,
            "deviceDir": str(self.device_dir),
            "stateDir": str(self.state_dir),
            "daemonSocket": self.socket,
            "ipam": {
                "type": "host-local",
                "dataDir": str(self.ipam_dir),
                "ranges": [
                    [
                        {
                            "subnet": f"{self.prefix}.0/24",
                            "rangeStart": f"{self.prefix}.10",
                            "rangeEnd": f"{self.prefix}.200",
                            "gateway": self.gateway,
                        }
                    ]
                ],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }
        for key, value in overrides.items():
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        return doc

    def plugin(
        self,
        command: str,
        conf: dict[str, Any] | bytes | None,
        container_id: str = "c1",
        ifname: str = "eth0",
        netns: str | None = "",
        args: str = "",
        daemon: bool = True,
        env: dict[str, str] | None = None,
        cni_path: str | None = None,
        timeout: float = 120,
    ) -> PluginResult:
        """Run the plugin executable in the host netns (through the daemon unless daemon=False)."""
        e = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_IFNAME": ifname,
            "CNI_NETNS": netns or "",
            "CNI_ARGS": args,
            "CNI_PATH": cni_path if cni_path is not None else REFERENCE_CNI,
        }
        if not daemon:
            e["MACVTAP_NO_DAEMON"] = "1"
        if env is not None:
            e.update(env)
            e = {k: v for k, v in e.items() if v is not None}
        stdin = conf if isinstance(conf, bytes) else json.dumps(conf or {}).encode()
        proc = subprocess.run(
            ["ip", "netns", "exec", self.host, sys.executable, "-m", "cni_macvtap"],
            input=stdin,
            env=e,
            cwd=REPO,
            capture_output=True,
            check=False,
            timeout=timeout,
        )
        return PluginResult(
            proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        )

    def start_daemon(self, *extra: str) -> None:
        """Start `macvtap daemon` in the host netns on this topology's socket (plus extra daemon options);
        waits until it listens."""
        log = open(self.tmp / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
        self.daemon = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.host,
                sys.executable,
                "-m",
                "cni_macvtap",
                "daemon",
                "--socket",
                self.socket,
                *extra,
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        daemon = self.daemon

        def listening() -> bool:
            if daemon.poll() is not None:
                raise RuntimeError("macvtap daemon exited: " + self.daemon_log())
            return os.path.exists(self.socket) and "listening" in self.daemon_log()

        wait_for("the macvtap daemon to listen", listening, 60, 0.05, explain=self.daemon_log)

    def daemon_log(self) -> str:
        path = self.tmp / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            processes.stop(self.daemon, grace=20)
        self.daemon = None

    def allocated_ips(self, network: str | None = None) -> list[str]:
        """host-local's reservation files (one per allocated IP)."""
        d = self.ipam_dir / (network or f"net-{self.tag}")
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit() and p.name.count(".") == 3)

    def assert_clean(self) -> None:
        """No macvtap, device node, state record or IP allocation left behind."""
        assert set(links(self.host)) == {"lo", MASTER}, links(self.host).keys()
        for pod in self.pods:
            if os.path.exists(f"/run/netns/{pod}"):
                assert set(links(pod)) == {"lo"}, (pod, links(pod).keys())
        assert [p for p in tree(self.device_dir)] == [], tree(self.device_dir)
        assert [p for p in tree(self.state_dir) if p.endswith(".json")] == [], tree(self.state_dir)
        assert self.allocated_ips() == []

    def close(self) -> None:
        self.stop_daemon()
        self.namespaces.close()


@contextlib.contextmanager
def topology(tmp: Path, daemon: bool = False) -> Any:
    """A set-up Topology (optionally with a running daemon) that is always torn down."""
    require_cni_root()
    topo = Topology(tmp)
    try:
        topo.setup()
        if daemon:
            topo.start_daemon()
        yield topo
    finally:
        topo.close()
