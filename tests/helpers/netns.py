"""Network namespaces for tests and benchmarks: bounded commands, links of a namespace, veth pairs,
pings, and :class:`Namespaces`, which deletes every namespace it made on close (even after a failure)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from helpers.waiting import wait_for


def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded by ``timeout`` s), capture text output."""
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def ip(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip -n <netns> ...``."""
    return sh("ip", "-n", netns, *args, check=check)


def links(netns: str) -> dict[str, dict[str, Any]]:
    """ip -d -j link of a namespace, by name."""
    out = ip(netns, "-d", "-j", "link", "show").stdout
    return {item["ifname"]: item for item in json.loads(out or "[]")}


def set_up(netns: str, *names: str) -> None:
    """Bring these links of ``netns`` up."""
    for name in names:
        ip(netns, "link", "set", name, "up")


def veth(netns: str, name: str, peer_netns: str, peer_name: str) -> None:
    """A veth pair: ``name`` in ``netns``, ``peer_name`` in ``peer_netns`` (both still down)."""
    ip(netns, "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_netns)


def ping(netns: str, address: str, count: int = 5) -> str:
    """busybox ping from ``netns`` (0.2 s apart, 2 s per reply); its output, whatever the outcome."""
    argv = ["busybox", "ping", "-c", str(count), "-i", "0.2", "-W", "2", address]
    r = sh("ip", "netns", "exec", netns, *argv, check=False)
    return r.stdout + r.stderr


def lossless(ping_output: str) -> bool:
    return " 0% packet loss" in ping_output


def wait_lossless_ping(netns: str, address: str, timeout: float = 60) -> str:
    """Ping 5 times from ``netns`` until none is lost; the output. Fails with the last ping's output."""
    last = [""]

    def clean() -> bool:
        last[0] = ping(netns, address, 5)
        return lossless(last[0])

    wait_for(f"5 pings of {address} from {netns} without loss", clean, timeout, 0.5, explain=lambda: last[0])
    return last[0]


class Namespaces:
    """Named network namespaces made for one test; :meth:`close` deletes them, newest first."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def add(self, name: str) -> str:
        """Make the namespace ``name``; its path (/run/netns/<name>)."""
        sh("ip", "netns", "add", name)
        self.made.append(name)
        return f"/run/netns/{name}"

    def close(self) -> None:
        for name in reversed(self.made):
            sh("ip", "netns", "del", name, check=False)
        self.made.clear()

    def __enter__(self) -> Namespaces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
