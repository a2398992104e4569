"""Builds the configured backends. A `plugin` backend (the kvm VM handler, cri_shim.kvm) is created
by its factory `package.module:callable(name, options) -> Backend`; it is registered only when its
factory imports and it reports itself available on this node, otherwise its handlers stay
unregistered and the reason is logged and shown to clients that ask for them."""

from __future__ import annotations

import importlib
import logging

from ..config import BackendConfig, Config
from .base import Backend
from .containerd import ContainerdBackend

log = logging.getLogger("edgevirt-cri.backends")


def create(cfg: BackendConfig) -> Backend:
    """One backend from its config; raises ImportError/AttributeError/ValueError for a bad plugin."""
    if cfg.type == "containerd":
        return ContainerdBackend(cfg.name, cfg.socket, cfg.timeout)
    module, _, attr = cfg.factory.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    backend = factory(cfg.name, dict(cfg.options))
    if not isinstance(backend, Backend):
        raise ValueError(
            f"{cfg.factory} returned {type(backend).__name__}, not a cri_shim.backends.base.Backend"
        )
    return backend


def build(config: Config) -> tuple[dict[str, Backend], dict[str, str], dict[str, str]]:
    """(backends by name, handler -> backend name, handler -> why it is not registered)."""
    backends: dict[str, Backend] = {}
    down: dict[str, str] = {}
    for name, bcfg in config.backends.items():
        if name not in config.handlers.values():
            log.warning("backend %s serves no handler; not started", name)
            continue
        backend: Backend | None
        try:
            backend = create(bcfg)
            reason = backend.unavailable_reason()
        except Exception as e:  # a plugin that cannot load must not take the node's runc pods down
            reason = f"backend {name} could not be loaded ({bcfg.factory or bcfg.type}): {e}"
            backend = None
        if reason is not None:
            log.warning("backend %s is not available on this node: %s", name, reason)
            down[name] = reason
            if backend is not None:
                backend.close()
            continue
        if backend is not None:
            backends[name] = backend
    handlers: dict[str, str] = {}
    unavailable: dict[str, str] = {}
    for handler, name in config.handlers.items():
        if name in backends:
            handlers[handler] = name
        else:
            unavailable[handler] = (
                f"handler {handler!r} is configured, but {down.get(name, name + ' is down')}"
            )
    if "" not in handlers:
        raise RuntimeError(f'the default handler "" cannot be served: {unavailable.get("")}')
    return backends, handlers, unavailable
