"""The plugin's single entry: one call (environment + stdin) in, (stdout, exit code, stderr) out.

``run()`` is used both by the resident daemon and by the standalone executable, so both give
byte-identical answers. It validates the environment and the config, takes the attachment's lock and
hands the verb to its module (add, release, check); pyroute2 is imported only when a verb needs
netlink. A bug still answers the spec's error JSON (999); its traceback goes to stderr only.
"""

from __future__ import annotations

import importlib
import json
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from . import config, locks, versions
from .environment import Invocation, from_environ
from .errors import INCOMPATIBLE_VERSION, INTERNAL_ERROR, CNIError


def run(environ: Mapping[str, str], stdin: bytes) -> tuple[bytes, int, str]:
    """Execute one plugin call: (stdout bytes, exit code, text for stderr). Never raises."""
    version: str | None = None
    try:
        inv = from_environ(environ, stdin)
        if inv.command == "VERSION":
            return (json.dumps(versions.version_info()) + "\n").encode(), 0, ""
        doc = config.decode(stdin)
        version = config.config_version(doc)
        conf = config.parse(inv, doc)
        out = _dispatch(inv, conf)
        return (json.dumps(out, indent=4) + "\n").encode() if out is not None else b"", 0, ""
    except CNIError as exc:
        return exc.to_json(version), 1, f"macvtap: {exc.msg}\n"
    except Exception as exc:  # a bug must still produce the spec's error JSON, never a traceback on stdout
        tb = traceback.format_exc()
        err = CNIError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        return err.to_json(version), 1, tb


# verb -> (module, function, lowest cniVersion that has it, runs under the attachment's lock)
_VERBS: dict[str, tuple[str, str, str, bool]] = {
    "ADD": ("add", "cmd_add", "0.3.0", True),
    "DEL": ("release", "cmd_del", "0.3.0", True),
    "CHECK": ("check", "cmd_check", "0.4.0", True),
    "STATUS": ("check", "cmd_status", "1.1.0", False),
    "GC": ("release", "cmd_gc", "1.1.0", False),
}
Verb = Callable[[Invocation, config.NetConf], "dict[str, Any] | None"]


def _dispatch(inv: Invocation, conf: config.NetConf) -> dict[str, Any] | None:
    module, function, minimum, locked = _VERBS[inv.command]
    if not versions.at_least(conf.cni_version, minimum):
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"config version {conf.cni_version} does not allow {inv.command}: "
            f"it needs cniVersion {minimum} or later",
        )
    verb: Verb = getattr(importlib.import_module(f".{module}", __package__), function)
    if not locked:
        return verb(inv, conf)
    key = (conf.name, inv.container_id, inv.ifname)
    with locks.attachment_lock(conf.state_dir, key, create=inv.command == "ADD"):
        return verb(inv, conf)
