"""Leader election on a coordination.k8s.io/v1 Lease (what client-go's leaderelection does).

A candidate takes the Lease when it is free or its holder has not renewed it within
``leaseDurationSeconds``; the leader renews every ``renew`` seconds and steps down (stops acting)
when a renewal the API server answered fails for longer than 2/3 of the lease (another holder, a
conflict). While the API server does not answer at all, the leader stays leader: nobody can take the
Lease meanwhile, and it re-checks as soon as the API server is back (edge autonomy). Updates go
through the Lease's resourceVersion, so two candidates never both win one round.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _parse(s: str | dt.datetime | None) -> dt.datetime | None:
    if s is None:
        return None
    if isinstance(s, dt.datetime):
        return s if s.tzinfo else s.replace(tzinfo=dt.UTC)
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(
        self,
        coord: client.CoordinationV1Api,
        namespace: str,
        name: str,
        identity: str,
        lease_duration: int = 15,
        renew: float = 5.0,
    ) -> None:
        self.coord = coord
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew = renew
        self.is_leader = threading.Event()
        self._last_renew: dt.datetime | None = None

    def try_acquire_or_renew(self) -> bool:
        """One round: True if we hold the Lease afterwards."""
        now = _now()
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_duration,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self.coord.create_namespaced_lease(self.namespace, body)
            except ApiException as e2:
                if e2.status == 409:
                    return False
                raise
            return True
        spec = lease.spec or client.V1LeaseSpec()
        lease.spec = spec
        holder = spec.holder_identity
        renewed = _parse(spec.renew_time)
        duration = spec.lease_duration_seconds or self.lease_duration
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder and holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.lease_duration
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as e:
            if e.status == 409:  # somebody else wrote it first
                return False
            raise
        return True

    def run(self, stop: threading.Event) -> None:
        """Keep trying; set/clear :attr:`is_leader`. Returns when ``stop`` is set (releasing the Lease)."""
        while not stop.is_set():
            unreachable = False
            try:
                ok = self.try_acquire_or_renew()
            except ApiException as e:
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                ok, unreachable = False, e.status >= 500
            except Exception as e:  # no answer at all (connection refused, timeout)
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                ok, unreachable = False, True
            now = _now()
            if unreachable and self.is_leader.is_set():
                # Edge autonomy: while the API server cannot be reached, no other candidate can take
                # the Lease through it either, and every write of ours fails anyway; so stay leader
                # until the API server answers again and says who holds the Lease.
                stop.wait(self.renew / 2)
                continue
            if ok:
                self._last_renew = now
                if not self.is_leader.is_set():
                    log.info(
                        "became leader (lease %s/%s, identity %s)", self.namespace, self.name, self.identity
                    )
                    self.is_leader.set()
            elif self.is_leader.is_set():
                last = self._last_renew
                if last is None or (now - last).total_seconds() > self.lease_duration * 2 / 3:
                    log.warning("lost the lease %s/%s: stepping down", self.namespace, self.name)
                    self.is_leader.clear()
            stop.wait(self.renew if self.is_leader.is_set() else self.renew / 2)
        if self.is_leader.is_set():
            self.release()

    def release(self) -> None:
        """Give the Lease up on a clean exit so a standby takes over at once."""
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                lease.spec.acquire_time = None
                self.coord.replace_namespaced_lease(self.name, self.namespace, lease)
        except Exception as e:
            log.warning("releasing lease: %s", e)
        self.is_leader.clear()
