"""Kata detection: the Kata shim and a Kata ``configuration.toml`` are installed.

Kata needs hardware virtualisation, so Kata counts as usable only when KVM runs guests too
(:mod:`runtimeclass.guests` decides that).
"""

from __future__ import annotations

import os
import shutil

from .result import Check

KATA_SHIM = "containerd-shim-kata-v2"
KATA_CONFIGS = (
    "/etc/kata-containers/configuration.toml",
    "/usr/share/defaults/kata-containers/configuration.toml",
    "/opt/kata/share/defaults/kata-containers/configuration.toml",
)
KATA_BIN_DIRS = ("/opt/kata/bin", "/usr/local/bin", "/usr/bin")


def check_kata(kvm_ok: bool) -> Check:
    """Kata shim and configuration present (and KVM usable, which Kata needs)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *KATA_BIN_DIRS])
    shim = shutil.which(KATA_SHIM, path=path)
    conf = next((c for c in KATA_CONFIGS if os.path.exists(c)), None)
    details = {"shim": shim, "configuration": conf}
    if shim is None:
        return Check(False, f"{KATA_SHIM} not found in PATH or {', '.join(KATA_BIN_DIRS)}", details=details)
    if conf is None:
        return Check(False, f"no Kata configuration.toml in {', '.join(KATA_CONFIGS)}", details=details)
    if not kvm_ok:
        return Check(False, "Kata is installed but KVM does not run guests on this node", details=details)
    return Check(True, f"{shim} with {conf}, KVM usable", details=details)
