"""libvirt's domain (state, reason) codes -> :class:`.model.DomainState`, and the container-like
exit code of a stopped VM (CRI ``ContainerStatus.exit_code``).

Pure tables. The state codes are libvirt's ``virDomainState`` values (stable ABI, the same in
every libvirt), copied here so deciding a state needs no libvirt import.
"""

from __future__ import annotations

from .model import DomainState

# virDomainState
VIR_DOMAIN_NOSTATE = 0
VIR_DOMAIN_RUNNING = 1
VIR_DOMAIN_BLOCKED = 2
VIR_DOMAIN_PAUSED = 3
VIR_DOMAIN_SHUTDOWN = 4
VIR_DOMAIN_SHUTOFF = 5
VIR_DOMAIN_CRASHED = 6
VIR_DOMAIN_PMSUSPENDED = 7

# libvirt state -> {reason code: reason name}
RUNNING_REASONS = dict(enumerate((
    "unknown", "booted", "migrated", "restored", "from-snapshot", "unpaused", "migration-canceled",
    "save-canceled", "wakeup", "crashed", "postcopy",
)))  # fmt: skip
PAUSED_REASONS = dict(enumerate((
    "unknown", "user", "migration", "save", "dump", "ioerror", "watchdog", "from-snapshot", "shutting-down",
    "snapshot", "crashed", "starting-up", "postcopy", "postcopy-failed",
)))  # fmt: skip
SHUTOFF_REASONS = dict(enumerate((
    "unknown", "shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from-snapshot", "daemon",
)))  # fmt: skip
SHUTDOWN_REASONS = {0: "unknown", 1: "user"}
CRASHED_REASONS = {0: "unknown", 1: "panicked"}
#: container-like exit codes for a stopped VM (CRI ContainerStatus.exit_code)
EXIT_CODES = {"shutdown": 0, "destroyed": 137, "crashed": 139, "failed": 1, "daemon": 137}


def map_state(state: int, reason: int) -> DomainState:
    """libvirt (state, reason) -> :class:`DomainState`."""
    if state in (VIR_DOMAIN_RUNNING, VIR_DOMAIN_BLOCKED):
        return DomainState("running", RUNNING_REASONS.get(reason, "unknown"))
    if state == VIR_DOMAIN_PAUSED:
        return DomainState("paused", PAUSED_REASONS.get(reason, "unknown"))
    if state == VIR_DOMAIN_SHUTDOWN:
        return DomainState("shutting-down", SHUTDOWN_REASONS.get(reason, "unknown"))
    if state == VIR_DOMAIN_SHUTOFF:
        r = SHUTOFF_REASONS.get(reason, "unknown")
        return DomainState("shutoff", r, EXIT_CODES.get(r, 0 if r == "unknown" else 1))
    if state == VIR_DOMAIN_CRASHED:
        return DomainState("crashed", CRASHED_REASONS.get(reason, "unknown"), 139)
    if state == VIR_DOMAIN_PMSUSPENDED:
        return DomainState("pmsuspended", "unknown")
    return DomainState("unknown", "unknown")
