"""The systemd units and drop-ins the installer writes, and kubelet's KubeletConfiguration drop-in
(pure text from :class:`~.options.NodeOptions`).

* ``edgevirt-cri.service`` - ``Type=notify`` (edgevirt-cri sends READY=1 once it serves), ordered
  after containerd and libvirtd and before kubelet, restarted on failure. ``KillMode=mixed``: a stop
  sends SIGTERM to edgevirt-cri alone, which finishes its calls and exits; only what is still left
  in its cgroup after ``TimeoutStopSec`` (a CNI plugin mid-call) is killed. VMs are never in that
  cgroup: QEMU is started by libvirtd, so a restart of the shim leaves every VM running.
* ``edgevirt-macvtap.service`` - the macvtap CNI daemon (``Type=notify`` when every worker serves).
* ``kubelet.service.d/50-edgevirt.conf`` - kubelet wants edgevirt-cri and starts after it (Wants,
  not Requires: restarting edgevirt-cri must not restart kubelet).
* ``<kubelet config dir>/50-edgevirt.conf`` - ``containerRuntimeEndpoint`` and
  ``imageServiceEndpoint`` = edgevirt-cri's socket (kubelet reads it with ``--config-dir``); with
  ``--kubelet-evented-pleg`` also ``featureGates: {EventedPLEG: true}``.

Hardening: only directives that keep the host's mount namespace and devices. The kvm handler makes
network namespaces with ``ip netns add`` (bind mounts under /run/netns that libvirtd, the macvtap
daemon and kubelet must see), the CNI plugin creates tap device nodes, and both talk to libvirtd,
containerd and netlink - so no ProtectSystem=, PrivateTmp=, PrivateDevices=, ProtectKernel*=,
ProtectControlGroups=, ProtectClock=, DeviceAllow=, RestrictNamespaces= or MemoryDenyWriteExecute=
(ctypes/libffi). What is left: no new privileges, seccomp limits that the work never needs, a
capability bounding set without the capabilities nothing here uses, and the socket families used.
"""

from __future__ import annotations

import json
import re
import shlex

from .options import CRI_UNIT, KUBELET_UNIT, MACVTAP_UNIT, NodeOptions

HEADER = (
    "# Written by `edgevirt-node install`; `edgevirt-node uninstall` removes it.\n"
    "# Edits are overwritten: change the installer's flags and run it again.\n"
)
HARDENING = """\
NoNewPrivileges=yes
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK AF_PACKET
CapabilityBoundingSet=~CAP_SYS_BOOT CAP_SYS_TIME CAP_WAKE_ALARM CAP_SYS_MODULE CAP_SYS_RAWIO \
CAP_SYS_PACCT CAP_SYS_TTY_CONFIG CAP_MAC_ADMIN CAP_MAC_OVERRIDE CAP_AUDIT_CONTROL CAP_AUDIT_READ \
CAP_AUDIT_WRITE CAP_SYSLOG CAP_LEASE CAP_BLOCK_SUSPEND CAP_LINUX_IMMUTABLE
"""
_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def quote(arg: str) -> str:
    """One ExecStart argument: specifiers (%) and variables ($) doubled, quoted when needed."""
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: list[str]) -> str:
    return " ".join(quote(a) for a in argv)


def exec_start(unit_text: str) -> list[str]:
    """The argv of a unit's ExecStart= as this module writes it (for `--json`, tests, and the local
    cluster, which runs the same command without systemd)."""
    for line in unit_text.splitlines():
        if line.startswith("ExecStart="):
            value = line.removeprefix("ExecStart=")
            words = shlex.split(value.replace("$$", "\0"))
            return [w.replace("%%", "%").replace("\0", "$") for w in words]
    raise ValueError("the unit has no ExecStart= line")


def cri_argv(opts: NodeOptions) -> list[str]:
    assert opts.cri_binary is not None
    return [
        str(opts.cri_binary),
        f"--config={opts.config_path}",
        f"--ops-address={opts.ops_address}",
        f"--log-level={opts.log_level}",
        f"--log-format={opts.log_format}",
    ]


def macvtap_argv(opts: NodeOptions) -> list[str]:
    assert opts.macvtap_binary is not None
    return [
        str(opts.macvtap_binary),
        "daemon",
        f"--socket={opts.macvtap_socket}",
        f"--ops-address={opts.macvtap_ops_address}",
        f"--log-level={opts.log_level}",
        f"--log-format={opts.log_format}",
    ]


def cri_unit(opts: NodeOptions) -> str:
    macvtap = f" {MACVTAP_UNIT}" if opts.macvtap_daemon else ""
    return f"""{HEADER}[Unit]
Description=edgevirt-cri: the node's CRI endpoint (containerd passthrough, kvm VMs)
After=network-online.target containerd.service libvirtd.service virtqemud.service{macvtap}
Wants=network-online.target containerd.service{macvtap}
Before={KUBELET_UNIT}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_line(cri_argv(opts))}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2s
# SIGTERM to edgevirt-cri only; what is left in the cgroup after TimeoutStopSec gets SIGKILL. VMs are
# libvirtd's children (never in this cgroup): stopping or restarting edgevirt-cri leaves them running.
KillMode=mixed
TimeoutStopSec=30s
OOMScoreAdjust=-900
LimitNOFILE=1048576
# Shares the host's mount namespace and devices (ip netns, CNI device nodes, libvirt): see
# cri_shim/node/units.py for what is left out and why.
{HARDENING}
[Install]
WantedBy=multi-user.target
"""


def macvtap_unit(opts: NodeOptions) -> str:
    return f"""{HEADER}[Unit]
Description=edgevirt macvtap CNI daemon (the resident half of the macvtap plugin)
After=network-online.target
Wants=network-online.target
Before={CRI_UNIT} {KUBELET_UNIT}

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_line(macvtap_argv(opts))}
Environment=PYTHONUNBUFFERED=1
Restart=on-failure
RestartSec=2s
# SIGTERM to the supervisor, which stops its workers; pod network namespaces and their macvtaps are
# not this unit's and stay.
KillMode=mixed
TimeoutStopSec=30s
OOMScoreAdjust=-900
# Shares the host's mount namespace and devices (pod netns paths, tap device nodes): see
# cri_shim/node/units.py.
{HARDENING}
[Install]
WantedBy=multi-user.target
"""


def kubelet_unit_dropin() -> str:
    return f"""{HEADER}[Unit]
Wants={CRI_UNIT}
After={CRI_UNIT}
"""


def kubelet_config_dropin(opts: NodeOptions) -> str:
    endpoint = json.dumps(f"unix://{opts.socket}")
    gates = "featureGates:\n  EventedPLEG: true\n" if opts.kubelet_evented_pleg else ""
    return f"""{HEADER}# kubelet reads this file only when it runs with --config-dir={opts.kubelet_config_dir}
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: {endpoint}
imageServiceEndpoint: {endpoint}
{gates}"""
