#!/usr/bin/env python3
"""Build a tiny test guest from Debian's installed kernel and busybox-static (stdlib only).

The guest is the host's /boot/vmlinuz-<version> plus an initramfs holding busybox, the virtio
modules (virtio_pci, virtio_net, virtio_blk, virtio_console), isofs and ext4 with their
dependencies, the QEMU guest agent (Debian's qemu-ga) and util-linux's script with the libraries
they need, and an /init that loads the modules, configures eth0 from the kernel command line, starts
the guest agent on its virtio-serial port and reports on the serial console.

API (small on purpose; also used for VM disk images):

    from build_guest import build_guest, kernel_cmdline
    guest = build_guest()                 # -> Guest(version, kernel, initrd), cached
    cmdline = kernel_cmdline(ip="10.88.0.10/24", gw="10.88.0.1")

Kernel command line understood by /init:
    edgevirt.ip=ADDR/PREFIX   address for eth0 (no address: eth0 is only brought up)
    edgevirt.gw=ADDR          default gateway
    edgevirt.mac=MAC          pick the NIC with this MAC instead of the first non-loopback one
    edgevirt.poweroff=N       power off N seconds after "up" (default: stay up)
    edgevirt.agent=off        do not start the guest agent (also: "# edgevirt.agent: off" in the
                              NoCloud user-data), for tests of a VM without one
Console markers (one line each, on ttyS0):
    EDGEVIRT-GUEST: modules <name>...     after loading modules
    EDGEVIRT-GUEST: ip <iface> <addr> mac <mac>
    EDGEVIRT-GUEST: agent <dev>|off|none  qemu-ga started on <dev> / switched off / no agent port
    EDGEVIRT-GUEST: up                    network configured; ping should work now
    EDGEVIRT-GUEST: error <what>          something failed (the guest keeps running)
    EDGEVIRT-GUEST: blocks <dev>...       block devices after "up"; then, while running:
    EDGEVIRT-GUEST: block+ <dev> <sectors> / block- <dev>   a disk was hot-plugged / unplugged
    EDGEVIRT-GUEST: acpi power button     ACPI power button pressed; the guest powers off
    EDGEVIRT-GUEST: echo <line>           a line typed on the serial console (an attach's stdin)

Output: ~/.cache/edgevirt/guest/<kernel-version>-<hash of this file and its inputs>/{vmlinuz,initrd.img}
CLI: python3 deploy/images/build_guest.py [--kernel-version V] [--cache-dir DIR]  (prints the paths)
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
# Programs copied into the initramfs with the shared libraries they load (ldd): the QEMU guest agent
# (exec, exec probes and port-forward of VM pods go through it) and util-linux's script (a pty for
# `kubectl exec -t`; busybox has none). Debian packages: qemu-guest-agent, bsdutils.
PROGRAMS = {Path("/usr/sbin/qemu-ga"): "qemu-guest-agent", Path("/usr/bin/script"): "bsdutils"}
# Wanted modules; dependencies come from modules.dep (loaded first). For the NIC this yields the order
# order the guest kernel needs: virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci,
# failover, net_failover, virtio_net.
MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "cdrom", "isofs", "crc32c_generic", "ext4")
# ACPI power button -> /dev/input/event* (graceful shutdown), virtio-scsi + sd_mod for hotplug on scsi.
MODULES += ("button", "evdev", "virtio_scsi", "sd_mod")
# the NoCloud seed (a sata cdrom labelled cidata): its network-config gives eth0 its address
MODULES += ("ahci", "sr_mod")
# virtio-serial: the guest agent's port and the ports edgevirt hot-plugs for exec and port-forward
MODULES += ("virtio_console",)

INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mkdir -p /dev/pts
/bin/busybox mount -t devpts devpts /dev/pts 2>/dev/null
/bin/busybox --install -s /bin
export PATH=/bin
say() { echo "EDGEVIRT-GUEST: $*" > /dev/ttyS0 2>/dev/null || echo "EDGEVIRT-GUEST: $*"; }
loaded=""
for m in $(cat /etc/modules.order); do
  if insmod "/lib/modules/$m.ko" 2>/tmp/insmod.err; then loaded="$loaded $m"
  else say "error insmod $m $(cat /tmp/insmod.err)"; fi
done
say "modules$loaded"
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1="*) echo "${w#*=}";; esac; done; }
ip_addr=$(arg edgevirt.ip); gw=$(arg edgevirt.gw); want_mac=$(arg edgevirt.mac); off=$(arg edgevirt.poweroff)
agent=$(arg edgevirt.agent)
# no address on the command line: read the first NIC's address, gateway and MAC from a NoCloud seed
if [ -z "$ip_addr" ]; then
  for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/sr0 ] && break; sleep 0.5; done
  if [ -b /dev/sr0 ] && mount -t iso9660 -o ro /dev/sr0 /mnt 2>/dev/null; then
    if [ -f /mnt/network-config ]; then
      ip_addr=$(awk '/^ *addresses:/{getline; sub(/^ *- */, ""); print; exit}' /mnt/network-config)
      gw=$(awk '/^ *via:/{print $2; exit}' /mnt/network-config)
      want_mac=$(awk '/^ *macaddress:/{print $2; exit}' /mnt/network-config | tr -d "'\"")
    fi
    # tests only: "# edgevirt.poweroff: N" in the user-data powers the guest off N s after boot
    [ -n "$off" ] || off=$(awk '/^# *edgevirt.poweroff:/{print $3; exit}' /mnt/user-data 2>/dev/null)
    # tests only: "# edgevirt.agent: off" boots the guest without its guest agent
    [ -n "$agent" ] || agent=$(awk '/^# *edgevirt.agent:/{print $3; exit}' /mnt/user-data 2>/dev/null)
    say "cidata $(awk '/instance-id/{print $2}' /mnt/meta-data) ${ip_addr:-no-address}"
    umount /mnt
  fi
fi
ip link set lo up
iface=""
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  for d in /sys/class/net/*; do
    n=${d##*/}; [ "$n" = lo ] && continue
    if [ -z "$want_mac" ] || [ "$(cat $d/address)" = "$want_mac" ]; then iface=$n; break; fi
  done
  [ -n "$iface" ] && break
  sleep 0.5
done
if [ -z "$iface" ]; then
  say "error no network interface"
else
  ip link set "$iface" up
  if [ -n "$ip_addr" ]; then ip addr add "$ip_addr" dev "$iface" || say "error ip addr add $ip_addr"; fi
  if [ -n "$gw" ]; then ip route add default via "$gw" || say "error default route via $gw"; fi
  say "ip $iface ${ip_addr:-none} mac $(cat /sys/class/net/$iface/address)"
fi
# a data disk (the first virtio disk after the boot disk, vdb): say what an earlier boot wrote to
# it, then write this boot's token, so a test sees a VM's disk outlive a stop/start
if [ -b /dev/vdb ]; then
  had=$(dd if=/dev/vdb bs=64 count=1 2>/dev/null | tr -cd 'a-z0-9-')
  token="boot-$(cut -c1-8 /proc/sys/kernel/random/uuid)"
  printf '%-63s\n' "$token" | dd of=/dev/vdb bs=64 count=1 conv=notrunc,fsync 2>/dev/null
  say "data vdb had ${had:-nothing} now $token"
fi
# the QEMU guest agent on its virtio-serial port, found by the port's name (no udev here)
agent_dev=""
if [ "$agent" != off ] && ls /sys/bus/virtio/drivers/virtio_console/ | grep -q virtio; then
  for i in $(seq 1 30); do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && agent_dev=/dev/${p##*/}
    done
    [ -n "$agent_dev" ] && [ -c "$agent_dev" ] && break
    agent_dev=""
    sleep 0.1
  done
fi
if [ "$agent" = off ]; then say "agent off"
elif [ -n "$agent_dev" ]; then
  qemu-ga -m virtio-serial -p "$agent_dev" -t /run -l /tmp/qemu-ga.log &
  say "agent $agent_dev"
else say "agent none"; fi
say "up"
if [ -n "$off" ]; then sleep "$off"; poweroff -f; fi
# ACPI power button (libvirt shutdown) -> poweroff (any event of that input device);
# block devices appearing/leaving -> markers
for e in /sys/class/input/event*; do
  [ "$(cat $e/device/name 2>/dev/null)" = "Power Button" ] || continue
  (head -c 1 /dev/input/${e##*/} >/dev/null && say "acpi power button" && poweroff -f) &
done
# the serial console's input (CRI Attach: crictl/kubectl attach -i): every line read is said back
(while read -r line; do say "echo $line"; done < /dev/ttyS0) &
blocks=" $(ls /sys/block | tr '\n' ' ')"
say "blocks$blocks"
while true; do
  sleep 0.5
  now=" $(ls /sys/block | tr '\n' ' ')"
  [ "$now" = "$blocks" ] && continue
  for b in $now; do
    case "$blocks" in *" $b "*) ;; *) say "block+ $b $(cat /sys/block/$b/size 2>/dev/null)";; esac
  done
  for b in $blocks; do case "$now" in *" $b "*) ;; *) say "block- $b";; esac; done
  blocks="$now"
done
"""


@dataclass(frozen=True)
class Guest:
    """A built guest: kernel and initramfs paths for `qemu -kernel K -initrd I -append ...`."""

    version: str
    kernel: Path
    initrd: Path


def kernel_cmdline(
    ip: str | None = None, gw: str | None = None, mac: str | None = None, extra: str = ""
) -> str:
    """Kernel command line for the guest: serial console plus the edgevirt.* network parameters."""
    parts = ["console=ttyS0", "panic=-1", "quiet"]
    if ip:
        parts.append(f"edgevirt.ip={ip}")
    if gw:
        parts.append(f"edgevirt.gw={gw}")
    if mac:
        parts.append(f"edgevirt.mac={mac.lower()}")
    if extra:
        parts.append(extra)
    return " ".join(parts)


def default_kernel_version() -> str:
    """The newest Debian kernel with both /boot/vmlinuz-V and /lib/modules/V."""
    found = sorted(
        p.name[len("vmlinuz-") :]
        for p in Path("/boot").glob("vmlinuz-*")
        if (Path("/lib/modules") / p.name[len("vmlinuz-") :]).is_dir()
    )
    if not found:
        raise SystemExit("build_guest: no /boot/vmlinuz-* with modules: apt-get install linux-image-amd64")
    return found[-1]


def module_order(version: str, wanted: tuple[str, ...] = MODULES) -> list[str]:
    """Relative paths (under /lib/modules/V) of wanted modules and their deps, dependencies first."""
    root = Path("/lib/modules") / version
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps.get(mod, [])):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(mod)

    for name in wanted:
        if name not in by_name:
            raise SystemExit(f"build_guest: module {name} not found for kernel {version}")
        visit(by_name[name])
    return order


def _inputs_hash(version: str) -> str:
    h = hashlib.sha256(Path(__file__).read_bytes())
    for p in (BUSYBOX, Path(f"/boot/vmlinuz-{version}"), *PROGRAMS):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


class _Cpio:
    """A minimal newc cpio writer (enough for an initramfs: dirs, files, char devices)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields) + nameb)
        self.buf.write(b"\0" * ((4 - self.buf.tell() % 4) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * ((4 - self.buf.tell() % 4) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def shared_libraries(program: Path) -> list[Path]:
    """The shared libraries ``program`` loads, the dynamic loader included, as ldd names them."""
    r = subprocess.run(["ldd", str(program)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"build_guest: ldd {program} failed: {r.stderr.strip() or r.stdout.strip()}")
    out: list[Path] = []
    for line in r.stdout.splitlines():
        words = line.split()
        path = words[2] if len(words) > 2 and words[1] == "=>" else words[0] if words else ""
        if path.startswith("/") and Path(path) not in out:
            out.append(Path(path))
    return out


def add_programs(cpio: _Cpio) -> None:
    """PROGRAMS into bin/, their libraries at the paths ldd gave (the loader finds them there)."""
    dirs: set[str] = set()
    for program, package in PROGRAMS.items():
        if not program.is_file():
            raise SystemExit(f"build_guest: {program} missing: apt-get install {package}")
        cpio.file(f"bin/{program.name}", program.read_bytes(), 0o755)
        for lib in shared_libraries(program):
            rel = str(lib).lstrip("/")
            parent = ""
            for part in Path(rel).parent.parts:
                parent = f"{parent}/{part}" if parent else part
                if parent not in dirs and parent not in ("lib", "bin"):
                    dirs.add(parent)
                    cpio.dir(parent)
            if rel not in dirs:
                dirs.add(rel)
                cpio.file(rel, lib.read_bytes(), 0o755)


def build_initrd(version: str) -> bytes:
    """The gzip-compressed newc initramfs for one kernel version."""
    mods = module_order(version)
    cpio = _Cpio()
    for d in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run", "mnt"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    add_programs(cpio)
    cpio.file("init", INIT.encode(), 0o755)
    names = []
    for rel in mods:
        name = Path(rel).name.split(".ko")[0]
        names.append(name)
        cpio.file(f"lib/modules/{name}.ko", (Path("/lib/modules") / version / rel).read_bytes())
    cpio.file("etc/modules.order", ("\n".join(names) + "\n").encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def build_guest(kernel_version: str | None = None, cache_dir: Path | None = None) -> Guest:
    """Build (or reuse from cache) the guest for a kernel version; returns its paths."""
    version = kernel_version or default_kernel_version()
    if not BUSYBOX.is_file():
        raise SystemExit("build_guest: /bin/busybox missing: apt-get install busybox-static")
    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgevirt" / "guest"
    out = root / f"{version}-{_inputs_hash(version)}"
    guest = Guest(version, out / "vmlinuz", out / "initrd.img")
    if guest.kernel.is_file() and guest.initrd.is_file():
        return guest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        print(f"build_guest: building initramfs for {version} in {out}", file=sys.stderr)
        shutil.copyfile(f"/boot/vmlinuz-{version}", tmp / "vmlinuz")
        (tmp / "initrd.img").write_bytes(build_initrd(version))
        try:
            os.rename(tmp, out)
        except OSError:
            if not guest.initrd.is_file():  # lost a race with a concurrent build only if theirs is done
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in glob.glob(str(root / f"{version}-*")):
        if Path(stale) != out:
            shutil.rmtree(stale, ignore_errors=True)
    return guest


def main(argv: list[str] | None = None) -> int:
    """CLI: build and print the kernel and initrd paths."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--kernel-version", help="kernel version (default: newest in /boot with modules)")
    ap.add_argument("--cache-dir", type=Path, help="cache root (default ~/.cache/edgevirt/guest)")
    args = ap.parse_args(argv)
    guest = build_guest(args.kernel_version, args.cache_dir)
    print(f"kernel={guest.kernel}\ninitrd={guest.initrd}\nversion={guest.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
