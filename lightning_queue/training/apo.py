"""APO: beam search over prompt templates, edited by a critic model that reads failed rollouts.

Each round, for every template in the beam (starting from the one the run starts from):

1. **Critique.** The template runs on a minibatch of training inputs; the rollouts that
   went badly (failed, or reward below ``success_threshold``) go to the :class:`Critic`,
   which says what in the template caused them and proposes ``branch_factor`` edits.
   Proposals that do not parse, change the template's placeholders, or repeat a template
   already tried are dropped. Each one kept becomes a **snapshot** of its own: the start
   snapshot's resources with the template replaced and a :class:`PromptLineage` naming the
   parent and the critique. Candidates are written without moving ``latest``.
2. **Compare.** Every candidate runs on the validation inputs, *paired* with the incumbent
   (the best template so far) on the same inputs, in batches of ``val_batch_size``; after
   each batch the sequential paired test (mSPRT, always valid however often one looks)
   decides ``better`` or ``worse`` as soon as p < ``alpha`` with at least ``min_pairs``
   pairs, so clear losers and clear winners stop early. With ``test="paired"`` the whole
   validation set runs and the Wilcoxon signed-rank test decides. Candidates not decided
   by the end are ``undecided``: no evidence either way, never promoted. (A comparison the
   budget cut short goes on in the next round the budget allows.)
3. **Promote.** The ``better`` candidate with the largest gain becomes the incumbent: the
   pointer (``promote_to``; default the agent's pointer, else ``latest``) is moved to its
   snapshot, and ``{run}.best`` with it. The next beam is the incumbent and the best-scoring
   candidates that were not ``worse``.

Every evaluation is a batch of pinned, idempotent rollouts (:class:`TrainingRun`), and the
run's decisions are kept in Redis as they are made (the critiques and proposals of each
parent, the state after each round), so a new process with the same run name continues a
crashed run: it asks the critic nothing it already answered and runs no rollout twice.
``max_rollouts`` bounds the rollouts a run may create; the search stops before the batch
that would pass it (resumed with a larger bound, it goes on).
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lightning_queue.client import LightningClient
from lightning_queue.core.errors import (
    InvalidDatasetError,
    PromptNotFoundError,
    ResourcesExistError,
    RunConflictError,
)
from lightning_queue.core.models import PromptLineage, PromptTemplate, Resource, ResourcesUpdate, Rollout
from lightning_queue.storage.registry import check_name
from lightning_queue.training.algorithm import Algorithm, Evaluation, RunStats, TrainingRun
from lightning_queue.training.critic import Critic
from lightning_queue.training.datasets import Dataset

log = logging.getLogger(__name__)

Verdict = Literal["start", "better", "worse", "undecided"]


class APOConfig(BaseModel):
    """The search's settings (validated: a bad value raises pydantic's ``ValidationError`` naming it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(3, ge=1, description="Rounds of critique, edit and comparison.")
    beam_width: int = Field(2, ge=1, description="Templates kept for the next round (the incumbent first).")
    branch_factor: int = Field(2, ge=1, description="Edits the critic proposes per template and round.")
    train_batch_size: int = Field(4, ge=1, description="Training inputs each template runs on for its critique.")
    val_batch_size: int = Field(4, ge=1, description="Validation inputs per look of the sequential comparison.")
    max_failures: int = Field(4, ge=1, description="Failed rollouts shown to the critic per critique.")
    success_threshold: float = Field(1.0, description="A rollout with a lower reward (or none) went badly.")
    test: Literal["sequential", "paired"] = Field("sequential", description="How a candidate is judged.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level of the comparison.")
    min_pairs: int = Field(6, ge=2, description="Pairs needed before the sequential test may decide.")
    max_rollouts: int | None = Field(None, ge=1, description="Rollouts the run may create in all (None: no bound).")
    prompt_name: str | None = Field(None, description="The template to optimize (default: the snapshot's only one).")
    start: str | None = Field(None, description="Snapshot id or pointer to start from (default: the run's pointer).")
    promote_to: str | None = Field(None, description="Pointer the winner is promoted to (default: the run's pointer).")


@dataclass
class Candidate:
    """One template the run tried: its snapshot, where it came from, and how it compared."""

    resources_id: str
    template: str
    round: int
    parent: str | None = None
    critique: str | None = None
    verdict: Verdict = "undecided"
    compared_with: str | None = None
    pairs: int = 0
    mean_diff: float | None = None
    p_value: float | None = None
    val_mean: float | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Promotion:
    """A move of the promotion pointer the run made, and the rollouts the run had spent by then."""

    round: int
    pointer: str
    from_id: str | None
    to_id: str
    rollouts: int = 0


@dataclass
class APOResult:
    """What the search found. ``promotions`` lists every pointer move the run made (all of its
    processes); ``best`` is the start when nothing beat it. ``stopped`` says why it ended:
    ``rounds`` (all done) or ``budget`` (``max_rollouts`` would have been passed)."""

    run: str
    start: Candidate
    best: Candidate
    candidates: list[Candidate]
    promotions: list[Promotion]
    rounds: int
    stopped: str
    rollouts_spent: int
    stats: RunStats
    rejected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def improved(self) -> bool:
        return self.best.resources_id != self.start.resources_id

    @property
    def promoted(self) -> Promotion | None:
        """The last promotion, or None when the run promoted nothing."""
        return self.promotions[-1] if self.promotions else None


def _reward(rollout: Rollout) -> float:
    # A rollout that failed scores 0: a template that breaks the agent is worse, not absent.
    return float(rollout.reward) if rollout.status == "succeeded" and rollout.reward is not None else 0.0


class APO(Algorithm[APOResult]):
    """Automatic prompt optimization against the fleet; see the module's docstring.

    ``critic`` proposes the edits (default: one from ``LQ_CRITIC_*``); keyword arguments are
    :class:`APOConfig`'s fields.
    """

    def __init__(self, critic: Critic | None = None, **config: Any) -> None:
        self.config = APOConfig(**config)
        self.critic = critic if critic is not None else Critic()

    # -- the search -------------------------------------------------------------------------

    def run(self, run: TrainingRun, train: Dataset, val: Dataset) -> APOResult:
        if not len(train) or not len(val):
            raise InvalidDatasetError(
                f"APO needs training and validation inputs, got {len(train)} and {len(val)}; pass both to fit()"
            )
        search = _Search(self, run, train, val)
        return search.go()


class _Search:
    """One APO run's working state: what is in Redis (``run.state``), as Python objects."""

    def __init__(self, apo: APO, run: TrainingRun, train: Dataset, val: Dataset) -> None:
        self.cfg = apo.config
        self.critic = apo.critic
        self.run = run
        self.client: LightningClient = run.client
        self.train = train
        self.val = val
        self.pointer = self.cfg.promote_to or run.pointer
        self.best_pointer = check_name(f"{run.name}.best", "pointer name (from the run name)")
        self.candidates: dict[str, Candidate] = {}
        self.snapshots: dict[str, ResourcesUpdate] = {}
        self.stopped = "rounds"

    def go(self) -> APOResult:
        state = self.run.state
        start = self._start()
        saved = state.get("candidates", {})
        self.candidates = {rid: Candidate(**record) for rid, record in saved.items()} or {start.resources_id: start}
        best = self.candidates[state.get("best", start.resources_id)]
        beam = [self.candidates[rid] for rid in state.get("beam", [start.resources_id])]
        done = int(state.get("round", 0))
        for round_number in range(done + 1, self.cfg.rounds + 1):
            # A round starts only if the budget allows its first batch: a run out of budget starts no empty round.
            if self.stopped == "budget" or not self._affordable(self._critique_batch(round_number, beam)):
                break
            best, beam = self._round(round_number, best, beam)
        return APOResult(
            run=self.run.name, start=self.candidates[start.resources_id], best=best,
            candidates=sorted(self.candidates.values(), key=lambda c: (c.round, c.resources_id)),
            promotions=[Promotion(**p) for p in state.get("promotions", [])], rounds=int(state.get("round", 0)),
            stopped=self.stopped, rollouts_spent=self.run.rollouts_spent, stats=self.run.stats,
            rejected=[r for key, value in state.all().items() if key.startswith("round:")
                      for r in value.get("rejected", [])],
        )

    def _round(self, number: int, best: Candidate, beam: list[Candidate]) -> tuple[Candidate, list[Candidate]]:
        proposals = self._propose(number, beam)
        fresh = [c for c in proposals if c.resources_id not in self.candidates]
        # Comparisons the budget cut short in an earlier round go on (their rollouts so far are reused).
        unfinished = [c for c in self.candidates.values() if c.verdict == "undecided" and c.pairs < len(self.val)]
        compared = [*fresh, *unfinished]
        for candidate in compared:
            candidate.compared_with = best.resources_id
        if compared:
            self._compare(best, compared)
        for candidate in fresh:
            self.candidates[candidate.resources_id] = candidate
        promotions = self.run.state.get("promotions", [])
        winners = [c for c in compared if c.verdict == "better"]
        if winners:
            best = max(winners, key=lambda c: (c.mean_diff or 0.0, c.val_mean or 0.0))
            promotions = self._promote(number, best, promotions)
        contenders = [c for c in {id(c): c for c in [*beam, *compared]}.values()
                      if c.resources_id != best.resources_id and c.verdict != "worse"]
        contenders.sort(key=lambda c: -(c.val_mean if c.val_mean is not None else -math.inf))
        beam = [best, *contenders[: self.cfg.beam_width - 1]]
        # The round's outcome in one HSET: a crash before it replays the round from what Redis holds.
        self.run.state.set(round=number, best=best.resources_id, beam=[c.resources_id for c in beam],
                           candidates={rid: c.record() for rid, c in self.candidates.items()}, promotions=promotions)
        log.info("APO %s round %d: %d candidates compared, best %s (%s), %d rollouts so far", self.run.name, number,
                 len(compared), best.resources_id, best.verdict, self.run.rollouts_spent)
        return best, beam

    # -- the start --------------------------------------------------------------------------

    def _start(self) -> Candidate:
        """The start snapshot, resolved and recorded on the run's first call (a resumed run
        must start from the same one), and the run's copy of it: its first candidate."""
        state = self.run.state
        ref = self.cfg.start or self.run.pointer
        recorded = state.get("start")
        if recorded is None:
            snapshot = self.client.get_resources_by_id(ref)
            name = self._prompt_name(snapshot)
            recorded = state.set_once("start", {"ref": ref, "resources_id": snapshot.resources_id,
                                                "version": snapshot.version, "prompt": name,
                                                "pointer_at": self.client.get_pointer(self.pointer)})
        elif recorded["ref"] != ref:
            raise RunConflictError(self.run.name, f"{recorded['ref']!r}", f"{ref!r}")
        base = self.client.get_resources_by_id(recorded["resources_id"], recorded["version"])
        self.base = base
        self.prompt_name: str = recorded["prompt"]
        template = base.resources[self.prompt_name]
        assert isinstance(template, PromptTemplate)
        self.engine = template.engine
        self.variables = template.variables()
        start = Candidate(self._id(template.template), template.template, round=0, verdict="start",
                          parent=base.resources_id)
        self._write(start, PromptLineage(run=self.run.name, prompt=self.prompt_name, parent_id=base.resources_id,
                                         parent_version=base.version, round=0))
        if self.client.get_pointer(self.best_pointer) is None:
            self.client.registry.set_pointer(self.best_pointer, start.resources_id, op=f"APO {self.run.name}")
        return start

    def _prompt_name(self, snapshot: ResourcesUpdate) -> str:
        templates = [n for n, r in snapshot.resources.items() if isinstance(r, PromptTemplate)]
        name = self.cfg.prompt_name
        if name is not None and name in templates:
            return name
        if name is None and len(templates) == 1:
            return templates[0]
        raise PromptNotFoundError(snapshot.resources_id, templates, name)

    def _id(self, template: str) -> str:
        """A candidate's snapshot id: the run name and a hash of its template, so a template
        proposed twice is one candidate, and a resumed run finds the snapshots it wrote."""
        digest = hashlib.sha256(f"{self.engine}\x00{template}".encode()).hexdigest()[:12]
        return f"{self.run.name}-{digest}"

    def _write(self, candidate: Candidate, lineage: PromptLineage) -> ResourcesUpdate:
        resources: dict[str, Resource] = dict(self.base.resources)
        resources[self.prompt_name] = PromptTemplate(template=candidate.template, engine=self.engine)
        resources[f"{self.prompt_name}_lineage"] = lineage
        # The version's metadata says what the lineage resource says, for `resources versions` and `diff`.
        parent = None
        if lineage.parent_id and lineage.parent_version:
            parent = f"{lineage.parent_id}@{lineage.parent_version}"
        message = f"APO {self.run.name} round {lineage.round}"
        if lineage.critique:
            message = f"{message}: {lineage.critique}"[:4000]
        try:
            written = self.client.add_resources(resources, candidate.resources_id, make_latest=False, parent=parent,
                                                message=message)
        except ResourcesExistError:  # written before a crash: the id is a hash of the same template
            written = self.client.get_resources_by_id(candidate.resources_id)
        self.snapshots[candidate.resources_id] = written
        return written

    def _snapshot(self, candidate: Candidate) -> ResourcesUpdate:
        if candidate.resources_id not in self.snapshots:
            self.snapshots[candidate.resources_id] = self.client.get_resources_by_id(candidate.resources_id)
        return self.snapshots[candidate.resources_id]

    # -- step 1: critique and propose ---------------------------------------------------------

    def _propose(self, number: int, beam: list[Candidate]) -> list[Candidate]:
        """Each beam template's proposals this round; what the critic said is saved per parent as
        soon as it is said, so a resumed run does not ask again."""
        state = self.run.state
        evaluations = self._critique_batch(number, beam)
        if evaluations and self._affordable(evaluations):
            results = self.run.evaluate(evaluations)
            for evaluation, rollouts in zip(evaluations, results, strict=True):
                parent = self.candidates[evaluation.snapshot.resources_id]
                state.set(**{f"round:{number}:{parent.resources_id}": self._critique(number, parent, rollouts)})
        proposals = []
        for parent in beam:
            record = state.get(f"round:{number}:{parent.resources_id}")
            for template in (record or {}).get("proposals", []):
                proposals.append(Candidate(self._id(template), template, number, parent.resources_id,
                                           record["critique"]))
        unique = {c.resources_id: c for c in proposals}  # two parents may propose the same template
        for candidate in unique.values():
            if candidate.resources_id not in self.snapshots and candidate.resources_id not in self.candidates:
                origin = self._snapshot(self.candidates[candidate.parent or ""])
                self._write(candidate, PromptLineage(
                    run=self.run.name, prompt=self.prompt_name, parent_id=origin.resources_id,
                    parent_version=origin.version, critique=candidate.critique, round=number,
                    critic_model=self.critic.model))
        return list(unique.values())

    def _critique_batch(self, number: int, beam: list[Candidate]) -> list[Evaluation]:
        """Round ``number``'s training minibatch for each beam template the critic has not yet
        answered about this round."""
        batch = self.train.batch(number - 1, self.cfg.train_batch_size)
        return [Evaluation(self._snapshot(p), batch, "train", f"r{number}", {"apo_round": number}) for p in beam
                if self.run.state.get(f"round:{number}:{p.resources_id}") is None]

    def _critique(self, number: int, parent: Candidate, rollouts: list[Rollout]) -> dict[str, Any]:
        bad = [r for r in rollouts if r.status != "succeeded" or r.reward is None
               or r.reward < self.cfg.success_threshold]
        if not bad:
            return {"critique": None, "proposals": [], "rejected": []}
        bad.sort(key=_reward)
        critique = self.critic.critique(parent.template, bad[: self.cfg.max_failures])
        kept: list[str] = []
        rejected: list[dict[str, Any]] = []
        for text in self.critic.propose(parent.template, critique, self.cfg.branch_factor):
            reason = self._refuse(text, kept)
            if reason:
                rejected.append({"round": number, "parent": parent.resources_id, "template": text, "reason": reason})
                log.info("APO %s round %d: proposal dropped (%s): %.80r", self.run.name, number, reason, text)
            else:
                kept.append(text)
        return {"critique": critique, "proposals": kept, "rejected": rejected}

    def _refuse(self, text: str, kept: Sequence[str]) -> str | None:
        """Why a proposal cannot be a candidate, or None."""
        if not text.strip():
            return "empty"
        try:
            template = PromptTemplate(template=text, engine=self.engine)
        except ValidationError as exc:
            return f"does not parse: {exc.errors()[0]['msg']}"
        variables = template.variables()
        if variables != self.variables:
            missing, added = sorted(self.variables - variables), sorted(variables - self.variables)
            return f"placeholders changed (missing {missing}, added {added})"
        if text in kept or self._id(text) in self.candidates:
            return "already tried"
        return None

    # -- step 2: compare with the incumbent ---------------------------------------------------

    def _compare(self, best: Candidate, candidates: list[Candidate]) -> None:
        """Paired comparison of each candidate with ``best`` on the validation inputs, one batch
        of every undecided candidate (and the incumbent's same batch) per look."""
        size = self.cfg.val_batch_size
        looks = math.ceil(len(self.val) / size)
        rewards: dict[str, list[float]] = {c.resources_id: [] for c in [best, *candidates]}
        open_ = list(candidates)
        for look in range(looks):
            if not open_:
                break
            batch = self.val[look * size:(look + 1) * size]
            evaluations = [Evaluation(self._snapshot(c), batch, "val") for c in [best, *open_]]
            if not self._affordable(evaluations):
                break
            results = self.run.evaluate(evaluations)
            for candidate, rollouts in zip([best, *open_], results, strict=True):
                rewards[candidate.resources_id] += [_reward(r) for r in rollouts]
            final = look == looks - 1
            for candidate in list(open_):
                self._judge(candidate, rewards[best.resources_id], rewards[candidate.resources_id], final)
                if candidate.verdict != "undecided":
                    open_.remove(candidate)
        best.val_mean = statistics.fmean(rewards[best.resources_id]) if rewards[best.resources_id] else best.val_mean

    def _judge(self, candidate: Candidate, control: list[float], treatment: list[float], final: bool) -> None:
        # Imported here: scipy (the experiments extra) costs a second to import, and only judging needs it.
        from lightning_queue.experiments.stats import paired, sequential_paired

        n = len(treatment)
        control = control[:n]
        candidate.pairs = n
        candidate.val_mean = statistics.fmean(treatment)
        candidate.mean_diff = statistics.fmean(treatment) - statistics.fmean(control)
        if self.cfg.test == "sequential":
            p = sequential_paired(control, treatment, min_sample=self.cfg.min_pairs).p_value
        elif final and n >= 2:
            p = paired(control, treatment).wilcoxon_p_value
        else:
            return
        candidate.p_value = p
        if p < self.cfg.alpha and candidate.mean_diff != 0:
            candidate.verdict = "better" if candidate.mean_diff > 0 else "worse"

    def _affordable(self, evaluations: list[Evaluation]) -> bool:
        """Whether the budget allows the rollouts these evaluations would create; when it does
        not, the search stops (``stopped="budget"``)."""
        if self.cfg.max_rollouts is None:
            return True
        needed = self.run.count_new(evaluations)
        if self.run.rollouts_spent + needed <= self.cfg.max_rollouts:
            return True
        self.stopped = "budget"
        return False

    # -- step 3: promote ----------------------------------------------------------------------

    def _promote(self, number: int, best: Candidate, promotions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Move the promotion pointer to ``best`` (compare-and-set against where the run left it,
        so a move someone else made meanwhile is not overwritten: that raises PointerError),
        and ``{run}.best`` with it. Idempotent: a pointer already there is left alone."""
        registry = self.client.registry
        expected = promotions[-1]["to_id"] if promotions else self.run.state.get("start")["pointer_at"]
        current = registry.get_pointer(self.pointer)
        if current != best.resources_id:
            registry.set_pointer(self.pointer, best.resources_id, expected=expected, op=f"APO {self.run.name}")
            log.info("APO %s round %d: promoted %s to %r", self.run.name, number, best.resources_id, self.pointer)
        registry.set_pointer(self.best_pointer, best.resources_id, op=f"APO {self.run.name}")
        if promotions and promotions[-1]["to_id"] == best.resources_id:
            return promotions
        return [*promotions, asdict(Promotion(number, self.pointer, expected, best.resources_id,
                                               self.run.rollouts_spent))]


@dataclass(frozen=True)
class LineageStep:
    """One snapshot on a candidate's line of descent, with the edit that made it."""

    resources_id: str
    version: int
    template: str
    parent_id: str | None
    parent_version: int | None
    critique: str | None
    round: int
    run: str


def lineage(client: LightningClient, resources_id: str, version: int | None = None) -> list[LineageStep]:
    """How a candidate came to be: its own snapshot first, then the one it was edited from, and
    so on back to a run's copy of its start (whose parent is the snapshot the run started
    from; when that one was itself promoted by an earlier run, the line goes on into it).
    Read from the :class:`PromptLineage` each candidate snapshot holds."""
    steps: list[LineageStep] = []
    ref: str | None = resources_id
    seen: set[tuple[str, int | None]] = set()
    while ref is not None and (ref, version) not in seen:
        seen.add((ref, version))
        snapshot = client.get_resources_by_id(ref, version)
        record = next((r for r in snapshot.resources.values() if isinstance(r, PromptLineage)), None)
        if record is None:
            break
        template = snapshot.resources.get(record.prompt)
        steps.append(LineageStep(
            snapshot.resources_id, snapshot.version, template.template if isinstance(template, PromptTemplate) else "",
            record.parent_id, record.parent_version, record.critique, record.round, record.run,
        ))
        ref, version = record.parent_id, record.parent_version
    return steps
