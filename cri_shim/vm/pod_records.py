"""The kvm handler's on-disk records of its pod sandboxes and containers.

One JSON file per sandbox (``<dir>/sandboxes/<id>.json``) and per container
(``<dir>/containers/<id>.json``), written to a temporary file and renamed into place, so a kill -9
of the shim leaves the old or the new record and never half of one. The records hold what CRI
reports back (metadata, labels, annotations, timestamps, log paths) and what teardown needs (netns,
CNI result, domain name), so a restarted shim answers with the same IDs and states as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

ID_RE = re.compile(r"^[0-9a-f]{64}$")


class Records:
    """A directory of JSON records of one kind (``sandboxes`` or ``containers``)."""

    def __init__(self, root: Path, kind: str) -> None:
        self.dir = Path(root) / kind
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._cache: dict[str, dict[str, Any]] = {}
        for f in self.dir.iterdir():
            if f.name.startswith("."):
                f.unlink(missing_ok=True)  # a temporary file left by a kill -9
                continue
            if f.suffix == ".json" and ID_RE.match(f.stem):
                with contextlib.suppress(OSError, ValueError):
                    self._cache[f.stem] = json.loads(f.read_text())

    def _path(self, id_: str) -> Path:
        if not ID_RE.match(id_):
            raise ValueError(f"not a record id: {id_!r}")
        return self.dir / f"{id_}.json"

    def put(self, rec: dict[str, Any]) -> dict[str, Any]:
        id_ = rec["id"]
        path = self._path(id_)
        tmp = self.dir / f".{id_}.{threading.get_ident()}.tmp"
        with self._lock:
            tmp.write_text(json.dumps(rec, sort_keys=True))
            os.replace(tmp, path)
            self._cache[id_] = rec
        return rec

    def update(self, id_: str, **fields: Any) -> dict[str, Any]:
        rec = dict(self.get(id_) or {})
        if not rec:
            raise KeyError(id_)
        rec.update(fields)
        return self.put(rec)

    def get(self, id_: str) -> dict[str, Any] | None:
        return self._cache.get(id_)

    def resolve(self, id_or_prefix: str) -> dict[str, Any] | None:
        """The record whose ID is ``id_or_prefix`` or starts with it (only when unique)."""
        if not id_or_prefix:
            return None
        rec = self._cache.get(id_or_prefix)
        if rec is not None:
            return rec
        hits = [r for k, r in list(self._cache.items()) if k.startswith(id_or_prefix)]
        return hits[0] if len(hits) == 1 else None

    def delete(self, id_: str) -> None:
        with self._lock:
            self._cache.pop(id_, None)
            self._path(id_).unlink(missing_ok=True)

    def all(self) -> list[dict[str, Any]]:
        return list(self._cache.values())
