"""Command-line entry point of edgevirt-controller (cluster mode and node mode)."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; the controller is built by the VirtualMachine issue."""
    print("edgevirt-controller: not implemented yet (see the VirtualMachine issue)", file=sys.stderr)
    return 2
