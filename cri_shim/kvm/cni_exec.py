"""Run a CNI network configuration list for a VM pod, as libcni does for containerd.

The kvm handler needs exactly what a container runtime does with a ``.conflist``: ADD runs the
plugins in order, each getting the previous one's result as ``prevResult``; DEL runs them in reverse
with the cached ADD result; CHECK runs them in order. Capabilities (``runtimeConfig``) are passed
only to plugins that declare them, as the CNI spec's conventions say. Plugins are found on
``CNI_PATH`` (the configured bin dirs) and executed with the spec's environment; an error result
(JSON with ``code``/``msg``) becomes :class:`CNIError` naming the plugin and its message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from ..vm.errors import VMError

IFNAME = "eth0"
DEFAULT_TIMEOUT = 60.0
_ARG_VALUE = re.compile(r"[^;=\s]*")


class CNIError(VMError):
    """A CNI plugin failed; ``code`` is the plugin's CNI error code (0 when it printed none)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Attachment:
    """Who the network is for (CNI_CONTAINERID, CNI_NETNS, CNI_ARGS and runtimeConfig)."""

    container_id: str
    netns: str
    ifname: str = IFNAME
    args: tuple[tuple[str, str], ...] = ()
    capabilities: tuple[tuple[str, Any], ...] = ()

    def cni_args(self) -> str:
        parts = ["IgnoreUnknown=1"]
        for k, v in self.args:
            if not _ARG_VALUE.fullmatch(v):
                raise CNIError(f"CNI_ARGS {k}={v!r} has ';', '=' or spaces; it cannot be passed safely")
            parts.append(f"{k}={v}")
        return ";".join(parts)


def load_conflist(path: Path) -> dict[str, Any]:
    """Parse and check a ``.conflist`` (name, cniVersion, non-empty plugins each with a type)."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise CNIError(f"cannot read the VM network's conflist {path}: {e}") from None
    except ValueError as e:
        raise CNIError(f"the VM network's conflist {path} is not JSON: {e}") from None
    conf: dict[str, Any] = raw if isinstance(raw, dict) else {}
    plugins = conf.get("plugins")
    if not isinstance(plugins, list) or not plugins or not all(isinstance(p, dict) for p in plugins):
        raise CNIError(f"{path}: 'plugins' must be a non-empty list of plugin configurations")
    for i, p in enumerate(plugins):
        if not isinstance(p.get("type"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", p["type"]):
            raise CNIError(f"{path}: plugins[{i}].type must be a plugin file name")
    if not conf.get("name") or not conf.get("cniVersion"):
        raise CNIError(f"{path}: 'name' and 'cniVersion' are required")
    return conf


class ConfList:
    """One network (a loaded ``.conflist``) and where its plugins live."""

    def __init__(self, path: Path, bin_dirs: list[Path], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.conf = load_conflist(self.path)
        self.bin_dirs = [Path(d) for d in bin_dirs]
        self.timeout = timeout

    @property
    def name(self) -> str:
        return str(self.conf["name"])

    def find(self, plugin_type: str) -> Path:
        for d in self.bin_dirs:
            p = d / plugin_type
            if p.is_file() and os.access(p, os.X_OK):
                return p
        raise CNIError(
            f"CNI plugin {plugin_type!r} not found in {', '.join(map(str, self.bin_dirs))}; "
            "install it (deploy/cni/install-plugin) or fix cni_bin_dirs"
        )

    def missing_plugins(self) -> list[str]:
        missing = []
        for p in self.conf["plugins"]:
            try:
                self.find(p["type"])
            except CNIError:
                missing.append(p["type"])
        return missing

    def _stdin(self, plugin: dict[str, Any], att: Attachment, prev: dict[str, Any] | None) -> bytes:
        conf = dict(plugin)
        conf["name"] = self.name
        conf["cniVersion"] = self.conf["cniVersion"]
        wanted = {k for k, on in (plugin.get("capabilities") or {}).items() if on}
        rc = {k: v for k, v in att.capabilities if k in wanted}
        if rc:
            conf["runtimeConfig"] = rc
        else:
            conf.pop("runtimeConfig", None)
        if prev is not None:
            conf["prevResult"] = prev
        return json.dumps(conf).encode()

    def _exec(
        self, command: str, plugin: dict[str, Any], att: Attachment, prev: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        exe = self.find(plugin["type"])
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": att.container_id,
            "CNI_NETNS": att.netns,
            "CNI_IFNAME": att.ifname,
            "CNI_ARGS": att.cni_args(),
            "CNI_PATH": os.pathsep.join(map(str, self.bin_dirs)),
        }
        try:
            r = subprocess.run(
                [str(exe)],
                input=self._stdin(plugin, att, prev),
                env=env,
                capture_output=True,
                timeout=self.timeout,
            )
        except subprocess.TimeoutExpired:
            raise CNIError(
                f"CNI {command} of plugin {plugin['type']} took over {self.timeout:.0f}s"
            ) from None
        out = r.stdout.decode(errors="replace").strip()
        if r.returncode != 0:
            try:
                err = json.loads(out)
                msg = err.get("msg", "") + (f" ({err['details']})" if err.get("details") else "")
                code = int(err.get("code", 0))
            except (ValueError, AttributeError, TypeError):
                msg, code = (out or r.stderr.decode(errors="replace").strip())[-2000:], 0
            raise CNIError(f"CNI {command} of plugin {plugin['type']} failed: {msg}", code)
        if command != "ADD":
            return None
        try:
            result = json.loads(out)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise CNIError(f"CNI ADD of plugin {plugin['type']} printed no JSON result: {out[:500]!r}")
        return result

    def add(self, att: Attachment) -> dict[str, Any]:
        """ADD every plugin in order; on a failure, DEL what was added (best effort) and raise."""
        result: dict[str, Any] | None = None
        done: list[dict[str, Any]] = []
        try:
            for plugin in self.conf["plugins"]:
                result = self._exec("ADD", plugin, att, result)
                done.append(plugin)
        except BaseException:
            for plugin in reversed(done):
                with contextlib.suppress(CNIError):
                    self._exec("DEL", plugin, att, result)
            raise
        assert result is not None
        return result

    def delete(self, att: Attachment, result: dict[str, Any] | None) -> None:
        """DEL every plugin in reverse order; every plugin runs even when one fails (the first
        error is raised at the end)."""
        first: CNIError | None = None
        for plugin in reversed(self.conf["plugins"]):
            try:
                self._exec("DEL", plugin, att, result)
            except CNIError as e:
                first = first or e
        if first is not None:
            raise first

    def check(self, att: Attachment, result: dict[str, Any]) -> None:
        for plugin in self.conf["plugins"]:
            self._exec("CHECK", plugin, att, result)


def pod_ips(result: dict[str, Any] | None) -> list[str]:
    """The pod's addresses (without prefix) from a CNI result, IPv4 first."""
    ips = []
    for ip in (result or {}).get("ips") or []:
        addr = str(ip.get("address", "")).split("/")[0]
        if addr:
            ips.append(addr)
    return sorted(ips, key=lambda a: ":" in a)
