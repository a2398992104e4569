"""Which backend owns each pod sandbox and container, kept on disk so it survives a restart.

One small file per ID under `<state_dir>/sandboxes/` and `<state_dir>/containers/`, holding the
backend's name (and a container's sandbox). Each is written to a temporary file and renamed into
place, so a kill -9 at any moment leaves either the old or the new record, never half of one.
IDs are not rewritten: kubelet sees exactly the IDs the backend made."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,254}")


class IdIndex:
    """ID -> backend name for sandboxes and containers, persisted under `state_dir`."""

    def __init__(self, state_dir: Path, fsync: bool = False) -> None:
        self.dir = Path(state_dir)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.sandboxes: dict[str, str] = {}
        self.containers: dict[str, tuple[str, str]] = {}
        for kind in ("sandboxes", "containers"):
            (self.dir / kind).mkdir(parents=True, exist_ok=True)
        self._load()

    def _load(self) -> None:
        for f in (self.dir / "sandboxes").iterdir():
            if f.name.startswith("."):
                f.unlink(missing_ok=True)  # a temporary file left by a kill -9
                continue
            self.sandboxes[f.name] = f.read_text().strip()
        for f in (self.dir / "containers").iterdir():
            if f.name.startswith("."):
                f.unlink(missing_ok=True)
                continue
            backend, _, sandbox = f.read_text().strip().partition("\n")
            self.containers[f.name] = (backend, sandbox)

    def _write(self, kind: str, id_: str, text: str) -> None:
        if not _SAFE_ID.fullmatch(id_):
            raise ValueError(f"refusing to record {kind} ID {id_!r}: not a plain identifier")
        final = self.dir / kind / id_
        tmp = self.dir / kind / f".{id_}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)

    # --- sandboxes ---
    def sandbox_backend(self, sandbox_id: str) -> str | None:
        return self.sandboxes.get(sandbox_id)

    def add_sandbox(self, sandbox_id: str, backend: str) -> None:
        with self._lock:
            if self.sandboxes.get(sandbox_id) == backend:
                return
            self._write("sandboxes", sandbox_id, backend)
            self.sandboxes[sandbox_id] = backend

    def remove_sandbox(self, sandbox_id: str) -> None:
        """Forget a removed sandbox and every container recorded in it."""
        with self._lock:
            if self.sandboxes.pop(sandbox_id, None) is not None:
                (self.dir / "sandboxes" / sandbox_id).unlink(missing_ok=True)
            for cid in [c for c, (_, sb) in self.containers.items() if sb == sandbox_id]:
                self.containers.pop(cid, None)
                (self.dir / "containers" / cid).unlink(missing_ok=True)

    # --- containers ---
    def container_backend(self, container_id: str) -> str | None:
        rec = self.containers.get(container_id)
        return rec[0] if rec else None

    def add_container(self, container_id: str, backend: str, sandbox_id: str = "") -> None:
        with self._lock:
            if self.containers.get(container_id) == (backend, sandbox_id):
                return
            self._write("containers", container_id, f"{backend}\n{sandbox_id}")
            self.containers[container_id] = (backend, sandbox_id)

    def remove_container(self, container_id: str) -> None:
        with self._lock:
            if self.containers.pop(container_id, None) is not None:
                (self.dir / "containers" / container_id).unlink(missing_ok=True)
