"""The worker-side snapshot cache: most rollouts start without asking Redis for their snapshot.

Snapshots are immutable per ``(resources_id, version)``, so a cached entry is
never wrong; what can go stale is which entry a reference means *now*: the
current version of an id, and the id a pointer (``latest``, ``prod``...)
names. A listener thread keeps those two maps up to date from the registry's
events (:attr:`Keys.snapshot_events`), each stamped with the registry
sequence number. Every task message carries the sequence at enqueue
(``registry_seq``); once the listener has applied every change up to it, the
maps are at least as fresh as the enqueuer's view and a hit needs no round
trip. Anything else is one atomic :meth:`SnapshotRegistry.fetch`.

Sequence numbers only order changes within one registry: Redis that lost its data starts
again from 0, and may then hold other content under a ``(resources_id, version)`` the cache
holds. So every entry and map belongs to one registry epoch
(:mod:`lightning_queue.storage.epoch`), the epoch of the reads that filled them; the cache
answers a message from memory only when the message is of that epoch, and drops everything
when it learns of another one: from a read, from its listener (which reads the epoch on every
(re)subscription and every stats report), or from :meth:`SnapshotCache.drop`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, NamedTuple

import redis

from lightning_queue.core.errors import ResourcesNotFoundError, SnapshotCorruptedError
from lightning_queue.core.models import ResourcesUpdate
from lightning_queue.core.settings import Settings
from lightning_queue.storage.connections import text
from lightning_queue.storage.epoch import lost_registry_message
from lightning_queue.storage.registry import LATEST, Fetched, SnapshotRegistry

log = logging.getLogger(__name__)

# What the maps know about a key: (value, seq of the change or read it came from).
# A value of None records that the pointer is unset / the id is deleted as of that seq.
_Stamped = tuple[Any, int]


class Held(NamedTuple):
    """A snapshot and the registry epoch it was read in (an attempt may start with it only while
    the registry is of that epoch: :meth:`RolloutStore.start_attempt`)."""

    snapshot: ResourcesUpdate
    epoch: str


class SnapshotCache:
    """An LRU of snapshots, bounded in bytes, for one worker process. Thread-safe.

    Contract:

    * :meth:`get` answers from memory only when the answer is as fresh as
      ``min_seq`` (every registry change up to it has been applied) or when it
      asks for an explicit cached ``(id, version)``; otherwise it makes exactly
      one :meth:`SnapshotRegistry.fetch` and its errors propagate unchanged.
    * The listener reconnects by itself; each (re)subscription forgets the
      version and pointer maps (changes may have been missed) and restarts from
      the sequence number read after subscribing. Entries are kept, unless the
      registry's epoch changed (Redis lost its data): then everything goes.
    * Everything it holds is of one registry epoch; a ``get`` naming another
      epoch (the one its task message was enqueued in) is not answered from memory.
    * Returned snapshots are shared between callers: treat them as read-only
      (the models are frozen; do not mutate their ``resources`` dict).
    """

    def __init__(
        self,
        registry: SnapshotRegistry,
        max_bytes: int,
        *,
        poll_seconds: float = 0.2,
        stats_key: str | None = None,
        stats_interval: float = 10.0,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1 (a cache of 0 bytes is no cache: run without one)")
        self.registry = registry
        self.max_bytes = max_bytes
        self.poll_seconds = poll_seconds
        # The listener publishes stats() under stats_key every stats_interval seconds (expiring
        # after a few missed reports), so a fleet's hit ratio can be read live.
        self.stats_key = stats_key
        self.stats_interval = stats_interval
        self._next_report = 0.0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, int], tuple[ResourcesUpdate, int]] = OrderedDict()
        self._bytes = 0
        self._versions: dict[str, _Stamped] = {}  # resources_id -> (current version | None if deleted, seq)
        self._pointers: dict[str, _Stamped] = {}  # pointer name -> (resources_id | None if unset, seq)
        self._applied_seq = -1  # every change up to this seq is in the maps; -1: not subscribed yet
        self._base_seq = -1  # seq read at the last (re)subscription; older reads cannot update the maps
        self._epoch: str | None = None  # the registry epoch of every entry and map; None: nothing read yet
        self._epoch_changes = 0
        self._hits = self._misses = self._evictions = self._loads = self._resubscribes = 0
        self._load_seconds = 0.0
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, wait_seconds: float = 5.0) -> bool:
        """Start the listener; return whether it subscribed within ``wait_seconds``
        (until it has, every unpinned :meth:`get` fetches)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._listen, name="lq-snapshot-cache", daemon=True)
            self._thread.start()
        return self._subscribed.wait(wait_seconds)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the listener for good. Gets still work: hits up to the last applied
        sequence (still correct for messages that old), fetches beyond it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> SnapshotCache:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reads --------------------------------------------------------------------------

    def get(self, ref: str, version: int | None = None, min_seq: int = 0, epoch: str | None = None
            ) -> ResourcesUpdate:
        """The snapshot ``ref`` (pointer name or id) names, at ``version`` (None: the
        current one), as of registry sequence ``min_seq`` or later, in registry ``epoch``
        (None: whichever the cache holds)."""
        return self.take(ref, version, min_seq, epoch).snapshot

    def take(self, ref: str, version: int | None = None, min_seq: int = 0, epoch: str | None = None) -> Held:
        """:meth:`get`, with the epoch the snapshot was read in."""
        with self._lock:
            snapshot = self._lookup(ref, version, min_seq, epoch)
            if snapshot is not None:
                self._hits += 1
                return Held(snapshot, self._epoch or "")
            self._misses += 1
        fetched = self._load(ref, version)
        return Held(fetched.snapshot, fetched.epoch)

    def peek(self, ref: str, version: int | None = None, min_seq: int = 0, epoch: str | None = None
             ) -> Held | None:
        """What :meth:`take` would answer from memory, or None where it would fetch; never
        touches Redis. A hit counts as one; a None counts nothing (the caller's :meth:`get`
        that follows counts the miss)."""
        with self._lock:
            snapshot = self._lookup(ref, version, min_seq, epoch)
            if snapshot is None:
                return None
            self._hits += 1
            return Held(snapshot, self._epoch or "")

    def drop(self, epoch: str | None = None) -> None:
        """Forget everything: entries, versions and pointers (an attempt found the registry is no
        longer of the epoch they were read in). Later reads fill it again, in the epoch they
        find; ``epoch`` (the one Redis holds, when known) is logged."""
        with self._lock:
            self._switch_epoch(epoch, self._applied_seq)

    def prewarm(self) -> int:
        """Fetch ``latest`` and every pointer's snapshot; return how many were loaded.
        A pointer that vanished meanwhile (or an empty registry) is skipped."""
        loaded = 0
        for ref in dict.fromkeys([LATEST, *sorted(self.registry.pointers())]):
            try:
                self._load(ref, None)
                loaded += 1
            except ResourcesNotFoundError:
                continue
            except SnapshotCorruptedError as exc:
                log.warning("snapshot cache: not pre-warming %r: %s", ref, exc)
        return loaded

    def stats(self) -> dict[str, Any]:
        with self._lock:
            gets = self._hits + self._misses
            return {
                "hits": self._hits,
                "misses": self._misses,
                "hit_ratio": self._hits / gets if gets else 0.0,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "evictions": self._evictions,
                "load_seconds_total": self._load_seconds,
                "load_count": self._loads,
                "mean_load_ms": 1000 * self._load_seconds / self._loads if self._loads else 0.0,
                "applied_seq": self._applied_seq,
                "resubscribes": self._resubscribes,
                "epoch": self._epoch,
                "epoch_changes": self._epoch_changes,
            }

    # -- internals (callers hold the lock where noted) -------------------------------------

    def _lookup(self, ref: str, version: int | None, min_seq: int, epoch: str | None) -> ResourcesUpdate | None:
        """A hit, or None. Lock held."""
        if epoch is not None and epoch != self._epoch:
            return None  # a message of another registry: what is held may be another content
        pointed = self._pointers.get(ref)
        if version is not None and pointed is None:
            # An explicit (id, version) never changes: fresh whatever the sequence, unless deleted.
            known = self._versions.get(ref)
            return None if known is not None and known[0] is None else self._touch((ref, version))
        if self._applied_seq < min_seq:
            return None
        rid = pointed[0] if pointed is not None else ref
        if rid is None:
            return None  # the pointer is unset
        if version is None:
            current = self._versions.get(rid)
            if current is None or current[0] is None:
                return None
            version = current[0]
        return self._touch((rid, version))

    def _touch(self, key: tuple[str, int]) -> ResourcesUpdate | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def _load(self, ref: str, version: int | None) -> Fetched:
        started = time.perf_counter()
        fetched = self.registry.fetch(ref, version)
        elapsed = time.perf_counter() - started
        snapshot, seq = fetched.snapshot, fetched.seq
        rid = snapshot.resources_id
        with self._lock:
            self._loads += 1
            self._load_seconds += elapsed
            if fetched.epoch != self._epoch:
                # Read atomically with its epoch, so it is true of that registry: what is held
                # is of another one (or nothing was held yet), and goes.
                self._switch_epoch(fetched.epoch, seq)
            if seq >= self._base_seq:  # a read from before the last resubscription may miss changes
                if fetched.pointer is not None:
                    self._stamp(self._pointers, fetched.pointer, rid, seq)
                if version is None:
                    self._stamp(self._versions, rid, snapshot.version, seq)
            deleted = self._versions.get(rid)
            if not (deleted is not None and deleted[0] is None and deleted[1] > seq):
                self._insert((rid, snapshot.version), snapshot, max(fetched.size, 1))
        return fetched

    def _insert(self, key: tuple[str, int], snapshot: ResourcesUpdate, cost: int) -> None:
        """Lock held."""
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._entries[key] = (snapshot, cost)
        self._bytes += cost
        while self._bytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self._evictions += 1

    @staticmethod
    def _stamp(stamped: dict[str, _Stamped], key: str, value: Any, seq: int) -> None:
        """Record ``value`` unless what is known came from a later change. Lock held."""
        known = stamped.get(key)
        if known is None or seq > known[1]:
            stamped[key] = (value, seq)

    # -- the listener -------------------------------------------------------------------

    def _listen(self) -> None:
        channel = self.registry.keys.snapshot_events
        delay = 0.05
        while not self._stop.is_set():
            pubsub = self.registry.redis.pubsub()
            try:
                pubsub.subscribe(channel)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=self.poll_seconds)
                    self._maybe_report()
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        # Also sent after redis-py reconnects and resubscribes by itself.
                        self._resubscribed()
                        delay = 0.05
                    elif message["type"] == "message":
                        self._apply(json.loads(message["data"]))
            except Exception as exc:  # noqa: BLE001 - a broken connection or a malformed event: start over
                log.warning("snapshot cache: event listener failed (%s: %s); resubscribing in %.2f s",
                            type(exc).__name__, exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):  # the connection may already be gone
                    pubsub.close()

    def _maybe_report(self) -> None:
        if time.monotonic() < self._next_report:
            return
        self._next_report = time.monotonic() + self.stats_interval
        try:
            self._check_epoch()
        except redis.RedisError as exc:  # the listener's own reads will fail and resubscribe too
            log.debug("snapshot cache: could not check the registry epoch: %s", exc)
        if self.stats_key is None:
            return
        try:
            self.registry.redis.set(self.stats_key, json.dumps({**self.stats(), "time": time.time()}),
                                    ex=max(1, round(3 * self.stats_interval)))
        except redis.RedisError as exc:  # stats are best effort: never disturb the listener
            log.debug("snapshot cache: could not report stats: %s", exc)

    def _resubscribed(self) -> None:
        # Read after the subscription is confirmed: every later change arrives as an event.
        seq, epoch = self._read_mark()
        with self._lock:
            if epoch != self._epoch:
                self._switch_epoch(epoch, seq)
        self._reset(seq, resubscribed=True)
        self._subscribed.set()

    def _read_mark(self) -> tuple[int, str]:
        """The registry's sequence number and epoch, read together."""
        keys = self.registry.keys
        seq, epoch = self.registry.redis.mget([keys.seq, keys.epoch])
        return int(seq or 0), "" if epoch is None else text(epoch)

    def _check_epoch(self) -> None:
        # Between (re)subscriptions too: Redis flushed without dropping connections keeps the
        # listener subscribed, and the messages of the new registry are not answered from memory
        # meanwhile (they carry its epoch), so this only bounds how long the old entries linger.
        seq, epoch = self._read_mark()
        with self._lock:
            if self._epoch is not None and epoch != self._epoch:
                self._switch_epoch(epoch, seq)
                self._versions.clear()
                self._pointers.clear()
                self._applied_seq = self._base_seq = seq

    def _switch_epoch(self, epoch: str | None, seq: int) -> None:
        """Drop every entry, version and pointer: they belong to another registry epoch. Lock held."""
        if self._epoch is None and epoch is not None:
            self._epoch = epoch  # the first read: what is held (events, at most) is of this registry
            return
        if self._epoch:  # not the first read, nor a registry from before epochs (none then)
            self._epoch_changes += 1
            log.error("snapshot cache: %s; dropping %d cached snapshot(s)",
                      lost_registry_message(self._epoch, epoch or None), len(self._entries))
        self._entries.clear()
        self._bytes = 0
        self._versions.clear()
        self._pointers.clear()
        self._epoch = epoch
        # Sequence numbers of another registry say nothing about this one's.
        self._applied_seq = self._base_seq = min(self._applied_seq, seq) if self._applied_seq >= 0 else -1

    def _reset(self, seq: int, resubscribed: bool = False) -> None:
        """Forget versions and pointers: the maps restart empty, complete as of ``seq``."""
        with self._lock:
            self._versions.clear()
            self._pointers.clear()
            self._applied_seq = self._base_seq = seq
            self._resubscribes += resubscribed

    def _apply(self, event: dict[str, Any]) -> None:
        seq = int(event["seq"])
        if self._applied_seq >= 0 and seq > self._applied_seq + 1:
            log.warning("snapshot cache: events %d..%d were missed; forgetting versions and pointers",
                        self._applied_seq + 1, seq - 1)
            self._reset(seq - 1)
        with self._lock:
            op = event["op"]
            if op == "write":
                self._stamp(self._versions, event["id"], int(event["version"]), seq)
            elif op == "delete":
                rid = event["id"]
                self._stamp(self._versions, rid, None, seq)
                for key in [key for key in self._entries if key[0] == rid]:
                    self._bytes -= self._entries.pop(key)[1]
            for name, target in (event.get("pointers") or {}).items():
                self._stamp(self._pointers, name, target or None, seq)
            self._applied_seq = max(self._applied_seq, seq)


def start_cache(registry: SnapshotRegistry, settings: Settings, process: str | None = None) -> SnapshotCache | None:
    """A started, pre-warmed cache of ``settings.cache_max_bytes`` for a worker process (None
    when that is 0). A failed pre-warm is logged, not raised: the cache then fills on use.
    With ``process`` (a name unique in the fleet, e.g. ``node@host:pid``) the cache reports
    its stats under :meth:`Keys.cache_stats`, for ``lightning-queue workers``."""
    if settings.cache_max_bytes == 0:
        return None
    cache = SnapshotCache(
        registry, settings.cache_max_bytes,
        stats_key=registry.keys.cache_stats(process) if process else None,
        stats_interval=settings.cache_stats_interval_seconds,
    )
    if not cache.start():
        log.warning("snapshot cache: not subscribed to registry events yet; fetching until it is")
    try:
        loaded = cache.prewarm()
        log.info("snapshot cache: pre-warmed %d snapshot(s)", loaded)
    except redis.RedisError as exc:
        log.warning("snapshot cache: pre-warm failed (%s); it fills on use", exc)
    return cache
