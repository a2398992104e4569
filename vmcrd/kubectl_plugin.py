"""The kubectl-vm plugin: kubectl vm start|stop|restart|pause|unpause|mount|unmount|console NAME."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; the plugin is built by the VirtualMachine issue."""
    print("kubectl-vm: not implemented yet (see the VirtualMachine issue)", file=sys.stderr)
    return 2
