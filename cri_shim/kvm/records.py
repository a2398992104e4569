"""The kvm handler's on-disk records of its pod sandboxes and containers.

One JSON file per sandbox (``<dir>/sandboxes/<id>.json``) and per container
(``<dir>/containers/<id>.json``), written to a temporary file and renamed into place, so a kill -9
of the shim leaves the old or the new record and never half of one. Records hold the pods'
annotations (inline user data among them): files 0600 in folders 0700. The records hold what CRI
reports back (metadata, labels, annotations, timestamps, log paths) and what teardown needs (netns,
CNI result, domain name), so a restarted shim answers with the same IDs and states as before. A
sandbox's record also keeps the VM pod contract as parsed at ``RunPodSandbox``
(:class:`~cri_shim.kvm.contract.PodContract`): CreateContainer uses that, never the raw annotations.

In memory a record is a frozen dataclass (:class:`SandboxRecord`, :class:`ContainerRecord`); a
change is a new record put into the :class:`RecordStore`. A record of a shim from before the
parsed contract was kept gets it by parsing its annotations once when loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar

from ..vm.private import FILE_MODE, private_dir
from .contract import ContractError, PodContract, PodVM, parse_pod_contract

ID_RE = re.compile(r"[0-9a-f]{64}")

SandboxPhase = Literal["setup", "ready"]
ContainerPhase = Literal["setup", "created"]
ContainerState = Literal["CREATED", "RUNNING", "EXITED"]


@dataclasses.dataclass(frozen=True)
class PodMetadata:
    name: str
    namespace: str
    uid: str
    attempt: int = 0


@dataclasses.dataclass(frozen=True)
class SandboxRecord:
    """A pod sandbox: a network namespace with the VM network attached."""

    id: str
    metadata: PodMetadata
    netns: str  # the namespace's name (under /run/netns)
    created_at: int
    contract: PodContract = dataclasses.field(default_factory=PodContract)
    phase: SandboxPhase = "setup"  # "setup" until the network is up; such a record is undone at start
    state: Literal["READY", "NOTREADY"] = "NOTREADY"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    log_directory: str = ""
    hostname: str = ""
    mac: str | None = None  # the VM NIC's MAC, checked (or derived from the VM's UID)
    network_added: bool = False  # CNI DEL is due
    cni_result: dict[str, Any] | None = None  # the CNI ADD result (JSON), cached for DEL


@dataclasses.dataclass(frozen=True)
class ContainerMetadata:
    name: str
    attempt: int = 0


@dataclasses.dataclass(frozen=True)
class ContainerRecord:
    """A container: one libvirt domain."""

    id: str
    sandbox_id: str
    metadata: ContainerMetadata
    image: str  # the image reference the VM boots
    image_spec: str  # ContainerConfig.image.image as kubelet gave it
    domain: str
    created_at: int
    log_path: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    phase: ContainerPhase = "setup"  # "setup" until the domain is defined; undone at start
    console_source: str = ""  # the raw serial console log (virtlogd's file)
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""

    @property
    def state(self) -> ContainerState:
        """What the record says (it does not ask libvirt: an end is recorded when observed)."""
        if self.finished_at:
            return "EXITED"
        if not self.started_at:
            return "CREATED"
        return "RUNNING"

    def ended(self, at: int, exit_code: int, reason: str, message: str) -> ContainerRecord:
        return dataclasses.replace(self, finished_at=at, exit_code=exit_code, reason=reason, message=message)


# ---------------------------------------------------------------- JSON <-> records
def _contract_from_json(d: dict[str, Any]) -> PodContract:
    vm = d.get("vm")
    return PodContract(
        vm=PodVM(**{**vm, "volumes": tuple(vm.get("volumes") or ())}) if vm else None,
        image=d.get("image"),
        mac=d.get("mac"),
        user_data=d.get("user_data"),
    )


def sandbox_from_json(d: dict[str, Any]) -> SandboxRecord:
    annotations = dict(d.get("annotations") or {})
    if "contract" in d:
        contract = _contract_from_json(d["contract"])
    else:  # written by a shim that kept only the annotations: they were valid when it parsed them
        try:
            contract = parse_pod_contract(annotations)
        except ContractError:
            contract = PodContract()
    return SandboxRecord(
        id=d["id"],
        metadata=PodMetadata(**d["metadata"]),
        netns=d["netns"],
        created_at=int(d["created_at"]),
        contract=contract,
        phase=d.get("phase", "setup"),
        state=d.get("state", "NOTREADY"),
        labels=dict(d.get("labels") or {}),
        annotations=annotations,
        log_directory=d.get("log_directory", ""),
        hostname=d.get("hostname", ""),
        mac=d.get("mac"),
        network_added=bool(d.get("network_added")),
        cni_result=d.get("cni_result"),
    )


def container_from_json(d: dict[str, Any]) -> ContainerRecord:
    fields = {f.name for f in dataclasses.fields(ContainerRecord)}
    known = {k: v for k, v in d.items() if k in fields}
    return ContainerRecord(**{**known, "metadata": ContainerMetadata(**d["metadata"])})


def to_json(rec: SandboxRecord | ContainerRecord) -> dict[str, Any]:
    return dataclasses.asdict(rec)


# ---------------------------------------------------------------- the store
class _Record(Protocol):
    @property
    def id(self) -> str: ...


R = TypeVar("R", bound=_Record)


class RecordStore(Generic[R]):
    """A directory of JSON records of one kind (``sandboxes`` or ``containers``), all in memory."""

    def __init__(
        self,
        root: Path,
        kind: str,
        load: Callable[[dict[str, Any]], R],
        dump: Callable[[R], dict[str, Any]],
    ) -> None:
        self.dir = Path(root) / kind
        private_dir(Path(root))
        private_dir(self.dir)
        self._dump = dump
        self._lock = threading.Lock()
        self._cache: dict[str, R] = {}
        for f in self.dir.iterdir():
            if f.name.startswith("."):
                f.unlink(missing_ok=True)  # a temporary file left by a kill -9
                continue
            if f.suffix == ".json" and ID_RE.fullmatch(f.stem):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    self._cache[f.stem] = load(json.loads(f.read_text()))

    def _path(self, id_: str) -> Path:
        if not ID_RE.fullmatch(id_):
            raise ValueError(f"not a record id: {id_!r}")
        return self.dir / f"{id_}.json"

    def put(self, rec: R) -> R:
        """Write ``rec`` (a temporary file renamed into place) and keep it."""
        path = self._path(rec.id)
        tmp = self.dir / f".{rec.id}.{threading.get_ident()}.tmp"
        with self._lock:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._dump(rec), sort_keys=True))
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, path)
            self._cache[rec.id] = rec
        return rec

    def update(self, id_: str, change: Callable[[R], R]) -> R:
        """Put ``change(current record)``; KeyError when there is no record ``id_``."""
        rec = self.get(id_)
        if rec is None:
            raise KeyError(id_)
        return self.put(change(rec))

    def get(self, id_: str) -> R | None:
        return self._cache.get(id_)

    def resolve(self, id_or_prefix: str) -> R | None:
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

    def all(self) -> list[R]:
        return list(self._cache.values())


def sandbox_store(root: Path) -> RecordStore[SandboxRecord]:
    return RecordStore(root, "sandboxes", sandbox_from_json, to_json)


def container_store(root: Path) -> RecordStore[ContainerRecord]:
    return RecordStore(root, "containers", container_from_json, to_json)
