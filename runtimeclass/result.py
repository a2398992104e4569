"""What the node probe found: one :class:`Check` per capability, and the node labels they imply.

``edgevirt.io/kvm`` (``true`` only when KVM really runs guests), ``edgevirt.io/accel`` (``kvm`` or
``tcg``) and ``edgevirt.io/kata`` (Kata installed and KVM usable). A :class:`ProbeResult` round-trips
through JSON (the probe's cache file and its CLI output).
"""

from __future__ import annotations

import dataclasses
from typing import Any

LABEL_KVM = "edgevirt.io/kvm"
LABEL_ACCEL = "edgevirt.io/accel"
LABEL_KATA = "edgevirt.io/kata"


@dataclasses.dataclass
class Check:
    """One capability: whether it works and, always, why we think so."""

    ok: bool
    reason: str
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ProbeResult:
    """Everything the probe learned about the node."""

    kvm: Check
    tcg: Check
    kata: Check
    libvirt: Check
    key: dict[str, str]

    @property
    def accel(self) -> str:
        """``kvm`` when KVM really runs guests, else ``tcg``."""
        return "kvm" if self.kvm.ok else "tcg"

    @property
    def domain_type(self) -> str:
        """The libvirt ``<domain type=...>`` to use: ``kvm`` or ``qemu``."""
        return "kvm" if self.kvm.ok else "qemu"

    def labels(self) -> dict[str, str]:
        """Node labels (the names runtimeclass.labels and docs/install-node.md give them)."""
        return {
            LABEL_KVM: "true" if self.kvm.ok else "false",
            LABEL_ACCEL: self.accel,
            LABEL_KATA: "true" if self.kata.ok else "false",
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "accel": self.accel,
            "domain_type": self.domain_type,
            "labels": self.labels(),
            "kvm": dataclasses.asdict(self.kvm),
            "tcg": dataclasses.asdict(self.tcg),
            "kata": dataclasses.asdict(self.kata),
            "libvirt": dataclasses.asdict(self.libvirt),
            "key": self.key,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProbeResult:
        return cls(
            kvm=Check(**d["kvm"]),
            tcg=Check(**d["tcg"]),
            kata=Check(**d["kata"]),
            libvirt=Check(**d["libvirt"]),
            key=d["key"],
        )
