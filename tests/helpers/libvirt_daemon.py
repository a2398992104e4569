"""Bring up libvirtd + virtlogd the way these machines need them (no systemd, hybrid cgroups, no
security driver), for the integration tests' session fixture and bench/vm:

* ``/etc/libvirt/qemu.conf`` gets a managed block: ``user``/``group`` root, ``security_driver
  "none"``, ``cgroup_controllers [ ]`` (no systemd, hybrid cgroups: libvirt's cgroup code gets in
  the way). The block is replaced, never duplicated, so calling this again is harmless.
* the ``libvirt-qemu`` user and ``kvm`` group must exist even so; they are created if missing.
* ``virtlogd -d`` then libvirtd are started only when the libvirtd socket does not answer;
  libvirtd under the local cluster's reaper (deploy/local/localcluster/reaper.py), as
  ``deploy/local/up`` runs it: these machines' PID 1 reaps the QEMUs libvirtd daemonizes 1-2 s
  late, and libvirt sees a VM end only once its QEMU is reaped.

``ensure_libvirtd()`` returns a :class:`DaemonState` saying which daemons this call started, so a
caller that started them can stop them again with :func:`stop_started`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO
from helpers.waiting import TimedOut, wait_for

QEMU_CONF = Path("/etc/libvirt/qemu.conf")
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
REAPER = REPO / "deploy/local/localcluster/reaper.py"
LIBVIRTD_LOG = Path("/var/log/libvirt/libvirtd-tests.log")

# The marker keeps this module's old path on purpose: qemu.conf files written with it are recognised.
BEGIN = "# --- edgevirt managed block (tests/libvirt_daemon.py) ---"
END = "# --- end edgevirt managed block ---"
MANAGED_SETTINGS = {
    "user": '"root"',
    "group": '"root"',
    "security_driver": '"none"',
    "cgroup_controllers": "[ ]",
}


@dataclasses.dataclass
class DaemonState:
    """What :func:`ensure_libvirtd` found or did."""

    started_libvirtd: bool = False
    started_virtlogd: bool = False
    libvirtd_pid: int | None = None
    virtlogd_pid: int | None = None


def effective_settings(text: str) -> dict[str, str]:
    """The last active ``key = value`` of every key in qemu.conf text."""
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def render_qemu_conf(text: str) -> str:
    """Return qemu.conf text with our settings in effect: unchanged if they already are (e.g. written
    by deploy/install/install), else with our managed block (other active lines for those keys are
    commented out)."""
    eff = effective_settings(text)
    if all(eff.get(k) == v for k, v in MANAGED_SETTINGS.items()):
        return text
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", "", text, flags=re.S)
    keep = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.lstrip().startswith("#") and key in MANAGED_SETTINGS:
            keep.append("# (edgevirt) " + line)
        else:
            keep.append(line)
    block = [BEGIN] + [f"{k} = {v}" for k, v in MANAGED_SETTINGS.items()] + [END]
    return "\n".join(keep).rstrip("\n") + "\n" + "\n".join(block) + "\n"


def configure(qemu_conf: Path = QEMU_CONF) -> bool:
    """Write the managed qemu.conf block and make sure user/group exist. True if anything changed."""
    changed = False
    old = qemu_conf.read_text() if qemu_conf.exists() else ""
    new = render_qemu_conf(old)
    if new != old:
        qemu_conf.parent.mkdir(parents=True, exist_ok=True)
        qemu_conf.write_text(new)
        changed = True
    try:
        grp.getgrnam("kvm")
    except KeyError:
        subprocess.run(["groupadd", "--system", "kvm"], check=True, timeout=60)
        changed = True
    try:
        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "-g",
                "kvm",
                "-s",
                "/usr/sbin/nologin",
                "libvirt-qemu",
            ],
            check=True,
            timeout=60,
        )
        changed = True
    for d in ("/var/log/libvirt", "/run/libvirt", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu"):
        Path(d).mkdir(parents=True, exist_ok=True)
    return changed


def libvirtd_answers(uri: str = "qemu:///system") -> bool:
    """True if a libvirtd answers on the system socket."""
    if not LIBVIRT_SOCK.exists():
        return False
    r = subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, text=True, timeout=30)
    return r.returncode == 0


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    # a daemon whose parent does not reap it stays a zombie after exiting: that counts as gone
    return _read_pid_of(pid)


def _read_pid_of(pid: int) -> int | None:
    """``pid`` if that process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid


def ensure_libvirtd(timeout: float = 30.0) -> DaemonState:
    """Configure and, if needed, start virtlogd and libvirtd. Idempotent."""
    state = DaemonState()
    if libvirtd_answers():
        state.libvirtd_pid = _read_pid(LIBVIRTD_PIDFILE)
        state.virtlogd_pid = _read_pid(VIRTLOGD_PIDFILE)
        if state.virtlogd_pid is None and not VIRTLOGD_SOCK.exists():
            subprocess.run(["virtlogd", "-d"], check=True, timeout=60)
            state.started_virtlogd = True
            state.virtlogd_pid = _read_pid(VIRTLOGD_PIDFILE)
        return state
    configure()
    if _read_pid(VIRTLOGD_PIDFILE) is None:
        subprocess.run(["virtlogd", "-d"], check=True, timeout=60)
        state.started_virtlogd = True
        wait_for("virtlogd socket", VIRTLOGD_SOCK.exists, timeout, 0.1)
    state.virtlogd_pid = _read_pid(VIRTLOGD_PIDFILE)
    if _read_pid(LIBVIRTD_PIDFILE) is None:
        start_libvirtd()
        state.started_libvirtd = True
    wait_for(f"libvirtd to answer on {LIBVIRT_SOCK}", libvirtd_answers, timeout, 0.1)
    state.libvirtd_pid = _read_pid(LIBVIRTD_PIDFILE)
    return state


def start_libvirtd() -> None:
    """libvirtd in the foreground under the reaper, in a session of its own (it outlives us)."""
    LIBVIRTD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with LIBVIRTD_LOG.open("ab") as log:
        subprocess.Popen(
            [sys.executable, str(REAPER), "--", "libvirtd"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )


def stop_started(state: DaemonState) -> None:
    """Stop only the daemons that :func:`ensure_libvirtd` started (by pid)."""
    for started, pid in (
        (state.started_libvirtd, state.libvirtd_pid),
        (state.started_virtlogd, state.virtlogd_pid),
    ):
        if started and pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def restart_libvirtd(state: DaemonState, timeout: float = 30.0) -> None:
    """Restart a libvirtd that ``state`` says we started (virtlogd keeps running). Updates ``state``."""
    if not (state.started_libvirtd and state.libvirtd_pid):
        raise RuntimeError("refusing to restart a libvirtd this process did not start")
    os.kill(state.libvirtd_pid, signal.SIGTERM)
    wait_for(
        "libvirtd to stop",
        lambda: _read_pid(LIBVIRTD_PIDFILE) is None and not libvirtd_answers(),
        timeout,
        0.1,
    )
    start_libvirtd()
    wait_for("libvirtd to answer again", libvirtd_answers, timeout, 0.1)
    state.libvirtd_pid = _read_pid(LIBVIRTD_PIDFILE)


class PrivateLibvirtd:
    """A libvirtd + virtlogd of our own, in a private mount namespace, for tests that must restart
    the daemon without touching the node's (another owner's) libvirtd.

    A holder process (``unshare --mount --propagation slave``: mounts and unmounts of the node, such
    as ``ip netns add/del`` of other tests, still reach it, so it never pins anybody's network
    namespace) owns the namespace; tmpfs mounts there hide the node's
    /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, and /etc/libvirt is a
    copy (same qemu.conf, no autostart networks). Everything else (disks, logs, kernels under /tmp
    or $HOME) is shared. Clients connect through the holder's root:
    ``qemu+unix:///system?socket=/proc/<holder>/root/run/libvirt/libvirt-sock``.
    """

    DIRS = ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.holder: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        assert self.holder is not None
        return f"qemu+unix:///system?socket=/proc/{self.holder.pid}/root/run/libvirt/libvirt-sock"

    def _ns(self, *argv: str) -> subprocess.CompletedProcess[str]:
        assert self.holder is not None
        return subprocess.run(
            ["nsenter", "-t", str(self.holder.pid), "-m", "--", *argv],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )

    def _answers(self) -> bool:
        r = subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True, text=True, timeout=30)
        return r.returncode == 0

    def start(self, timeout: float = 30.0) -> PrivateLibvirtd:
        configure()
        etc = self.workdir / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, symlinks=True, dirs_exist_ok=True)
        shutil.rmtree(etc / "qemu" / "networks" / "autostart", ignore_errors=True)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "--", "sleep", "infinity"]
        )
        holder = self.holder
        wait_for(
            "the mount namespace holder",
            lambda: os.readlink(f"/proc/{holder.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"),
            timeout,
            0.1,
        )
        for d in self.DIRS:
            self._ns("mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", d)
        self._ns("mkdir", "-p", "/var/lib/libvirt/qemu", "/var/cache/libvirt/qemu")
        self._ns("mount", "--bind", str(etc), "/etc/libvirt")
        self._ns("virtlogd", "-d", "-p", str(self.workdir / "virtlogd.pid"))
        self._start_libvirtd(timeout)
        return self

    def _start_libvirtd(self, timeout: float) -> None:
        self._ns("libvirtd", "-d", "-p", str(self.workdir / "libvirtd.pid"))
        wait_for("the private libvirtd to answer", self._answers, timeout, 0.1)

    def pid(self, which: str = "libvirtd") -> int | None:
        return _read_pid(self.workdir / f"{which}.pid")

    def restart_libvirtd(self, timeout: float = 30.0) -> None:
        pid = self.pid()
        if pid:
            os.kill(pid, signal.SIGTERM)
            wait_for("the private libvirtd to stop", lambda: _read_pid_of(pid) is None, timeout, 0.1)
        self._start_libvirtd(timeout)

    def stop(self) -> None:
        """Destroy and undefine every domain of the private daemon, then stop it and the namespace."""
        if self.holder is not None and self.pid() and self._answers():
            names = subprocess.run(
                ["virsh", "-c", self.uri, "list", "--all", "--name"],
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            ).stdout.split()
            for name in names:
                for verb in ("destroy", "undefine"):
                    subprocess.run(["virsh", "-c", self.uri, verb, name], capture_output=True, timeout=60)
        for which in ("libvirtd", "virtlogd"):
            pid = self.pid(which)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                with contextlib.suppress(TimedOut):
                    wait_for(f"{which} to stop", lambda p=pid: _read_pid_of(p) is None, 15, 0.1)
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(10)
            self.holder = None


if __name__ == "__main__":  # cd tests && python -m helpers.libvirt_daemon
    print(ensure_libvirtd())
