"""The algorithm-side client: store snapshots, enqueue rollouts, wait, read results."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Unpack

import redis

from lightning_queue.core import hooks
from lightning_queue.core.diff import SnapshotDiff
from lightning_queue.core.errors import (
    DuplicateRolloutIdError,
    EnqueueError,
    InvalidFilterError,
    PublishError,
    RegistryLostError,
    ResourcesNotFoundError,
)
from lightning_queue.core.models import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Attempt,
    ErrorInfo,
    ResolveMode,
    Resource,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutRequest,
)
from lightning_queue.core.queries import (
    CancelReport,
    FilterFields,
    FinishedPage,
    FinishedRollout,
    RolloutFilter,
    RolloutPage,
)
from lightning_queue.core.settings import Settings
from lightning_queue.core.traces import FINAL_REWARD, Span, Triplet, Usage, current_traceparent, to_triplets
from lightning_queue.storage.connections import connect
from lightning_queue.storage.epoch import RegistryEpoch
from lightning_queue.storage.liveness import WorkerHealth, read_cache_stats, read_worker_health
from lightning_queue.storage.registry import DeleteReport, PointerMove, Protection, SnapshotRegistry
from lightning_queue.storage.retention import RetentionReport, apply_retention
from lightning_queue.storage.store import RolloutStore
from lightning_queue.storage.traces import Traces

if TYPE_CHECKING:
    from celery import Celery

    from lightning_queue.broker.publisher import Publisher

log = logging.getLogger(__name__)

ResourcesLike = Mapping[str, Resource | Mapping[str, Any]]


class LightningClient:
    """What an algorithm uses. Safe to share between threads; one per process.

    ``settings`` defaults to :class:`Settings` read from the environment
    (``LQ_REDIS_URL``, ``LQ_KEY_PREFIX``, ``LQ_QUEUE``...).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        redis_client: redis.Redis | None = None,
        celery: Celery | None = None,
    ) -> None:
        self.settings = settings or Settings()
        if redis_client is None:
            redis_client = connect(
                self.settings.redis_url, self.settings.sentinel_master, retry_seconds=self.settings.redis_retry_seconds
            )
        self.redis = redis_client
        self.keys = self.settings.keys
        # The registry epoch as this client knows it, shared by its registry and store: Redis losing
        # its data makes the next write, enqueue or wait raise RegistryLostError.
        self.epoch = RegistryEpoch(self.redis, self.keys)
        self.registry = SnapshotRegistry(self.redis, self.keys, self.settings, epoch=self.epoch)
        self.store = RolloutStore(
            self.redis, self.keys, self.settings.rollout_ttl_seconds, self.settings.heartbeat_deadline,
            epoch=self.epoch, outage_seconds=self.settings.sweep_outage_seconds,
            message_grace=self.settings.message_grace_seconds, series_caps=self.settings.series_caps,
        )
        self.traces = Traces(self.redis, self.keys)
        self._celery = celery
        self._publisher: Publisher | None = None

    @property
    def celery(self) -> Celery:
        """The Celery app this client publishes through and sends remote control with (made on
        first use): configured like the workers', with no tasks and no signal receivers."""
        if self._celery is None:
            # Made, and Celery imported, only when this client publishes or sends a remote-control
            # command: reading snapshots and results needs neither.
            from lightning_queue.broker.app import make_celery

            self._celery = make_celery(self.settings)
        return self._celery

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            from lightning_queue.broker.publisher import Publisher

            self._publisher = Publisher(self.celery, self.settings)
        return self._publisher

    def close(self) -> None:
        self.store.close()
        self.redis.close()

    def __enter__(self) -> LightningClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resources ------------------------------------------------------------------------

    def add_resources(
        self, resources: ResourcesLike, resources_id: str | None = None, *, message: str | None = None,
        author: str | None = None, tags: Sequence[str] | None = None, parent: str | None = None,
        make_latest: bool = True,
    ) -> ResourcesUpdate:
        """Store a new snapshot (version 1) and make it the latest, atomically. ``make_latest=False``
        leaves ``latest`` where it is (a candidate that only pinned rollouts should run).

        ``message``, ``author`` (default ``user@host``, or ``LQ_ACTOR``) and ``tags`` are stored
        with the version; ``parent`` (``id``, ``pointer`` or ``id@version``) names the snapshot it
        derives from. Bad metadata raises :class:`InvalidVersionMetadataError`; a parent that is
        not stored, :class:`ResourcesNotFoundError`; either way nothing is written."""
        return self.registry.add_resources(resources, resources_id, message=message, author=author, tags=tags,
                                           parent=parent, make_latest=make_latest)

    def add_resources_batch(
        self, items: Sequence[ResourcesLike | tuple[str, ResourcesLike]], *, message: str | None = None,
        author: str | None = None, tags: Sequence[str] | None = None, make_latest: bool = True,
    ) -> list[ResourcesUpdate]:
        """Add many snapshots in one pipelined round trip (the last becomes latest, unless
        ``make_latest=False``); ``message``, ``author`` and ``tags`` are stored with each."""
        return self.registry.add_resources_batch(items, message=message, author=author, tags=tags,
                                                 make_latest=make_latest)

    def update_resources(
        self, resources_id: str, resources: ResourcesLike, expected_version: int | None = None, *,
        message: str | None = None, author: str | None = None, tags: Sequence[str] | None = None,
        parent: str | None = None,
    ) -> ResourcesUpdate:
        """Store the next version under an existing id and make it the latest, atomically.

        With ``expected_version`` this is a compare-and-set: a concurrent
        writer makes it raise :class:`VersionConflictError` (carrying the
        current version) instead of being silently overwritten. Metadata as in
        :meth:`add_resources`; the parent defaults to the version replaced.
        """
        return self.registry.update_resources(resources_id, resources, expected_version, message=message,
                                              author=author, tags=tags, parent=parent)

    def get_resources_by_id(self, resources_id: str, version: int | None = None) -> ResourcesUpdate:
        """A snapshot by id or pointer name; ``version`` reads an earlier version."""
        return self.registry.get_resources_by_id(resources_id, version)

    def delete_resources(self, resources_id: str, force: bool = False, *, actor: str | None = None) -> DeleteReport:
        """Delete a snapshot; refused while pointers or unfinished rollouts use it unless ``force``
        (and always while a protected pointer names it)."""
        return self.registry.delete_resources(resources_id, force=force, by=actor)

    def diff(self, a: str, b: str | None = None) -> SnapshotDiff:
        """What changed from ``a`` to ``b``: per resource, per field, with a unified text diff of
        each changed template (secrets compared, never shown; see :mod:`lightning_queue.core.diff`).

        ``a`` and ``b`` are ``id``, ``pointer``, ``id@version`` or ``pointer@version`` (the
        pointer's current target at that version). Without ``b``, ``a`` is compared with the version
        before it (``rs-a@3`` with ``rs-a@2``; ``rs-a`` with its previous version)."""
        return self.registry.diff(a, b)

    # -- pointers -------------------------------------------------------------------------

    def set_pointer(
        self, name: str, target: str, expected: str | None = None, *, actor: str | None = None,
        reason: str | None = None, force: bool = False,
    ) -> str:
        """Point ``name`` (``prod``, ``canary``...) at a snapshot; return the id it names.

        Recorded in the pointer's history with ``actor`` (default ``user@host``, or ``LQ_ACTOR``)
        and ``reason``. A protected pointer raises :class:`ProtectedPointerError` unless
        ``force=True`` and a ``reason`` are given (checked atomically with the move)."""
        return self.registry.set_pointer(name, target, expected=expected, by=actor, reason=reason, force=force)

    def protect_pointer(self, name: str, reason: str, *, actor: str | None = None) -> Protection:
        """Protect ``name`` (e.g. ``prod``): it then moves only with ``force=True`` and a reason,
        and the snapshot it names cannot be deleted."""
        return self.registry.protect_pointer(name, reason, by=actor)

    def unprotect_pointer(self, name: str) -> Protection | None:
        """Lift ``name``'s protection; return it (``None`` if it had none)."""
        return self.registry.unprotect_pointer(name)

    def protections(self) -> dict[str, Protection]:
        """Every protected pointer, with why, by whom and since when."""
        return self.registry.protections()

    def get_pointer(self, name: str) -> str | None:
        return self.registry.get_pointer(name)

    def pointers(self) -> dict[str, str]:
        return self.registry.pointers()

    def rollback(
        self, pointer: str = "latest", *, actor: str | None = None, reason: str | None = None, force: bool = False,
    ) -> PointerMove:
        """Move ``pointer`` back to its previous target in one atomic step (a protected pointer
        needs ``force=True`` and a ``reason``, as :meth:`set_pointer`)."""
        return self.registry.rollback(pointer, by=actor, reason=reason, force=force)

    def pointer_history(self, pointer: str = "latest", limit: int = 20) -> list[PointerMove]:
        return self.registry.pointer_history(pointer, limit)

    def get_latest_resources(self) -> ResourcesUpdate | None:
        return self.registry.get_latest_resources()

    def apply_retention(self, keep: int | None = None, dry_run: bool = False) -> RetentionReport:
        """Delete old snapshots: keep the newest ``keep`` (default ``settings.gc_keep``) and
        every one a pointer names or a queued/running rollout uses; prune index entries of
        expired rollouts. See :func:`lightning_queue.retention.apply_retention`."""
        return apply_retention(self.registry, self.store, self.settings.gc_keep if keep is None else keep, dry_run)

    def query_resources(self, offset: int = 0, limit: int = 50) -> list[ResourcesUpdate]:
        return self.registry.query_resources(offset, limit)

    def cache_stats(self) -> dict[str, dict[str, Any]]:
        """The snapshot-cache stats each live worker process last reported, by
        ``node@host:pid`` (hits, misses, hit_ratio, entries, bytes, mean_load_ms...)."""
        return read_cache_stats(self.redis, self.keys)

    def worker_health(self, stall_threshold_seconds: float | None = None) -> list[WorkerHealth]:
        """Every live worker's consumption health, as its main process last recorded it.

        A worker is ``stalled`` when messages waited in its queues at least
        ``stall_threshold_seconds`` (default ``settings.stall_threshold_seconds``)
        while it had free slots and received nothing: its process is up but it
        does not consume (e.g. after a Redis reconnect); ``reason`` says what was
        seen. A worker whose main process died or hung drops out once its record
        expires (about three sweep intervals). See :mod:`lightning_queue.storage.liveness`.
        """
        threshold = stall_threshold_seconds
        if threshold is None:
            threshold = self.settings.stall_threshold_seconds
        return read_worker_health(self.redis, self.keys, threshold)

    # -- rollouts -------------------------------------------------------------------------

    def enqueue_rollout(
        self,
        input: Any,
        *,
        resources_id: str | None = None,
        resolve: ResolveMode | None = None,
        mode: RolloutMode | None = "train",
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        queue: str | None = None,
        check_resources: bool = True,
        rollout_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Rollout:
        """Enqueue one rollout. See :meth:`enqueue_rollouts`; ``rollout_id`` or
        ``idempotency_key`` make it idempotent (see :class:`RolloutRequest`)."""
        request = RolloutRequest(
            input=input, resources_id=resources_id, resolve=resolve, mode=mode, config=config,
            metadata=metadata or {}, rollout_id=rollout_id, idempotency_key=idempotency_key,
        )
        return self.enqueue_rollouts([request], queue=queue, check_resources=check_resources)[0]

    def enqueue_rollouts(
        self,
        inputs: Iterable[Any | RolloutRequest],
        *,
        resources_id: str | None = None,
        resolve: ResolveMode | None = None,
        mode: RolloutMode | None = "train",
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        queue: str | None = None,
        check_resources: bool = True,
    ) -> list[Rollout]:
        """Enqueue a batch of rollouts, in a constant number of round trips.

        Each item is a task input, or a :class:`RolloutRequest` carrying its own
        ``resources_id``/``resolve``/mode/config/metadata; the keyword arguments
        are the defaults for plain inputs.

        ``resources_id`` is a snapshot id or a pointer name (``prod``,
        ``canary``...). ``resolve="pinned"`` (the default when one is given)
        fixes the concrete id and version now, so the rollout is reproducible;
        ``resolve="following"`` (the default when none is given, meaning
        ``latest``) resolves it when the rollout starts.

        Round trips: one to resolve the named snapshots (skipped with
        ``check_resources=False``, which also leaves pinned versions to run
        time; an unknown id raises :class:`ResourcesNotFoundError` before
        anything is written), one MULTI/EXEC for all records, and one pipeline
        for all task messages and their task-sent events (Flower's). If
        publishing fails the records are marked ``failed`` and
        :class:`EnqueueError` is raised. If Redis lost its data since this client
        last wrote or waited (the registry epoch changed), :class:`RegistryLostError`
        is raised and nothing is sent (what the MULTI/EXEC wrote is marked
        ``failed``; caller-chosen ids are refused by their script before any
        write); the next call enqueues into the new registry.

        A ``queue`` that cannot be a broker queue raises
        :class:`InvalidQueueNameError` before anything is written.

        Every rollout enters the pending index with its record: should its task message be lost
        (a crash between the two steps, a message deleted from the queue), a worker's reaper sends
        it again (:mod:`lightning_queue.storage.pending`).

        Idempotent enqueue: a request with a ``rollout_id`` (or an
        ``idempotency_key``, which names one) whose rollout already exists
        creates nothing and returns the stored rollout, so an enqueue retried
        after a network error never makes a second rollout. Such requests are
        written by one script that skips the ids already taken (instead of the
        MULTI/EXEC), and one more round trip records that their messages were
        sent. A crash between writing a record and publishing its message
        leaves a ``queuing`` record without that mark: the retried enqueue
        publishes it then. A crash after publishing but before the mark makes
        the retry publish a second message; that one is harmless, as the
        claim lets only one delivery run (it is dropped as a duplicate while
        the first runs, or as finished after).
        """
        queue = self.publisher.queue_for(queue)
        traceparent = current_traceparent()  # the caller's span becomes the parent of each attempt's
        rollouts = []
        chosen = False
        for item in inputs:
            request = item if isinstance(item, RolloutRequest) else RolloutRequest(
                input=item, resources_id=resources_id, resolve=resolve, mode=mode, config=config,
                metadata=metadata or {},
            )
            ids = {"rollout_id": request.requested_id} if request.requested_id else {}
            chosen = chosen or bool(ids)
            rollouts.append(
                Rollout(
                    **ids,
                    input=request.input,
                    mode=request.mode,
                    resources_id=request.resources_id,
                    resolve=request.resolve or ("pinned" if request.resources_id else "following"),
                    config=request.config or config or RolloutConfig(),
                    metadata=request.metadata,
                    queue=queue,
                    traceparent=traceparent,
                )
            )
        if not rollouts:
            return []
        if check_resources:
            refs = sorted({r.resources_id for r in rollouts if r.resources_id})
            resolved = self.registry.current_versions(refs) if refs else {}
            for ref in refs:
                if resolved[ref] is None:
                    if chosen and self.epoch.known is not None:
                        self.epoch.check()  # gone because Redis lost its data? Then say that
                    raise ResourcesNotFoundError(ref, hint="nothing was enqueued; add the snapshot first")
            for rollout in rollouts:
                if rollout.resolve == "pinned" and rollout.resources_id:
                    rollout.resources_id, rollout.resources_version = resolved[rollout.resources_id]  # type: ignore[misc]
        if not chosen:
            known = self.epoch.known
            mark = self.store.create_rollouts(rollouts)
            if known is not None and (mark.created or mark.epoch != known):
                self._written_into_a_new_registry(rollouts, known, mark.epoch)
            self.epoch.saw(mark.epoch)  # adopted when this client knew none
            self.publish(rollouts, mark.seq)
            hooks.on_enqueue.fire(hooks.Enqueued(rollouts))
            return rollouts
        seen: set[str] = set()
        for rollout in rollouts:
            if rollout.rollout_id in seen:
                raise DuplicateRolloutIdError(rollout.rollout_id)
            seen.add(rollout.rollout_id)
        mark, existing = self.store.create_rollouts_if_absent(rollouts)  # refuses another epoch itself
        self.epoch.saw(mark.epoch)
        unsent = [r for r in rollouts if r.rollout_id not in existing]
        # Written by an earlier call that may have crashed before publishing: send it now.
        unsent += [r for r, published in existing.values()
                   if not published and r.status == "queuing" and r.attempt_count == 0]
        if unsent:
            self.publish(unsent, mark.seq)
            self.store.mark_published([r.rollout_id for r in unsent])
            hooks.on_enqueue.fire(hooks.Enqueued(unsent))
        return [existing[r.rollout_id][0] if r.rollout_id in existing else r for r in rollouts]

    def _written_into_a_new_registry(self, rollouts: Sequence[Rollout], known: str, current: str) -> None:
        """Redis lost its data since this client last looked, and the records were just written
        into the registry that replaced it: they are marked ``failed`` (their messages are never
        sent, so nothing waits on them) and :class:`RegistryLostError` is raised; the next
        enqueue goes to the new registry."""
        lost = RegistryLostError(known, current)
        error = ErrorInfo.from_exception(lost, with_traceback=False)
        for rollout in rollouts:
            self.store.terminate(rollout.rollout_id, "failed", error)
        self.epoch.forget()
        raise lost

    def publish(self, rollouts: Sequence[Rollout], registry_seq: int = 0) -> None:
        """Send the rollouts' task messages (see :class:`~lightning_queue.broker.publisher.Publisher`),
        stamped with ``registry_seq`` and the registry epoch this client knows (the one the
        records were just written in). If the broker does not take them, the rollouts are marked
        ``failed`` (so nothing waits on them forever) and :class:`EnqueueError` is raised."""
        try:
            self.publisher.publish(rollouts, registry_seq, registry_epoch=self.epoch.known or "")
        except PublishError as exc:
            error = ErrorInfo(type=type(exc.cause).__name__,
                              message=f"the task message could not be published: {exc.cause}")
            for rollout in rollouts:
                self.store.terminate(rollout.rollout_id, "failed", error)
            raise EnqueueError(exc.rollout_ids, exc.cause) from exc.cause

    def wait_for_rollouts(
        self,
        rollout_ids: Sequence[str],
        timeout: float | None = None,
        on_finished: Callable[[Rollout], None] | None = None,
    ) -> list[Rollout]:
        """Block until every rollout has finished, or ``timeout`` seconds pass (``None``: no limit).

        Returns the finished rollouts in the order of ``rollout_ids`` (each once); on time-out,
        only those that had finished. Woken by pub/sub notifications; statuses are re-read
        whenever the subscription is (re-)established, so completions during a reconnect are
        not missed. ``on_finished`` is called once per rollout, as it is seen finished.

        Raises :class:`RolloutNotFoundError` when a rollout's record does not exist, at the
        start or later (it expired, or Redis lost its data: then it is the subclass
        :class:`RegistryLostError`, which says so). Raises
        :class:`RedisUnavailableError` when Redis is unreachable at the deadline or for longer
        than ``settings.redis_retry_seconds`` in a row; the call returns or raises within about
        half a second of its deadline even then. See :meth:`RolloutStore.wait_for_rollouts`.
        """
        return self.store.wait_for_rollouts(rollout_ids, timeout, on_finished,
                                            retry_seconds=self.settings.redis_retry_seconds)

    def get_rollout(self, rollout_id: str) -> Rollout:
        return self.store.get_rollout(rollout_id)

    def get_rollouts(self, rollout_ids: Sequence[str]) -> list[Rollout]:
        return self.store.get_rollouts(rollout_ids)

    def get_attempts(self, rollout_id: str) -> list[Attempt]:
        return self.store.get_attempts(rollout_id)

    def query_rollouts(
        self,
        filter: RolloutFilter | None = None,
        *,
        offset: int = 0,
        limit: int = 100,
        **fields: Unpack[FilterFields],
    ) -> list[Rollout]:
        """Rollouts matching every filter given (a :class:`RolloutFilter`, or its fields as
        keywords over it), newest enqueued first unless told otherwise; ``limit`` of them after
        ``offset`` matches. See :meth:`RolloutStore.query_rollouts`; for long listings page
        with :meth:`query_page`."""
        return self.store.query_rollouts(filter, offset=offset, limit=limit, **fields)

    def query_page(
        self, filter: RolloutFilter | None = None, *, cursor: str | None = None, limit: int = 100
    ) -> RolloutPage:
        """One page of the rollouts matching ``filter`` after ``cursor``, and the next page's cursor
        (None at the end). See :meth:`RolloutStore.query_page`."""
        return self.store.query_page(filter, cursor=cursor, limit=limit)

    def finished_rollouts(
        self, after: str | None = None, *, limit: int = 100, block_seconds: float = 0.0,
        filter: RolloutFilter | None = None,
    ) -> FinishedPage:
        """The rollouts that reached a final status after the cursor ``after`` (None: from the
        oldest kept), in that order, and the cursor to pass next; waits up to ``block_seconds``
        for a first one. Persist the cursor to resume after a restart. See
        :meth:`RolloutStore.finished_rollouts` for the delivery guarantees."""
        return self.store.finished_rollouts(after, limit=limit, block_seconds=block_seconds, filter=filter)

    def iter_finished_rollouts(
        self, after: str | None = None, *, idle_seconds: float = 5.0, batch: int = 100,
        filter: RolloutFilter | None = None,
    ) -> Iterator[FinishedRollout]:
        """Each finished rollout after the cursor ``after``, until none arrived for
        ``idle_seconds``. Save ``item.cursor`` after handling each item; pass it back as
        ``after`` to resume exactly after that item. See :meth:`finished_rollouts`."""
        return self.store.iter_finished_rollouts(after, idle_seconds=idle_seconds, batch=batch, filter=filter)

    def cancel_rollouts(
        self, filter: RolloutFilter | None = None, *, dry_run: bool = True, batch: int = 100,
        terminate: bool = True,
    ) -> CancelReport:
        """Cancel every unfinished rollout matching ``filter``, or (``dry_run``, the default)
        only list them. ``filter.status`` may narrow the unfinished statuses (default: all of
        them); a filter naming only final statuses matches nothing to cancel (:class:`InvalidFilterError`).

        The matches are listed first (a page of ``batch`` at a time), then cancelled ``batch``
        at a time, each batch in one MULTI/EXEC with :meth:`cancel_rollout`'s semantics: running
        ones are stopped (``terminate``), a rollout that finished meanwhile is left as it is. The
        report counts the rollouts cancelled, already finished and no longer found.
        """
        wanted = filter if filter is not None else RolloutFilter()
        unfinished = tuple(s for s in (wanted.status or ACTIVE_STATUSES) if s in ACTIVE_STATUSES)
        if not unfinished:
            raise InvalidFilterError(f"status {', '.join(wanted.status or ())} is final: there is nothing to cancel; "
                             f"give unfinished statuses ({', '.join(ACTIVE_STATUSES)}) or none")
        wanted = wanted.model_copy(update={"status": unfinished})
        matched: list[str] = []
        cursor: str | None = None
        while True:
            page = self.store.query_page(wanted, cursor=cursor, limit=batch)
            matched += [r.rollout_id for r in page.rollouts]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        report = CancelReport(dry_run=dry_run, matched=matched)
        if dry_run:
            return report
        for start in range(0, len(matched), batch):
            chunk = matched[start : start + batch]
            stopped = []
            for rid, (before, _) in zip(chunk, self.store.cancel_batch(chunk), strict=True):
                if before is None:
                    report.not_found.append(rid)
                elif before in TERMINAL_STATUSES:
                    report.already_finished.append(rid)
                else:
                    report.cancelled.append(rid)
                    stopped.append(rid)
            if stopped and terminate:
                self.celery.control.revoke(stopped, terminate=True, signal="SIGTERM")
        return report

    def cancel_rollout(self, rollout_id: str, terminate: bool = True) -> str:
        """Cancel a rollout that has not finished; return its status afterwards.

        The rollout (and its open attempt) become ``cancelled`` at once, for
        good. A queued rollout is skipped when a worker takes it. A running one
        is stopped through Celery's ``revoke(terminate=True)``: its worker
        process gets SIGTERM and is replaced, freeing the slot. With
        ``terminate=False`` the agent runs to the end instead; its outcome is
        kept on the attempt only.
        """
        status = self.store.terminate(rollout_id, "cancelled")
        if status == "cancelled" and terminate:
            self.celery.control.revoke(rollout_id, terminate=True, signal="SIGTERM")
        return status

    # -- traces and LLM usage -----------------------------------------------------------------

    def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        """The spans of one attempt of the rollout, or of every attempt (``attempt_id=None``),
        attempt by attempt: each attempt's root span (ids, snapshot and version, experiment and
        variant, status, final reward), the spans its agent opened, its emitted rewards,
        messages, objects and exceptions, and its LLM calls (the agent's and the proxy's).
        Order the spans as a tree with :func:`lightning_queue.core.traces.tree`.

        Raises :class:`RolloutNotFoundError` (unknown or expired rollout: traces expire with it)
        and :class:`AttemptNotFoundError`.
        """
        return self.traces.query_spans(rollout_id, attempt_id)

    def get_triplets(self, rollout_id: str, attempt_id: str | None = None) -> list[Triplet]:
        """One (prompt messages, response message, reward) triplet per LLM call of an attempt
        (default: the rollout's last), in the order the calls started: what an RL trainer
        consumes. See :func:`lightning_queue.core.traces.to_triplets` for how rewards are assigned."""
        if attempt_id is None:
            ids = self.traces.attempt_ids(rollout_id)
            if not ids:
                return []
            attempt_id = ids[-1]
        spans = self.traces.query_spans(rollout_id, attempt_id)
        final = next((s.attributes.get(FINAL_REWARD) for s in spans if FINAL_REWARD in s.attributes), None)
        return to_triplets(spans, final if isinstance(final, (int, float)) else None)

    def get_usage(self, rollout_id: str) -> Usage:
        """The rollout's LLM calls, tokens and cost, over all its attempts."""
        return self.traces.usage(rollout_id)

    def usage_by_version(self, resources_id: str) -> dict[int, Usage]:
        """What each version of a snapshot cost: LLM calls, tokens and cost of the attempts that
        ran with it, and how many attempts, by version (kept until the snapshot is deleted)."""
        return self.traces.usage_by_version(resources_id)

    def usage_by_variant(self, experiment: str) -> dict[str, Usage]:
        """What each variant of an experiment cost: the usage of the attempts of the rollouts it
        enqueued under that variant, by variant name."""
        return self.traces.usage_by_variant(experiment)
