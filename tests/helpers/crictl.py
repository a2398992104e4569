"""The one crictl runner of the tests, benchmarks and critest: one CRI endpoint (runtime and image
service, or a separate image endpoint), no config file, a bound on every call, JSON output parsed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from helpers import REPO

#: the checkout's pinned crictl (deploy/install); tests that use another build pass ``binary``
CRICTL = str(REPO / ".local" / "bin" / "crictl")


@dataclass(frozen=True)
class Crictl:
    """crictl against ``endpoint`` (``unix://...``); ``--config /dev/null``, so no setting of the
    machine's /etc/crictl.yaml applies. ``request_timeout`` is crictl's own ``--timeout`` (per
    connection and request), ``timeout`` bounds the whole crictl process."""

    endpoint: str
    image_endpoint: str = ""  # default: endpoint
    binary: str = CRICTL
    request_timeout: str = "60s"
    timeout: float = 120
    env: Mapping[str, str] | None = None

    def __call__(
        self, *args: str, check: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``crictl <args>``; with ``check`` a non-zero exit fails naming the command and its output."""
        ie = self.image_endpoint or self.endpoint
        argv = [
            self.binary,
            "--config",
            "/dev/null",
            "-r",
            self.endpoint,
            "-i",
            ie,
            "-t",
            self.request_timeout,
        ]
        res = subprocess.run(
            [*argv, *args],
            capture_output=True,
            text=True,
            timeout=self.timeout if timeout is None else timeout,
            env=self.env,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"crictl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    def json(self, *args: str, timeout: float | None = None) -> Any:
        """The parsed output of ``crictl <args>`` (pass ``-o json`` where the command needs it)."""
        return json.loads(self(*args, timeout=timeout).stdout)

    def with_image_endpoint(self, image_endpoint: str) -> Crictl:
        return replace(self, image_endpoint=image_endpoint)
