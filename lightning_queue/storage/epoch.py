"""The registry epoch: how a process learns that Redis lost its data.

A Redis restarted without persistence (the default of many installs), flushed, or failed over
to an empty replica comes back empty, and nothing else says so: a snapshot added again under
the same id gets version 1 again, with other content, and the sequence numbers start over.
So the registry has an identity: ``{p}:epoch`` (:attr:`Keys.epoch`), a random id written
once, atomically, by whatever writes first (a ``SET NX`` of a value the writer proposes, in
the same script or transaction as its write). Every process remembers the epoch it saw first
(:class:`RegistryEpoch`); finding the key gone or holding another id means everything written
before is gone, and the process raises or logs :class:`RegistryLostError` and drops what it
kept from before (a worker's snapshot cache).

Where it is checked:

* the client, before each snapshot write (atomically, in the write's script) and each
  enqueue, and in every read of a wait (:mod:`lightning_queue.storage.waiting`): records that
  vanished with the epoch raise :class:`RegistryLostError`, not a plain
  :class:`RolloutNotFoundError`;
* a worker's main process, every fleet-duty tick: it logs the loss once;
* a worker's snapshot cache, when its listener (re)subscribes and every stats report, and
  against the epoch each task message carries: an entry is never used for a message of
  another epoch, and an attempt starts only if the content it runs with was read in the
  epoch Redis holds at that moment (checked in the claim and start scripts).

Limits: data lost *partly* (an RDB snapshot restored, a replica promoted with some writes
missing) keeps the epoch key, and is not detected this way. Run Redis with ``appendonly yes``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis

from lightning_queue.core.errors import RegistryLostError
from lightning_queue.core.keys import Keys
from lightning_queue.core.models import new_id
from lightning_queue.storage.connections import text
from lightning_queue.storage.scripts import load_script

log = logging.getLogger(__name__)


def propose() -> str:
    """A fresh epoch id for a write to propose (kept if the registry has none yet)."""
    return new_id("ep")


@dataclass(frozen=True)
class RegistryMark:
    """The registry's state at one write: its sequence number and its epoch (task messages carry
    both, so worker caches know how fresh, and of which registry, an answer must be)."""

    seq: int
    epoch: str
    created: bool = False
    """The write created the epoch: the registry had none before it."""


class RegistryEpoch:
    """The registry epoch as one process knows it. Thread-safe.

    ``known`` is the epoch this process saw first (``None`` until it has written or looked).
    :meth:`check` compares it with Redis; :meth:`saw` is told of an epoch a write returned.
    """

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._known: str | None = None
        self._lock = threading.Lock()
        self._establish = load_script(client, "establish_epoch", "_epoch_prelude")

    @property
    def known(self) -> str | None:
        return self._known

    def expected(self) -> str:
        """What a write passes as the epoch it expects ('' when it knows none yet: it then proposes)."""
        return self._known or ""

    def establish(self) -> str:
        """The registry's epoch, created now if it has none (atomically: the first proposal wins).
        Adopts it when this process knew none."""
        current = text(self._establish(keys=[self.keys.epoch], args=[propose()]))
        with self._lock:
            if self._known is None:
                self._known = current
        return current

    def check(self) -> str:
        """The epoch, unchanged since this process first saw it (which this call establishes when
        it knew none). Raises :class:`RegistryLostError` when it is gone or another one, after
        forgetting it, so the next call establishes and adopts the new registry."""
        if self._known is None:
            return self.establish()
        raw = self.redis.get(self.keys.epoch)
        self.saw(None if raw is None else text(raw))
        return self._known

    def saw(self, current: str | None, rollout_id: str | None = None) -> None:
        """A read or a write found the epoch ``current`` (``None``: no epoch key). Raises
        :class:`RegistryLostError` (and forgets the known epoch) when it is not the known one;
        adopts it when none was known."""
        with self._lock:
            known = self._known
            if known is None:
                self._known = current
                return
            if current == known:
                return
            self._known = None
        raise RegistryLostError(known, current, rollout_id)

    def forget(self) -> None:
        """Know no epoch (the next write or check adopts the one Redis holds then)."""
        with self._lock:
            self._known = None


def lost_registry_message(known: str | None, current: str | None) -> str:
    """The one-line log message of a process that found the registry lost."""
    return str(RegistryLostError(known or "?", current))
