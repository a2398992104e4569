"""Import a third-party package's submodules without running the package's own ``__init__``.

pyroute2's ``__init__`` imports every API it has (NDB, IPDB, conntrack, nftables, nl80211, ipset,
plan9 ...: ~80 modules and 6 MiB of each daemon process beyond what IPRoute needs), and
prometheus_client's imports its HTTP exposition and default collectors. The plugin uses neither:
it imports ``pyroute2.iproute.linux`` and ``prometheus_client.metrics`` and the like directly.
:func:`skip_init` puts such a package in ``sys.modules`` as an empty package whose submodules import
as usual. Its ``__init__`` still runs, in place, the first time something asks the package for a
name that is not a submodule (``from pyroute2 import NDB``), so code that uses the whole package
keeps working; it costs only that code the memory.
"""

from __future__ import annotations

import importlib.util
import sys
import threading

_guard = threading.Lock()


def skip_init(name: str) -> None:
    """Make ``import name.sub`` skip ``name/__init__.py`` (a no-op once ``name`` is imported, or when
    it is not an installed package: the import then fails or succeeds as it always would)."""
    with _guard:
        if name in sys.modules:
            return
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.submodule_search_locations is None:
            return
        module = importlib.util.module_from_spec(spec)
        ran = threading.Lock()

        def __getattr__(attr: str) -> object:
            if attr.startswith("__") or importlib.util.find_spec(f"{name}.{attr}") is not None:
                # a dunder, or a submodule the import system is about to load: not ours to run
                raise AttributeError(f"module {name!r} has no attribute {attr!r}")
            with ran:
                if module.__dict__.pop("__getattr__", None) is not None:
                    assert spec.loader is not None
                    spec.loader.exec_module(module)  # the whole package, as a plain import would
            return getattr(module, attr)

        module.__dict__["__getattr__"] = __getattr__
        sys.modules[name] = module
