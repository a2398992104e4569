"""edgevirt-cri's configuration file (YAML): where to listen, where to keep state, which backends
exist and which runtime handler goes to which backend. Errors name the field and the fix.

    socket: /run/edgevirt/cri.sock      # default
    socket_mode: "0660"                 # default
    state_dir: /var/lib/edgevirt/cri    # ID -> backend records (must survive a restart of the shim)
    backends:
      containerd: {type: containerd, socket: /run/containerd/containerd.sock}   # timeout: seconds
      kvm: {type: plugin, factory: "package.module:create", options: {...}}   # optional
    handlers:                           # runtime_handler -> backend; "" is the default handler
      "": containerd
      runc: containerd
      kata: containerd
      kvm: kvm
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_SOCKET = "/run/edgevirt/cri.sock"
DEFAULT_STATE_DIR = "/var/lib/edgevirt/cri"
DEFAULT_CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
BACKEND_TYPES = ("containerd", "plugin")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field and how to fix it."""


@dataclass
class BackendConfig:
    name: str
    type: str
    socket: str = ""
    timeout: float | None = None  # deadline for calls that come without one; None: no deadline
    factory: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    socket: str = DEFAULT_SOCKET
    socket_mode: int = 0o660
    state_dir: str = DEFAULT_STATE_DIR
    fsync: bool = False
    workers: int = 32
    backends: dict[str, BackendConfig] = field(default_factory=dict)
    handlers: dict[str, str] = field(default_factory=dict)
    source: str = "(built-in defaults)"


def default() -> Config:
    """Without a file: containerd at its default socket serves "", runc and kata."""
    return Config(
        backends={"containerd": BackendConfig("containerd", "containerd", DEFAULT_CONTAINERD_SOCKET)},
        handlers={"": "containerd", "runc": "containerd", "kata": "containerd"},
    )


def _mode(value: Any, where: str) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except ValueError:
        raise ConfigError(
            f'{where}: {value!r} is not an octal file mode; write it quoted, e.g. "0660"'
        ) from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f'{where}: {value!r} is out of range; use e.g. "0660"')
    return mode


def parse(data: Any, source: str = "(inline)") -> Config:
    """Validate a parsed YAML document into a Config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping with keys socket, state_dir, backends, handlers"
        )
    known = {"socket", "socket_mode", "state_dir", "fsync", "workers", "backends", "handlers"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    cfg = default() if "backends" not in data and "handlers" not in data else Config()
    cfg.source = source
    cfg.socket = str(data.get("socket", cfg.socket))
    if "socket_mode" in data:
        cfg.socket_mode = _mode(data["socket_mode"], f"{source}: socket_mode")
    cfg.state_dir = str(data.get("state_dir", cfg.state_dir))
    cfg.fsync = bool(data.get("fsync", cfg.fsync))
    workers = data.get("workers", cfg.workers)
    if not isinstance(workers, int) or workers < 4:
        raise ConfigError(f"{source}: workers: {workers!r} must be an integer >= 4")
    cfg.workers = workers
    if "backends" in data:
        cfg.backends = _backends(data["backends"], source)
    if "handlers" in data:
        cfg.handlers = _handlers(data["handlers"], source)
    for h, name in cfg.handlers.items():
        if name not in cfg.backends:
            raise ConfigError(
                f"{source}: handlers.{h or '(default)'}: backend {name!r} is not defined; define it under "
                f"backends (defined: {sorted(cfg.backends)})"
            )
    if "" not in cfg.handlers:
        raise ConfigError(f'{source}: handlers: the default handler "" is missing; add e.g. "": containerd')
    return cfg


def _backends(backends: Any, source: str) -> dict[str, BackendConfig]:
    if not isinstance(backends, dict) or not backends:
        raise ConfigError(f"{source}: backends must be a non-empty mapping name -> {{type: containerd, ...}}")
    out: dict[str, BackendConfig] = {}
    for name, spec in backends.items():
        b = _backend(str(name), spec, f"{source}: backends.{name}")
        out[b.name] = b
    return out


def _backend(name: str, spec: Any, where: str) -> BackendConfig:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping with a type ({' or '.join(BACKEND_TYPES)})")
    kind = spec.get("type")
    if kind not in BACKEND_TYPES:
        raise ConfigError(f"{where}.type: {kind!r} is not a backend type; use one of {list(BACKEND_TYPES)}")
    b = BackendConfig(name=name, type=kind)
    if kind == "containerd":
        b.socket = str(spec.get("socket", DEFAULT_CONTAINERD_SOCKET))
        try:
            raw = spec.get("timeout")
            b.timeout = None if raw is None else float(raw)
            if b.timeout is not None and b.timeout <= 0:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where}.timeout: {spec.get('timeout')!r} must be a positive number of seconds"
            ) from None
    else:
        b.factory = str(spec.get("factory", ""))
        if ":" not in b.factory:
            raise ConfigError(f'{where}.factory: {b.factory!r} must be "package.module:callable"')
        b.options = dict(spec.get("options") or {})
    return b


def _handlers(handlers: Any, source: str) -> dict[str, str]:
    if not isinstance(handlers, dict) or not handlers:
        raise ConfigError(
            f'{source}: handlers must be a non-empty mapping, e.g. {{"": containerd, runc: containerd}}'
        )
    return {("" if h is None else str(h)): str(n) for h, n in handlers.items()}


def load(path: str | Path | None) -> Config:
    """Read the YAML file at `path`; None gives the built-in defaults."""
    if path is None:
        return default()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(
            f"cannot read config file {p}: {e.strerror}; pass an existing file with --config"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return parse(data, str(p))
