"""A/B experiments: deterministic assignment of units to snapshot variants, routed through the fleet.

An :class:`Experiment` names two or more variants (the first is the control),
each a snapshot id or a pointer with a weight. Enqueuing through it
(:meth:`Experiments.enqueue`) assigns every task to a variant by its *unit*
(a field of the input or metadata, e.g. a user id, or a function of the
input), pins the rollout to that variant's snapshot, tags it with
``metadata={"experiment", "variant", "unit"}``, and indexes it per variant so
reports read only the experiment's rollouts. Workers need nothing new.

Assignment is a pure function of (salt, bucket version, unit): a BLAKE2b hash
to one of :data:`BUCKETS` buckets; the variants own contiguous bucket ranges
in their fixed order, so the same unit always gets the same variant on every
machine, and changing the weights moves only the units in the buckets that
change owner (50/50 -> 60/40 moves 10%). Coverage uses a second, independent
hash: raising it only adds units, and a unit outside coverage gets the
fallback (default: the control's snapshot) and is not part of the experiment.
Starting again with a new bucket version re-buckets every unit.

A **paired** experiment runs every input under every variant (blocked on the
input) and is compared with paired tests; on small evaluation sets it has far
more power than a split (see :mod:`lightning_queue.stats` and the README).

Statuses: ``draft -> running <-> stopped``. Every change of an experiment is
atomic: a WATCH/MULTI/EXEC read-modify-write of its hash (retried on a
concurrent change), or, to stop it together with a pointer move (promotion,
canary rollback), the ``experiment_conclude`` Lua script.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import (
    ExperimentError,
    ExperimentExistsError,
    ExperimentNotFoundError,
    ExperimentStateError,
    PointerError,
    ProtectedPointerError,
    ResourcesNotFoundError,
)
from lightning_queue.core.models import Rollout, RolloutConfig, RolloutMode, RolloutRequest, default_actor
from lightning_queue.experiments.model import (
    BUCKETS,
    Experiment,
    ExperimentStatus,
    Variant,
    bucket,
    bucket_bounds,
    is_name,
    lookup,
    parse_experiment,
    unit_value,
)
from lightning_queue.storage.connections import text
from lightning_queue.storage.registry import Protection, announce_move, check_force, check_name
from lightning_queue.storage.scripts import load_script
from lightning_queue.storage.store import decode_rollout

if TYPE_CHECKING:
    from lightning_queue.experiments.report import ExperimentReport, Outcomes

__all__ = [
    "BUCKETS",
    "Conclusion",
    "Experiment",
    "ExperimentStatus",
    "Experiments",
    "Variant",
    "bucket",
    "bucket_bounds",
    "lookup",
    "parse_experiment",
    "unit_value",
]


# Hash fields stored as plain strings beside the JSON spec.
_PLAIN = ("status", "bucket_version", "revision", "concluded", "create_time", "start_time", "stop_time", "stop_reason",
          "winner")


def _encode(experiment: Experiment) -> dict[str, str]:
    data = experiment.model_dump(mode="json")
    plain = {k: data.pop(k) for k in _PLAIN}
    # Plain strings the Lua script reads: booleans as "1" or "", None as "".
    fields = {k: ("1" if v is True else "" if v is None or v is False else str(v)) for k, v in plain.items()}
    fields["spec"] = json.dumps(data)
    return fields


def _decode(fields: Mapping[bytes | str, bytes | str]) -> Experiment:
    raw = {text(k): text(v) for k, v in fields.items()}
    data = json.loads(raw.pop("spec"))
    for key in _PLAIN:
        value = raw.get(key, "")
        data[key] = value if value != "" else None
    data["bucket_version"] = int(data["bucket_version"] or 1)
    data["revision"] = int(data["revision"] or 0)
    data["concluded"] = data["concluded"] == "1"
    for key in ("create_time", "start_time", "stop_time"):
        data[key] = float(data[key]) if data[key] is not None else None
    if data["create_time"] is None:
        data.pop("create_time")
    return Experiment.model_validate(data)


# ----------------------------------------------------------------------------- the manager


@dataclass(frozen=True)
class Conclusion:
    """What concluding an experiment did: the pointer moved (if any), from what to what, and why."""

    experiment: str
    pointer: str | None
    from_id: str | None
    to_id: str | None
    reason: str
    winner: str | None


class Experiments:
    """Create, run, report on and conclude experiments, on a :class:`LightningClient`'s Redis.

    Contract:

    * ``create`` writes a draft atomically and refuses a taken name.
    * ``start``, ``stop`` and ``set_weights`` are each one WATCH/MULTI/EXEC
      read-modify-write of the experiment's hash (retried on a concurrent change).
    * ``promote`` and ``rollback`` move a pointer *and* stop the experiment in one
      Lua script; the move is recorded in the pointer's history.
    * ``enqueue`` refuses an experiment that is not running, and enqueues the
      batch with one ``enqueue_rollouts`` call plus one MULTI/EXEC for the
      per-variant indexes, whatever the batch size.
    """

    def __init__(self, client: LightningClient) -> None:
        self.client = client
        self.redis = client.redis
        self.keys = client.keys
        self._conclude = load_script(self.redis, "experiment_conclude", "_registry_prelude")

    # -- definition and status ------------------------------------------------------------

    def create(self, experiment: Experiment | Mapping[str, Any]) -> Experiment:
        """Store a new experiment as a draft. Every variant's snapshot (and the fallback)
        must exist now: :class:`ResourcesNotFoundError` names the first one missing."""
        exp = experiment if isinstance(experiment, Experiment) else parse_experiment(experiment)
        exp = exp.model_copy(update={"status": "draft", "revision": 0, "start_time": None, "stop_time": None,
                                     "stop_reason": None, "winner": None, "concluded": False,
                                     "reassigned": False})
        refs = sorted({v.resources_id for v in exp.variants} | ({exp.fallback} if exp.fallback else set()))
        found = self.client.registry.current_versions(refs)
        for ref in refs:
            if found[ref] is None:
                raise ResourcesNotFoundError(ref, hint=f"experiment {exp.name!r} was not created; add it first")
        key = self.keys.experiment(exp.name)

        def write(pipe: Any) -> None:
            if pipe.exists(key):
                raise ExperimentExistsError(exp.name)
            pipe.multi()
            pipe.hset(key, mapping=_encode(exp))
            pipe.zadd(self.keys.experiments, {exp.name: exp.create_time})

        self.redis.transaction(write, key)
        return exp

    def _key(self, name: str) -> str:
        # A name that cannot be an experiment's (it holds ':'...) must not address a key: none is stored.
        if not is_name(name):
            raise ExperimentNotFoundError(name)
        return self.keys.experiment(name)

    def get(self, name: str) -> Experiment:
        fields = self.redis.hgetall(self._key(name))
        if not fields:
            raise ExperimentNotFoundError(name)
        return _decode(fields)

    def all(self) -> list[Experiment]:
        """Every experiment, newest first."""
        names = [text(n) for n in self.redis.zrevrange(self.keys.experiments, 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.experiment(name))
        return [_decode(f) for f in pipe.execute() if f]

    def _update(self, name: str, change: Callable[[Experiment], Experiment]) -> Experiment:
        key = self._key(name)
        out: list[Experiment] = []

        def apply(pipe: Any) -> None:
            fields = pipe.hgetall(key)
            if not fields:
                raise ExperimentNotFoundError(name)
            new = change(_decode(fields))
            new = new.model_copy(update={"revision": new.revision + 1})
            pipe.multi()
            pipe.hset(key, mapping=_encode(new))
            out[:] = [new]

        self.redis.transaction(apply, key)
        return out[0]

    def start(self, name: str, *, rebucket: bool = False) -> Experiment:
        """Start (or restart) routing. ``rebucket=True`` bumps the bucket version, so
        every unit is assigned afresh; otherwise assignment is sticky across restarts."""

        def change(exp: Experiment) -> Experiment:
            if exp.status == "running":
                raise ExperimentStateError(name, "running", "stop it first to restart it")
            if exp.concluded:
                raise ExperimentStateError(name, "stopped", f"it was concluded ({exp.stop_reason}); create a new one")
            return exp.model_copy(update={
                "status": "running", "start_time": time.time(), "stop_time": None, "stop_reason": None,
                "bucket_version": exp.bucket_version + (1 if rebucket else 0),
                "reassigned": exp.reassigned or (rebucket and exp.start_time is not None),
            })

        return self._update(name, change)

    def stop(self, name: str, reason: str = "stopped by hand") -> Experiment:
        """Stop routing; rollouts already enqueued run on and still count in the report."""

        def change(exp: Experiment) -> Experiment:
            if exp.status != "running":
                raise ExperimentStateError(name, exp.status, "only a running experiment can be stopped")
            return exp.model_copy(update={"status": "stopped", "stop_time": time.time(), "stop_reason": reason})

        return self._update(name, change)

    def set_weights(self, name: str, weights: Mapping[str, float]) -> Experiment:
        """Change the variants' weights (only those named). Units move only between the
        variants whose bucket ranges change, and only as many as the change requires."""

        def change(exp: Experiment) -> Experiment:
            if exp.concluded:
                raise ExperimentStateError(name, exp.status, "it was concluded; its weights are final")
            for variant in weights:
                exp.variant(variant)  # raises naming the unknown one
            variants = [v.model_copy(update={"weight": float(weights.get(v.name, v.weight))}) for v in exp.variants]
            reassigned = exp.reassigned or (exp.start_time is not None and variants != exp.variants)
            return parse_experiment({**exp.model_dump(), "variants": [v.model_dump() for v in variants],
                                     "reassigned": reassigned})

        return self._update(name, change)

    # -- routing ------------------------------------------------------------------------

    def enqueue(
        self,
        name: str,
        inputs: Iterable[Any],
        *,
        unit: Callable[[Any], Any] | None = None,
        mode: RolloutMode | None = "train",
        config: RolloutConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> list[Rollout]:
        """Enqueue ``inputs`` through the experiment; return the rollouts in input order
        (a paired experiment returns one per input per variant, variants in order).

        Each rollout is pinned to its variant's snapshot (a pointer is resolved now)
        and carries ``metadata["experiment"|"variant"|"unit"|"bucket_version"]``;
        units outside coverage run with the fallback, with ``variant`` ``None``, and
        are not counted. ``unit`` (a function of the input) overrides ``unit_key``.
        Raises :class:`ExperimentStateError` unless the experiment is running, and
        :class:`ExperimentUnitError` (before anything is enqueued) for an input
        without a unit.
        """
        exp = self.get(name)
        if exp.status != "running":
            raise ExperimentStateError(name, exp.status, "start it before enqueuing through it")
        base = dict(metadata or {})
        requests: list[RolloutRequest] = []
        assigned: list[tuple[str | None, str]] = []
        for item in inputs:
            unit_key = unit_value(unit(item)) if unit is not None else exp.unit_of(item, base)
            chosen = [v.name for v in exp.variants] if exp.paired else [exp.assign(unit_key)]
            for variant in chosen:
                target = exp.variant(variant).resources_id if variant else (exp.fallback or exp.control.resources_id)
                requests.append(RolloutRequest(
                    input=item, resources_id=target, mode=mode, config=config,
                    metadata={**base, "experiment": name, "variant": variant, "unit": unit_key,
                              "bucket_version": exp.bucket_version},
                ))
                assigned.append((variant, unit_key))
        if not requests:
            return []
        rollouts = self.client.enqueue_rollouts(requests)
        # Indexed after enqueueing because the rollout ids are made there; a crash in
        # between leaves rollouts that run but are missing from the report, never the reverse.
        pipe = self.redis.pipeline(transaction=True)
        for rollout, (variant, unit_key) in zip(rollouts, assigned, strict=True):
            if variant is not None:
                pipe.zadd(self.keys.experiment_rollouts(name, variant), {rollout.rollout_id: rollout.enqueue_time})
                pipe.sadd(self.keys.experiment_units(name, variant), unit_key)
        pipe.execute()
        return rollouts

    # -- reading ------------------------------------------------------------------------

    def rollout_ids(self, name: str) -> dict[str, list[str]]:
        """Each variant's rollout ids, oldest first (one round trip)."""
        exp = self.get(name)
        pipe = self.redis.pipeline(transaction=True)
        for v in exp.variants:
            pipe.zrange(self.keys.experiment_rollouts(name, v.name), 0, -1)
        return {v.name: [text(r) for r in ids] for v, ids in zip(exp.variants, pipe.execute(), strict=True)}

    def snapshot(self, name: str) -> tuple[Experiment, dict[str, list[Rollout]], dict[str, int]]:
        """The experiment, each variant's rollouts whose records are still stored (in
        enqueue order), and each variant's unit count, read in three round trips."""
        exp = self.get(name)
        pipe = self.redis.pipeline(transaction=True)
        for v in exp.variants:
            pipe.zrange(self.keys.experiment_rollouts(name, v.name), 0, -1)
            pipe.scard(self.keys.experiment_units(name, v.name))
        replies = pipe.execute()
        ids = {v.name: [text(r) for r in replies[2 * i]] for i, v in enumerate(exp.variants)}
        units = {v.name: int(replies[2 * i + 1]) for i, v in enumerate(exp.variants)}
        pipe = self.redis.pipeline(transaction=False)
        flat = [rid for v in exp.variants for rid in ids[v.name]]
        for rid in flat:
            pipe.hgetall(self.keys.rollout(rid))
        records = dict(zip(flat, pipe.execute(), strict=True))
        rollouts = {
            v.name: [decode_rollout(records[rid], rid) for rid in ids[v.name] if records[rid]] for v in exp.variants
        }
        return exp, rollouts, units

    def report(self, name: str, *, alpha: float = 0.05, min_sample: int = 30) -> ExperimentReport:
        """Per-variant metrics and each treatment's comparison with the control; see
        :class:`lightning_queue.report.ExperimentReport`."""
        from lightning_queue.experiments.report import build_report

        exp, rollouts, units = self.snapshot(name)
        return build_report(exp, rollouts, units, alpha=alpha, min_sample=min_sample)

    def outcomes(self, name: str) -> tuple[Experiment, dict[str, Outcomes], dict[str, int]]:
        """The experiment, each variant's :class:`~lightning_queue.experiments.report.Outcomes` from
        the aggregates kept as its rollouts finish, and each variant's unit count: two round trips
        whatever the number of rollouts, and no rollout record read. Counts every rollout that
        finished, also once its record expired."""
        from lightning_queue.experiments.report import outcomes_from_tally

        exp = self.get(name)
        k = self.keys
        pipe = self.redis.pipeline(transaction=True)
        for v in exp.variants:
            pipe.zcard(k.experiment_rollouts(name, v.name))
            pipe.scard(k.experiment_units(name, v.name))
            pipe.hgetall(k.experiment_tally(name, v.name))
            pipe.get(k.experiment_rewards(name, v.name))
            if exp.paired:
                pipe.hgetall(k.experiment_unit_rewards(name, v.name))
            else:
                pipe.echo("")
        replies = pipe.execute()
        outcomes, units = {}, {}
        for i, v in enumerate(exp.variants):
            count, unit_count, tally, rewards, unit_rewards = replies[5 * i : 5 * i + 5]
            units[v.name] = int(unit_count)
            outcomes[v.name] = outcomes_from_tally(
                int(count), {text(f): text(n) for f, n in tally.items()}, text(rewards) if rewards else "",
                {text(u): text(h) for u, h in unit_rewards.items()} if isinstance(unit_rewards, dict) else {},
            )
        return exp, outcomes, units

    def live_report(self, name: str, *, alpha: float = 0.05, min_sample: int = 30) -> ExperimentReport:
        """:meth:`report` built from the aggregates kept as rollouts finish (:meth:`outcomes`), not
        from the rollout records: as fast for 100,000 rollouts as for ten. It counts only rollouts
        that finished since the tallies exist (lightning-queue 0.1's server), and keeps counting
        rollouts whose records expired, which :meth:`report` no longer sees."""
        from lightning_queue.experiments.report import report_from_outcomes

        exp, outcomes, units = self.outcomes(name)
        return report_from_outcomes(exp, outcomes, units, alpha=alpha, min_sample=min_sample)

    # -- concluding ---------------------------------------------------------------------

    def conclude(
        self,
        name: str,
        *,
        pointer: str | None,
        target: str | None,
        reason: str,
        winner: str | None = None,
        expected: str | None = None,
        allowed: Sequence[ExperimentStatus] = ("running", "stopped"),
        by: str | None = None,
        op: str | None = None,
        force: bool = False,
        force_reason: str | None = None,
    ) -> Conclusion:
        """Move ``pointer`` to the snapshot ``target`` (an id or pointer, resolved now)
        and stop the experiment with ``reason``, in one atomic step (the
        ``experiment_conclude`` Lua script; the move goes into the pointer's history with
        ``by``, default :func:`default_actor`, and ``op``, default ``experiment {name}``).
        ``expected`` makes the move a compare-and-set on the pointer's current target.
        A protected pointer raises :class:`ProtectedPointerError` (nothing moved, the
        experiment not stopped) unless ``force=True`` with a ``force_reason``."""
        force_reason = check_force(force, force_reason)
        if force_reason and force_reason != reason:
            reason = f"{reason}; forced: {force_reason}"
        k = self.keys
        if pointer and not target:
            raise ValueError("moving a pointer needs a target")
        if pointer:
            check_name(pointer, "pointer name")
            if not is_name(target):
                raise ResourcesNotFoundError(str(target), hint=f"pointer {pointer!r} was not moved")
        now = time.time()
        actor, op = by or default_actor(), op or f"experiment {name}"
        reply = self._conclude(
            keys=[self._key(name), k.pointers, k.seq, k.snapshot_events, k.pointer_protection],
            args=[pointer or "", target or "", repr(now), actor,
                  self.client.settings.pointer_history_length, k.pointer_history_prefix, k.snapshot_prefix,
                  expected or "", reason, winner or "", ",".join(allowed), "1" if force else "0",
                  op],
        )
        status = text(reply[0])
        if status == "protected":
            assert pointer is not None
            protection = Protection.decode(pointer, reply[1])
            raise ProtectedPointerError(pointer, protection.reason, protection.by)
        if status == "missing":
            raise ExperimentNotFoundError(name)
        if status == "concluded":
            raise ExperimentStateError(name, "stopped", f"it was already concluded ({text(reply[1])})")
        if status == "status":
            raise ExperimentStateError(name, text(reply[1]), f"it can be concluded only while {' or '.join(allowed)}")
        if status == "no_target":
            raise ResourcesNotFoundError(text(reply[1]), hint=f"pointer {pointer!r} was not moved")
        if status == "name_taken":
            raise PointerError(f"{pointer!r} is the id of a snapshot; pick another pointer name")
        if status == "conflict":
            raise PointerError(
                f"pointer {pointer!r} names {text(reply[1]) or None!r}, not the expected {expected!r}: someone moved "
                f"it during experiment {name!r}; it was not moved and the experiment was not stopped"
            )
        if not pointer:
            return Conclusion(name, None, None, None, reason, winner)
        announce_move(pointer, text(reply[1]) or None, text(reply[2]), actor, op, reason, now)
        return Conclusion(name, pointer, text(reply[1]) or None, text(reply[2]), reason, winner)

    def promote(
        self, name: str, variant: str | None = None, pointer: str = "latest", *, alpha: float = 0.05,
        min_sample: int = 30, expected: str | None = None, by: str | None = None, force: bool = False,
        reason: str | None = None,
    ) -> Conclusion:
        """Move ``pointer`` to ``variant``'s snapshot and stop the experiment, atomically.

        A protected ``pointer`` needs ``force=True`` and a ``reason`` (recorded with ``by`` in
        its history); else :class:`ProtectedPointerError` and nothing changes.

        Without ``variant`` the report's winner is taken: the treatment whose
        sequential test beats the control at ``alpha`` with the best mean reward;
        :class:`ExperimentError` when none does (name the variant to promote anyway).
        """
        exp = self.get(name)
        if variant is None:
            report = self.report(name, alpha=alpha, min_sample=min_sample)
            variant = report.winner
            if variant is None:
                raise ExperimentError(
                    f"no variant of experiment {name!r} beats the control {exp.control.name!r} yet "
                    f"(verdicts: {', '.join(f'{c.variant}: {c.verdict}' for c in report.comparisons)}); "
                    "collect more rollouts, or name the variant to promote"
                )
        target = exp.variant(variant).resources_id
        return self.conclude(name, pointer=pointer, target=target, winner=variant, expected=expected,
                             reason=f"promoted {variant!r} to {pointer!r}", by=by, op=f"promote {name}",
                             force=force, force_reason=reason)

    def rollback(self, name: str, pointer: str, reason: str, to_variant: str | None = None,
                 expected: str | None = None, *, by: str | None = None, force: bool = False) -> Conclusion:
        """Move ``pointer`` back to ``to_variant``'s snapshot (default: the control's)
        and stop the running experiment with ``reason``, atomically (a canary's guardrail)."""
        exp = self.get(name)
        target = exp.variant(to_variant or exp.control.name).resources_id
        return self.conclude(name, pointer=pointer, target=target, reason=reason, expected=expected,
                             allowed=("running",), by=by, op=f"rollback {name}", force=force,
                             force_reason=reason if force else None)
