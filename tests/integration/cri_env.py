"""Test environment of edgevirt-cri: a private containerd (own root, state, socket, CNI bridge and
subnet, so destructive tests never touch the shared cluster's containerd) and an edgevirt-cri
process in front of it, with crictl as the client. Everything is removed on close(), also after a
failed test: pod sandboxes (through containerd, so it tears down its netns), shims, mounts, the
bridge, the directories.

Also used by deploy/cri/run-critest and bench/cri to get the same setup.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "local"))

from localcluster import configs, leftovers  # noqa: E402
from localcluster.components import cni_bin_dirs  # noqa: E402
from localcluster.paths import REGISTRY_ADDR, Paths  # noqa: E402

EXTRA_MIRRORS = ("k8s.gcr.io",)
NET_LOCKS = Path("/run/edgevirt-cri-test")
CRICTL = str(REPO / ".local" / "bin" / "crictl")
PYTHON = str(REPO / ".venv" / "bin" / "python")


def wait_until(what: str, check, timeout: float = 60, interval: float = 0.1):
    """Poll check() until truthy; AssertionError naming `what` on timeout (a condition, not a
    timed assertion: the timeout only bounds a hang)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # the thing may still be starting
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _sock_ok(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        s.connect(str(path))
    return True


@dataclass
class PrivateContainerd:
    """containerd 1.6 with its CRI plugin, configured like the cluster's (same config writer) but
    with its own directories, socket and pod network (bridge edgevirt-t<net>, 10.<245+net>.0.0/24)."""

    root: Path
    net: int = 0
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls) -> PrivateContainerd:
        """Claims a free pod network n (bridge edgevirt-t<n>, subnet 10.<245+n>.0.0/24) with a lock
        file, so several private containerds (tests, critest, bench) never share a bridge."""
        root = Path(tempfile.mkdtemp(prefix="edgevirt-cri-ctd-", dir="/var/tmp"))
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
            return cls(root=root, net=n)
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"no free test pod network: 10 lock files in {NET_LOCKS} are held")

    @property
    def bridge(self) -> str:
        return f"edgevirt-t{self.net}"

    @property
    def cidr(self) -> str:
        return f"10.{245 + self.net}.0.0/24"

    @property
    def paths(self) -> Paths:
        # A short run dir: unix socket paths are limited to 108 bytes.
        return Paths(state=self.root / "state", run=self.root / "run")

    @property
    def socket(self) -> Path:
        return self.paths.containerd_sock

    @property
    def log(self) -> Path:
        return self.root / "containerd.log"

    def _write_configs(self) -> Path:
        p = self.paths
        cfg = configs.containerd(p, cni_bin_dirs())
        # critest also pulls k8s.gcr.io/pause:3.9 ("same image from different registries"): mirror
        # that old registry name to the local registry too, like the cluster's mirrors.
        for upstream in EXTRA_MIRRORS:
            hosts = p.etc / "containerd" / "certs.d" / upstream / "hosts.toml"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(
                f'server = "https://{upstream}"\n\n[host."http://{REGISTRY_ADDR}"]\n'
                '  capabilities = ["pull", "resolve"]\n  skip_verify = true\n'
            )
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
        p.cni_conf_dir.mkdir(parents=True, exist_ok=True)
        (p.cni_conf_dir / "10-edgevirt-cri-test.conflist").write_text(json.dumps(conf, indent=2))
        p.cni_data_dir.mkdir(parents=True, exist_ok=True)
        return cfg

    def start(self) -> PrivateContainerd:
        cfg = self._write_configs()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [shutil.which("containerd") or "containerd", "--config", str(cfg)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_until(f"private containerd on {self.socket} (log {self.log})", lambda: self._ready(), 60)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"containerd exited ({self.proc.returncode}); log:\n{self.log.read_text()[-3000:]}"
            )
        return _sock_ok(self.socket)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop the containerd process only (pods' shims keep running, as with a real restart)."""
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return crictl(f"unix://{self.socket}", *args, check=check, timeout=timeout)

    def close(self) -> None:
        """Remove every sandbox through containerd, then stop it and remove everything it left."""
        if self.running():
            with contextlib.suppress(Exception):
                ids = self.crictl("pods", "-q", check=False, timeout=60).stdout.split()
                if ids:
                    self.crictl("rmp", "-f", *ids, check=False, timeout=120)
        self.stop()
        sock = str(self.socket)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and b"containerd-shim" in argv[0] and sock.encode() in argv:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)
        leftovers.unmount_all(self.root)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
        (NET_LOCKS / f"net{self.net}").unlink(missing_ok=True)


def crictl(
    endpoint: str, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess:
    """crictl against `endpoint` for both runtime and image service, no config file."""
    res = subprocess.run(
        [CRICTL, "--config", "/dev/null", "-r", endpoint, "-i", endpoint, "--timeout", "60s", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"crictl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
        )
    return res


@dataclass
class Shim:
    """An edgevirt-cri process with its own config, socket and state dir."""

    root: Path
    containerd_socket: Path
    extra_config: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @classmethod
    def create(cls, containerd_socket: Path, extra_config: dict | None = None) -> Shim:
        root = Path(tempfile.mkdtemp(prefix="edgevirt-cri-", dir="/var/tmp"))
        return cls(root=root, containerd_socket=containerd_socket, extra_config=dict(extra_config or {}))

    @property
    def socket(self) -> Path:
        return self.root / "cri.sock"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def log(self) -> Path:
        return self.root / "edgevirt-cri.log"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def write_config(self) -> Path:
        import yaml

        cfg = {
            "socket": str(self.socket),
            "state_dir": str(self.state_dir),
            "backends": {"containerd": {"type": "containerd", "socket": str(self.containerd_socket)}},
            "handlers": {"": "containerd", "runc": "containerd", "kata": "containerd"},
            **self.extra_config,
        }
        self.config.write_text(yaml.safe_dump(cfg))
        return self.config

    def start(self) -> Shim:
        self.write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "cri_shim.cli", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                start_new_session=True,
            )
        wait_until(f"edgevirt-cri on {self.socket} (log {self.log})", self._ready, 60)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"edgevirt-cri exited ({self.proc.returncode}); log:\n{self.log.read_text()}")
        return _sock_ok(self.socket)

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def crictl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return crictl(self.endpoint, *args, check=check, timeout=timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
