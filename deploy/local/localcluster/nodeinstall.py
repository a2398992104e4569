"""The node side of the local cluster, installed the way a real node gets it.

The edgevirt wheel (``deploy/images/edgevirt_wheel.py``, cached by its inputs) is installed into the
node's own virtualenv (``<state>/node/venv``), and that venv's ``edgevirt-node install`` writes
edgevirt-cri's config, its systemd units, kubelet's drop-in and libvirt's relaxed settings (these
sandboxed machines need them; a real node keeps libvirt's defaults) under ``<state>/etc``. systemd is
not PID 1 here, so the cluster runs the units' own ExecStart lines as its processes: what runs is
what an operator's node runs, not this checkout's code.

The venv is re-installed only when the wheel changed; a host daemon that still runs an older install
is restarted by ``up`` (its environment carries the wheel's digest, see :func:`wheel_digest`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from .configs import VM_HOST_DISK_ROOT
from .paths import REGISTRY_ADDR, REPO, VM_IMAGE_ROOTS, Paths

#: the environment variable that tells which wheel a host daemon was started from
WHEEL_ENV = "EDGEVIRT_NODE_WHEEL"
CRI_UNIT = "edgevirt-cri.service"
MACVTAP_UNIT = "edgevirt-macvtap.service"
PIP_TIMEOUT = 900  # a cold install builds libvirt-python from source


def node_dir(p: Paths) -> Path:
    return p.state / "node"


def venv(p: Paths) -> Path:
    return node_dir(p) / "venv"


def record(p: Paths) -> Path:
    """The installer's record of what it wrote (``uninstall`` removes exactly that)."""
    return node_dir(p) / "node-install.json"


def outcome_file(p: Paths) -> Path:
    """``edgevirt-node install --json``'s answer: the units and their ExecStart lines."""
    return node_dir(p) / "install-outcome.json"


def _stamp(p: Paths) -> Path:
    return venv(p) / ".edgevirt-wheel"


def build_wheel() -> Path:
    sys.path.insert(0, str(REPO / "deploy" / "images"))
    try:
        import edgevirt_wheel

        return Path(edgevirt_wheel.build_wheel(REPO))
    finally:
        sys.path.remove(str(REPO / "deploy" / "images"))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv: list[str], what: str, timeout: float = PIP_TIMEOUT) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r.stdout


def ensure_venv(p: Paths) -> str:
    """The node venv with the current wheel installed; returns what was done."""
    wheel = build_wheel()
    digest = _digest(wheel)
    stamp = _stamp(p)
    if stamp.exists() and stamp.read_text().strip() == digest:
        return f"wheel {wheel.name} ({digest[:12]}) already installed in {venv(p)}"
    py = venv(p) / "bin" / "python"
    if not py.exists():
        node_dir(p).mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "venv", str(venv(p))], f"python -m venv {venv(p)}")
    pip = [str(py), "-m", "pip", "--disable-pip-version-check", "-q"]
    # same version number, new contents: replace the package itself, then make sure its
    # dependencies are there (a no-op when nothing changed)
    _run([*pip, "install", "--no-deps", "--force-reinstall", str(wheel)], f"pip install {wheel.name}")
    _run([*pip, "install", str(wheel)], f"pip install the dependencies of {wheel.name}")
    stamp.write_text(digest + "\n")
    return f"installed {wheel.name} ({digest[:12]}) into {venv(p)}"


def wheel_digest(p: Paths) -> str:
    """The digest of the wheel installed in the node venv ('' before the first install)."""
    try:
        return _stamp(p).read_text().strip()
    except OSError:
        return ""


def install_argv(p: Paths, kubelet_endpoint: bool = True) -> list[str]:
    """``edgevirt-node install`` with the local cluster's paths (``--root`` is not used: the files
    live under the cluster's own state dir, named one by one)."""
    etc = p.etc
    argv = [
        str(venv(p) / "bin" / "edgevirt-node"),
        "install",
        "--json",
        f"--record={record(p)}",
        f"--config-path={etc / 'edgevirt-cri.yaml'}",
        f"--unit-dir={etc / 'systemd'}",
        f"--kubelet-config-dir={etc / 'kubelet.conf.d'}",
        f"--socket={p.cri_sock}",
        f"--state-dir={p.cri_state}",
        f"--containerd-socket={p.containerd_sock}",
        f"--containerd-root={p.data / 'containerd'}",
        f"--kvm-state-dir={p.kvm_state}",
        f"--vm-state-dir={p.vm_state}",
        f"--vm-conflist={p.vm_cni_conflist}",
        *(f"--image-root={r}" for r in VM_IMAGE_ROOTS),
        f"--insecure-registry={REGISTRY_ADDR}",
        f"--host-disk-root={VM_HOST_DISK_ROOT}",
        f"--kubelet-root-dir={p.kubelet_dir}",
        f"--macvtap-socket={p.macvtap_sock}",
        "--libvirt-relaxed",
        "--log-format=text",
    ]
    return argv


def install(p: Paths) -> str:
    """Install (idempotent: the installer changes nothing when all is as recorded)."""
    done = ensure_venv(p)
    out = _run(install_argv(p), "edgevirt-node install", timeout=120)
    outcome_file(p).write_text(out)
    changed = json.loads(out).get("changed")
    return f"{done}; edgevirt-node install: {'wrote the node side' if changed else 'up to date'}"


def exec_start(p: Paths, unit: str) -> list[str]:
    """The ExecStart argv of ``unit`` as the installer wrote it."""
    try:
        info = json.loads(outcome_file(p).read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{outcome_file(p)}: run deploy/local/up first ({e})") from None
    argv = info["info"]["units"][unit]["exec_start"]
    return [str(a) for a in argv]


def describe(p: Paths) -> str | None:
    digest = wheel_digest(p)
    if not digest or not outcome_file(p).exists():
        return None
    r = subprocess.run(
        [str(venv(p) / "bin" / "edgevirt-node"), "status", f"--record={record(p)}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"wheel {digest[:12]} in {venv(p)}" + ("" if r.returncode == 0 else "; node differs from record")


def uninstall(p: Paths) -> list[str]:
    """``edgevirt-node uninstall`` (what it wrote goes, what it changed is restored), then the venv."""
    removed = []
    tool = venv(p) / "bin" / "edgevirt-node"
    if tool.exists() and record(p).exists():
        _run([str(tool), "uninstall", f"--record={record(p)}"], "edgevirt-node uninstall", timeout=120)
        removed.append("the node install (edgevirt-node uninstall)")
    if node_dir(p).exists():
        shutil.rmtree(node_dir(p), ignore_errors=True)
        removed.append(str(node_dir(p)))
    return removed


def leftovers(p: Paths) -> list[str]:
    return [str(node_dir(p))] if node_dir(p).exists() else []
