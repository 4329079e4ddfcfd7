"""The pending index and the retry schedule: how a rollout's task message is never lost for good.

Every rollout waiting for a worker (``queuing``, or ``requeuing`` after an attempt) is in the
pending index ``{p}:pending``, scored by when its task message is next looked for. It enters
the index with its record (enqueue) or with the attempt that requeued it (one script each), and
the claim takes it out. The reaper (:func:`lightning_queue.worker.recovery.reap`, on every
worker's fleet-duty timer) reads only the due head of the index, so a sweep costs nothing while
no entry is due, whatever the number of rollouts stored:

1. :meth:`PendingIndex.lease`: one script takes at most ``limit`` due entries, drops those whose
   rollout no longer waits (claimed, finished, expired), and leases the others (like the
   heartbeat sweep, so concurrent reapers take distinct entries);
2. :meth:`PendingIndex.find_messages`: the messages are looked for where they can be: the
   rollout's queue (every priority list, from the tail, where the oldest wait), the unacked
   messages workers hold (kombu's unacked hash), and the retry schedule. Read by a script in
   slices of :data:`SCAN_CHUNK` elements (Redis never blocks long), once per sweep for all the
   due entries of a queue, until all are found: the cost is O(due entries + the messages older
   than the newest of them + unacked messages), zero when nothing is due; a message truly
   missing costs a read of its whole queue, twice;
3. :meth:`PendingIndex.settle`: one script records the outcome and re-arms each entry: a message
   found is looked for again later, less and less often (a long backlog is not rescanned every
   sweep); one missing is looked for again half a grace later, and re-sent when still missing
   (a message between a worker's BRPOP and its unacked write is missing once, never twice).

Re-sending is idempotent: the claim lets only one delivery of a rollout run.

The retry schedule ``{p}:delayed`` holds requeued rollouts while their backoff runs
(:meth:`PendingIndex.schedule_retries`); the workers' fleet duties send them when due
(:meth:`PendingIndex.take_due_retries`). No retry waits in an ETA message held by a worker,
where a Redis restart or a worker's death would strand it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import redis

from lightning_queue.core.keys import Keys
from lightning_queue.storage.connections import text
from lightning_queue.storage.scripts import load_script

SCAN_CHUNK = 2000
"""Elements one script call reads while looking for messages (a few milliseconds of Redis)."""

Found = Literal["present", "missing", "resent"]


@dataclass(frozen=True)
class PendingEntry:
    """A due entry of the pending index, as :meth:`PendingIndex.lease` took it."""

    rollout_id: str
    status: str
    queue: str
    enqueue_time: float
    missing_since: float | None
    """When the reaper last found its message missing (None: found at the last look, or never looked)."""
    resends: int
    """How many times the reaper sent its message again."""
    retry_due: float | None
    """When its retry is due, if it waits in the retry schedule (its message is sent then)."""


class PendingIndex:
    """The pending index and the retry schedule of one key prefix (see the module docstring).
    ``grace``: seconds after a message is sent before it is first looked for."""

    def __init__(self, client: redis.Redis, keys: Keys, grace: float = 30.0) -> None:
        self.redis = client
        self.keys = keys
        self.grace = grace
        self._lease = load_script(client, "lease_pending")
        self._find = load_script(client, "find_messages")
        self._settle = load_script(client, "settle_pending")
        self._schedule = load_script(client, "schedule_retries")
        self._take = load_script(client, "take_due_retries")

    # -- the retry schedule ------------------------------------------------------------

    def schedule_retries(self, due: Mapping[str, float]) -> list[str]:
        """Schedule each requeued rollout's retry at its due time (one script); its message is
        looked for a grace after that. Returns the ids scheduled (those still waiting)."""
        if not due:
            return []
        k = self.keys
        args: list[str] = [k.rollout_prefix, repr(self.grace)]
        for rollout_id, when in due.items():
            args += [rollout_id, repr(when)]
        return [text(r) for r in self._schedule(keys=[k.delayed, k.pending], args=args)]

    def take_due_retries(self, now: float | None = None, limit: int = 500) -> list[str]:
        """Take out of the schedule (atomically: concurrent callers get distinct ids) the retries
        due by ``now``, at most ``limit``; the caller sends their messages."""
        now = time.time() if now is None else now
        return [text(r) for r in self._take(keys=[self.keys.delayed], args=[repr(now), limit])]

    # -- the reaper's three steps --------------------------------------------------------

    def lease(self, now: float, lease_end: float, limit: int = 500) -> list[PendingEntry]:
        """Take the due entries (at most ``limit``) of rollouts still waiting for a worker, leased
        until ``lease_end``; entries of rollouts that no longer wait are dropped (one script)."""
        k = self.keys
        flat = self._lease(keys=[k.pending, k.delayed], args=[repr(now), limit, repr(lease_end), k.rollout_prefix])
        entries = []
        for i in range(0, len(flat), 7):
            rid, status, queue, enqueued, missing, resends, due = (text(v) for v in flat[i:i + 7])
            entries.append(PendingEntry(rid, status, queue, float(enqueued or 0), float(missing) if missing else None,
                                        int(resends or 0), float(due) if due else None))
        return entries

    def find_messages(self, wanted: Mapping[str, str]) -> set[str]:
        """The rollout ids, of ``wanted`` (rollout id -> its queue), whose task message is in their
        queue or held, unacked, by a worker. Each queue's lists (from the tail: the oldest messages,
        those of the entries due, first) and the unacked hash are read once, :data:`SCAN_CHUNK`
        elements per script call, until every id is found or all was read. A message that moves
        meanwhile (taken by a worker, or shifted by the taking of others past the part being read)
        can be missed: the caller looks twice before it calls a message missing."""
        found: set[str] = set()
        by_queue: dict[str, set[str]] = {}
        for rollout_id, queue in wanted.items():
            by_queue.setdefault(queue, set()).add(rollout_id)
        for queue, ids in by_queue.items():
            for key in self.keys.celery_queues(queue).values():
                found |= self._scan(key, "list", "0", ids - found)
        rest = set(wanted) - found
        if rest:
            found |= self._scan(self.keys.celery_unacked, "hash", "0", rest)
        return found

    def _scan(self, key: str, kind: str, start: str, ids: Iterable[str]) -> set[str]:
        looking = set(ids)
        found: set[str] = set()
        cursor = start
        while looking:
            reply = self._find(keys=[key], args=[kind, cursor, SCAN_CHUNK, *sorted(looking)])
            hits = {text(r) for r in reply[1:]}
            found |= hits
            looking -= hits
            cursor = text(reply[0])
            if not cursor:
                break
        return found

    def settle(self, lease_end: float, outcomes: Sequence[tuple[str, float, Found]], now: float | None = None) -> int:
        """Record what was found for each leased entry and re-arm it for its next look
        (``(rollout_id, next look, found)``), in one script; entries a claim or a requeue changed
        meanwhile are left as they are. Returns how many were re-armed."""
        if not outcomes:
            return 0
        k = self.keys
        args: list[str] = [repr(lease_end), k.rollout_prefix, repr(time.time() if now is None else now)]
        for rollout_id, check, found in outcomes:
            args += [rollout_id, repr(check), found]
        return int(self._settle(keys=[k.pending], args=args))

    # -- reading ----------------------------------------------------------------------

    def counts(self, now: float | None = None) -> dict[str, int]:
        """Entries in the pending index (``pending``; ``due``: to be looked at now) and retries
        waiting their backoff (``delayed``)."""
        now = time.time() if now is None else now
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcard(k.pending)
        pipe.zcount(k.pending, "-inf", now)
        pipe.zcard(k.delayed)
        pending, due, delayed = pipe.execute()
        return {"pending": int(pending), "due": int(due), "delayed": int(delayed)}
