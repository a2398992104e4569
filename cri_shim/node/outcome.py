"""What ``install``, ``uninstall`` and ``status`` report: one line per thing touched, warnings,
the next steps for systemd, and (``--json``) everything a caller needs to run the services itself -
the units' ExecStart argv, the sockets, the ops addresses, the files - which is how the local
cluster, without systemd, starts exactly what the units would.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Change:
    """``action``: created, updated, unchanged, removed, restored, kept, missing, modified."""

    action: str
    kind: str
    path: str
    role: str
    note: str = ""

    def line(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.action:<9} {self.kind:<5} {self.path}  - {self.role}{note}"


@dataclass
class Outcome:
    command: str
    changed: bool
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    ok: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def text(self) -> str:
        head = {
            "install": "installed" if self.changed else "already installed: nothing to change",
            "uninstall": "uninstalled" if self.changed else "nothing to uninstall",
            "status": "installed as recorded" if self.ok else "not as recorded",
        }[self.command]
        lines = [f"edgevirt-node {self.command}: {head}"]
        lines += [
            f"  {c.line()}" for c in self.changes if c.action != "unchanged" or self.command == "status"
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        if self.next_steps:
            lines.append("next:")
            lines += [f"  {s}" for s in self.next_steps]
        return "\n".join(lines) + "\n"
