"""What the node's edgevirt-cri serves (CRI ``Status``: its ``runtime_handlers``), asked from a
short-lived child interpreter so that the labeller never loads grpc itself.

The labeller sleeps ``--interval`` (600 s) between passes; grpc, protobuf and the CRI stubs would
stay in it for good (~10 MiB of its ~58, bench/RESULTS.md "Node memory") for one call per pass. The
child costs one interpreter start per pass (a fraction of a second; the pass also boots the probe's
guest when its cache is stale) and is gone afterwards. ``python3 -m cri_shim.node.cri_status SOCKET
TIMEOUT`` prints one JSON object: ``{"handlers": [...]}`` when edgevirt-cri answered, ``{"error":
"..."}`` when it did not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from runtimeclass.labels import Cri, CriView

STATUS_METHOD = "/runtime.v1.RuntimeService/Status"
#: seconds the child may take beyond the call's own timeout (interpreter start, imports)
CHILD_GRACE_S = 30.0


def ask(socket: Path, timeout: float) -> dict[str, object]:
    """In the child: CRI Status on ``socket``; ``{"handlers": [...]}`` or ``{"error": why}``."""
    import grpc

    from .. import protos

    api = protos.api()
    with grpc.insecure_channel(f"unix://{socket}") as channel:
        status = channel.unary_unary(
            STATUS_METHOD,
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=api.StatusResponse.FromString,
        )
        try:
            resp = status(api.StatusRequest(verbose=False), timeout=timeout)
        except grpc.RpcError as e:
            return {"error": str(e)}
    return {"handlers": sorted(h.name for h in resp.runtime_handlers)}


def query(socket: Path, timeout: float) -> tuple[CriView, str]:
    """(what edgevirt-cri on ``socket`` serves, why it is SILENT if so) through the child."""
    if not socket.exists():
        return CriView(Cri.ABSENT), ""
    # the child imports this very package: from where this process found it when that is not on the
    # interpreter's own path (a checkout run by pytest, say); an installed one needs nothing
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    if package_root not in _own_path():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "cri_shim.node.cri_status", str(socket), str(timeout)]
    try:
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout + CHILD_GRACE_S,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return CriView(Cri.SILENT), f"no answer within {timeout + CHILD_GRACE_S:g}s"
    try:
        answer = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return CriView(Cri.SILENT), f"the CRI status child failed (exit {r.returncode}): {r.stderr[-500:]}"
    if "handlers" in answer:
        return CriView(Cri.ANSWERED, frozenset(answer["handlers"])), ""
    return CriView(Cri.SILENT), str(answer.get("error"))


def _own_path() -> set[str]:
    """The directories a fresh ``python3`` searches by itself (site-packages included)."""
    import site
    import sysconfig

    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    paths.update(site.getsitepackages())
    return {str(Path(p).resolve()) for p in paths}


def main(argv: list[str]) -> int:
    print(json.dumps(ask(Path(argv[0]), float(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
