"""From a macvtap CNI ADD result to the NICs of a VM.

The macvtap plugin (``cni_macvtap``) leaves the link in the pod netns and a char device node of its
tap queue at ``<deviceDir>/<CNI_CONTAINERID>/<ifname>`` (default deviceDir ``/run/edgevirt/macvtap``).
The guest NIC must carry the macvtap's MAC (a macvtap in bridge mode delivers only frames for its
own MAC), so both come from the result's sandbox interfaces, in order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import ValidationError
from .spec import NicSpec, check_mac

DEFAULT_DEVICE_DIR = Path("/run/edgevirt/macvtap")
SAFE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}")


def nics_from_cni_result(
    result: dict[str, Any], container_id: str, device_dir: Path = DEFAULT_DEVICE_DIR
) -> list[NicSpec]:
    """One :class:`NicSpec` per interface of the result that lives in a sandbox (the pod netns)."""
    if not SAFE_RE.fullmatch(container_id or "") or ".." in container_id:
        raise ValidationError(
            "containerID", f"{container_id!r} is not a safe id", "use the CNI_CONTAINERID as given"
        )
    if not isinstance(result, dict):
        raise ValidationError(
            "cniResult", "is not a CNI result object", "pass the parsed JSON result of CNI ADD"
        )
    nics = []
    for i, itf in enumerate(result.get("interfaces") or []):
        if not itf.get("sandbox"):
            continue
        name = str(itf.get("name", ""))
        if not SAFE_RE.fullmatch(name) or len(name) > 15 or ".." in name:
            raise ValidationError(
                f"cniResult.interfaces[{i}].name", f"{name!r}", "use a Linux interface name"
            )
        mac = check_mac(f"cniResult.interfaces[{i}].mac", str(itf.get("mac", "")))
        nics.append(NicSpec(mac=mac, tap_device=Path(device_dir) / container_id / name))
    if not nics:
        raise ValidationError(
            "cniResult.interfaces", "no interface inside the pod sandbox", "check that the macvtap plugin ran"
        )
    return nics
