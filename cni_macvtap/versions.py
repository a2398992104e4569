"""CNI spec versions: the ones we speak, their order, the VERSION verb's answer (stdlib only)."""

from __future__ import annotations

import re
from typing import Any

from .errors import DECODING_FAILURE, INCOMPATIBLE_VERSION, CNIError

SUPPORTED = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST = "1.1.0"
_VERSION_RE = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)")  # always fullmatch


def parse(version: str) -> tuple[int, int, int]:
    """'1.0.0' -> (1, 0, 0); anything else is a decode error naming cniVersion."""
    match = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise CNIError(DECODING_FAILURE, f'cniVersion {version!r} is not a version like "1.0.0"')
    return int(match[1]), int(match[2]), int(match[3])


def at_least(version: str, minimum: str) -> bool:
    """True when version >= minimum."""
    return parse(version) >= parse(minimum)


def require_supported(version: object) -> str:
    """Return the version if we speak it, else the spec's incompatible-version error."""
    if not isinstance(version, str) or not version:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            'cniVersion is missing: set "cniVersion" to one of ' + ", ".join(SUPPORTED),
        )
    if version not in SUPPORTED:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: config is {version!r}, plugin supports {list(SUPPORTED)}",
        )
    return version


def version_info() -> dict[str, Any]:
    """The VERSION verb's answer."""
    return {"cniVersion": LATEST, "supportedVersions": list(SUPPORTED)}
