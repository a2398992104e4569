"""Disk sizes: Kubernetes quantities -> bytes, and the node's limits on what one VM may allocate.

A VM pod's owner chooses its disks' sizes (``emptyDisk.capacity``, ``hostDisk.capacity``, the image's
own virtual size); qcow2 and raw disks are sparse, so a disk costs little when made and grows as the
guest writes, up to its virtual size. The node therefore bounds both ends (:class:`DiskLimits`):
no disk larger than ``max_disk_bytes``, and no new disk (or download) while the file system holding
the VM state has less than ``min_free_bytes`` free. The VM pod's volume count is bounded by the kvm
handler (``max_volumes``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .errors import ValidationError

#: the largest disk size any quantity may name (qcow2's practical limit), whatever the node allows
ABSOLUTE_MAX = 16 * 2**40
QUANTITY_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E|[eE][0-9]{1,2})?")
UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def format_bytes(n: int) -> str:
    """``n`` as the largest binary unit that divides it (``256Gi``, ``1536Mi``, ``4096``)."""
    for unit in ("Ei", "Pi", "Ti", "Gi", "Mi", "Ki"):
        if n and n % UNITS[unit] == 0:
            return f"{n // UNITS[unit]}{unit}"
    return str(n)


def _quantity_bytes(value: str) -> int | None:
    m = QUANTITY_RE.fullmatch(value)
    if not m:
        return None
    suffix = m.group(2) or ""
    mult = Decimal(10) ** int(suffix[1:]) if suffix[:1] in ("e", "E") and suffix[1:] else UNITS[suffix]
    try:
        n = Decimal(m.group(1)) * mult
    except InvalidOperation:
        return None
    return int(n) if n == n.to_integral_value() else None


def parse_quantity(field: str, value: str | int) -> int:
    """A Kubernetes byte quantity ('64Mi', '1.5Gi', '1G', '1e9', 1048576) -> bytes: whole, > 0, a
    multiple of 512, at most 16Ti; else ValidationError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValidationError(field, f"{value!r} is not a size", "use a quantity such as 64Mi or 1Gi")
    n = value if isinstance(value, int) else _quantity_bytes(value)
    if n is None:
        raise ValidationError(field, f"{value!r} is not a size", "use a quantity such as 64Mi or 1Gi")
    if n <= 0 or n > ABSOLUTE_MAX:
        raise ValidationError(field, f"{value!r} is out of range", "use a size between 1Mi and 16Ti")
    if n % 512:
        raise ValidationError(field, f"{value!r} is not a multiple of 512 bytes", "round it to Ki or Mi")
    return n


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclasses.dataclass(frozen=True)
class DiskLimits:
    """What one disk may be on this node (the kvm handler's options of the same names)."""

    max_disk_bytes: int = 256 * 2**30
    min_free_bytes: int = 2 * 2**30

    def check_size(self, field: str, size: int) -> int:
        """``size`` (a disk's virtual size) if it is within ``max_disk_bytes``."""
        if size > self.max_disk_bytes:
            limit = format_bytes(self.max_disk_bytes)
            raise ValidationError(
                field,
                f"{format_bytes(size)} is over this node's limit of {limit} per disk",
                f"ask for at most {limit} (the node's kvm option max_disk_bytes)",
            )
        return size

    def check_free(self, field: str, directory: Path, needed: int = 0) -> None:
        """Refuse to write ``needed`` more bytes (or make a new sparse disk) in ``directory`` when that
        would leave less than ``min_free_bytes`` free on its file system."""
        d = Path(directory)
        while not d.exists() and d.parent != d:
            d = d.parent
        free = free_bytes(d)
        if free - needed < self.min_free_bytes:
            raise ValidationError(
                field,
                "the node has too little free disk space for it "
                f"(it keeps {format_bytes(self.min_free_bytes)} free for itself)",
                "free space on the node, or make the disk smaller",
                detail=f"{d}: {free} bytes free, {needed} needed, reserve {self.min_free_bytes}",
            )
