"""libvirt's relaxed QEMU settings, as a marked block in ``qemu.conf`` (``--libvirt-relaxed`` only).

libvirt 9.0 (Debian 12) reads ``/etc/libvirt/qemu.conf`` and no drop-in directory, so the settings
go into that file between two marker lines, and uninstall takes them out again. libvirt's config
parser answers a key with its *first* assignment, so the block goes at the top of the file, where
it wins over an assignment further down. On a real node nothing is written: libvirt keeps its
secure defaults (QEMU as ``libvirt-qemu``, its security driver, cgroup controllers).

The relaxed settings are for machines without systemd, udev or usable cgroup controllers (the
sandboxed machines of the local cluster): guests run as root, no security driver, no cgroups.
"""

from __future__ import annotations

import re

BEGIN = "# BEGIN edgevirt-node --libvirt-relaxed (removed by `edgevirt-node uninstall`)"
END = "# END edgevirt-node --libvirt-relaxed"
SETTINGS = {
    "user": '"root"',
    "group": '"root"',
    "security_driver": '"none"',
    "cgroup_controllers": "[ ]",
}


def block() -> str:
    """The marked block, with a blank line after it."""
    lines = [
        BEGIN,
        "# Guests run as root without a security driver or cgroup controllers: for machines without",
        "# systemd, udev or usable cgroups only. At the top: libvirt takes a key's first assignment.",
        *(f"{key} = {value}" for key, value in SETTINGS.items()),
        END,
    ]
    return "\n".join(lines) + "\n\n"


def without_block(text: str) -> str:
    """``text`` with our block (and the blank line after it) taken out; unchanged when absent."""
    start = text.find(BEGIN + "\n")
    if start < 0 or (start > 0 and text[start - 1] != "\n"):
        return text
    end = text.find(END + "\n", start)
    if end < 0:
        return text
    end += len(END) + 1
    if text.startswith("\n", end):
        end += 1
    return text[:start] + text[end:]


def with_block(text: str) -> str:
    """``text`` with our block at the top (once)."""
    return block() + without_block(text)


def overridden_keys(text: str) -> list[str]:
    """Our keys that ``text`` (without our block) also assigns: ours win, which the report says."""
    rest = without_block(text)
    return [key for key in SETTINGS if re.search(rf"^\s*{key}\s*=", rest, re.MULTILINE)]
