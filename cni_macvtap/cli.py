"""Entry point of the macvtap CNI plugin executable (placeholder until the plugin lands)."""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point; the plugin is built by the macvtap CNI issue."""
    print("macvtap: not implemented yet (see the macvtap CNI issue)", file=sys.stderr)
    return 2
