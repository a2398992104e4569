"""The QEMU emulator wrapper that hands macvtap tap devices to QEMU as open fds.

Why a wrapper (virtlet's vmwrapper idea) and not ``virDomainQemuMonitorCommandWithFiles``:

* libvirt resolves ``<interface type='ethernet'>`` targets in its own network namespace, but the
  macvtap lives in the pod's. Its *char device* (``/dev/tapN``-like node made by the CNI plugin from
  the devt) is not namespaced: opening it from anywhere gives a working queue.
* With the wrapper, the NIC is part of the domain definition (``<qemu:commandline>`` +
  ``<qemu:env>``): every start of the domain (first start, stop/start, the controller's restart)
  opens the device again, a guest reboot keeps the QEMU process and so the fd, and a libvirtd
  restart reconnects to QEMU without touching the NIC. A NIC added through the monitor after start
  is unknown to libvirt: it is gone after a stop/start and invisible in ``virsh dumpxml``.

How: libvirt execs ``<emulator>`` = this script with QEMU's argv and the ``<qemu:env>`` variables.
For every ``EDGEVIRT_TAP_<n>=<device node>`` the wrapper opens the node read-write (lowest free fd,
so it cannot clash with the fds libvirt passes), replaces ``@EDGEVIRT_TAP_<n>_FD@`` in argv with
that number and execs the real QEMU (``EDGEVIRT_QEMU``, default ``/usr/bin/qemu-system-x86_64``).
Without those variables (libvirt's capability probing) it execs QEMU unchanged. Errors go to
stderr, which libvirt puts in the domain's QEMU log and in the error of the failed start.

The file is standalone (stdlib only): :func:`install_wrapper` copies it to a state directory with a
``#!<python> -I`` line, and that copy is what ``<emulator>`` names.
"""

import os
import re
import sys
from collections.abc import Callable

DEFAULT_QEMU = "/usr/bin/qemu-system-x86_64"
TAP_ENV_RE = re.compile(r"EDGEVIRT_TAP_(\d+)")
PLACEHOLDER_RE = re.compile(r"@EDGEVIRT_TAP_(\d+)_FD@")


def rewrite_argv(
    argv: list[str], env: dict[str, str], opener: Callable[[str, int], int] = os.open
) -> list[str]:
    """Open every EDGEVIRT_TAP_<n> device and substitute its fd into argv. Raises SystemExit."""
    fds: dict[str, int] = {}
    for key, path in sorted(env.items()):
        m = TAP_ENV_RE.fullmatch(key)
        if not m:
            continue
        try:
            fd = opener(path, os.O_RDWR)
        except OSError as e:
            raise SystemExit(
                f"edgevirt-qemu: cannot open tap device {path!r} ({key}): {e.strerror}"
            ) from None
        os.set_inheritable(fd, True)
        fds[m.group(1)] = fd
    out = []
    for arg in argv:
        for n in PLACEHOLDER_RE.findall(arg):
            if n not in fds:
                raise SystemExit(f"edgevirt-qemu: argument {arg!r} needs EDGEVIRT_TAP_{n}, which is not set")
        out.append(PLACEHOLDER_RE.sub(lambda m: str(fds[m.group(1)]), arg))
    return out


def main() -> None:
    qemu = os.environ.get("EDGEVIRT_QEMU", DEFAULT_QEMU)
    args = rewrite_argv(sys.argv[1:], dict(os.environ))
    os.execv(qemu, [qemu, *args])


if __name__ == "__main__":
    main()
