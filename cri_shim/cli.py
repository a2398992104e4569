"""Command-line entry point of edgevirt-cri (the CRI server)."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; the CRI server is built by the edgevirt-cri issue."""
    print("edgevirt-cri: not implemented yet (see the edgevirt-cri issue)", file=sys.stderr)
    return 2
