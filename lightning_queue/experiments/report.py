"""An experiment's report: per-variant metrics, comparisons with the control, a table, JSON, a chart.

Built by :meth:`lightning_queue.experiments.Experiments.report` from the
experiment's own rollout index (no scan of the store). Metrics count what
finished: rewards are those of succeeded rollouts that reported one; failed
rollouts count in the success rate and in ``errors`` by type, never as a zero
reward; cancelled ones are left out of both.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from lightning_queue.core.models import Rollout
from lightning_queue.experiments import stats
from lightning_queue.experiments.model import Experiment

MAX_REGRESSIONS = 20
"""At most this many inputs are listed as worse under a treatment (the worst first)."""


@dataclass(frozen=True)
class SnapshotRun:
    """A concrete snapshot version a variant's rollouts ran with (their records' ``ran_resources_id`` and
    ``ran_resources_version``): a variant names a pointer or id, and a pointer may move during an
    experiment (after a promotion ``prod`` names another snapshot)."""

    resources_id: str
    version: int
    rollouts: int
    """Finished rollouts of the variant whose last attempt ran with it."""


@dataclass(frozen=True)
class Regression:
    """An input (a paired experiment's unit) whose mean reward is lower under the treatment."""

    unit: str
    control: float
    treatment: float

    @property
    def delta(self) -> float:
        return self.treatment - self.control

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "control": self.control, "treatment": self.treatment, "delta": self.delta}


@dataclass(frozen=True)
class VariantStats:
    """How one variant went."""

    name: str
    resources_id: str
    weight: float
    units: int
    rollouts: int
    finished: int
    succeeded: int
    failed: int
    success_rate: float | None
    mean_reward: float | None
    std_reward: float | None
    reward_ci: tuple[float, float] | None
    latency_p50: float | None
    latency_p95: float | None
    errors: dict[str, int]
    rewards: list[float] = field(repr=False, default_factory=list)
    ran: list[SnapshotRun] = field(default_factory=list)
    """The snapshot versions its finished rollouts ran with, most rollouts first."""

    def to_dict(self) -> dict[str, Any]:
        # Not asdict(): it would deep-copy every reward only to drop them.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rewards"} | {
            "errors": dict(self.errors), "ran": [asdict(r) for r in self.ran]}


@dataclass(frozen=True)
class Comparison:
    """One treatment against the control.

    ``verdict`` rests on the sequential (always-valid) test, so it may be read
    after every batch: ``too few: n/min`` below ``min_sample`` rewards in the
    smaller variant (pairs, for a paired experiment), then ``better``/``worse`` when
    the always-valid p-value is below alpha, else ``no significant difference``.
    """

    variant: str
    control: str
    welch: stats.Welch | None
    paired: stats.Paired | None
    sequential: stats.Sequential | None
    prob_beats: float | None
    prob_success_beats: float | None
    verdict: str
    regressions: list[Regression] = field(default_factory=list)
    """Paired experiments: the inputs whose mean reward is lower under the treatment than under the
    control, the worst (most negative ``delta``) first, at most :data:`MAX_REGRESSIONS`."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant, "control": self.control, "verdict": self.verdict,
            "regressions": [r.to_dict() for r in self.regressions],
            "welch": self.welch.to_dict() if self.welch else None,
            "paired": self.paired.to_dict() if self.paired else None,
            "sequential": self.sequential.to_dict() if self.sequential else None,
            "prob_beats": self.prob_beats, "prob_success_beats": self.prob_success_beats,
        }


@dataclass(frozen=True)
class ExperimentReport:
    experiment: Experiment
    variants: list[VariantStats]
    comparisons: list[Comparison]
    srm: stats.SampleRatio | None
    alpha: float
    min_sample: int

    @property
    def winner(self) -> str | None:
        """The treatment the sequential test finds better than the control (the best
        mean reward among several), or ``None``."""
        better = [c.variant for c in self.comparisons if c.verdict == "better"]
        if not better:
            return None
        by_name = {v.name: v for v in self.variants}
        return max(better, key=lambda n: by_name[n].mean_reward or float("-inf"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment.model_dump(mode="json"),
            "variants": [v.to_dict() for v in self.variants],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "srm": self.srm.to_dict() if self.srm else None,
            "alpha": self.alpha, "min_sample": self.min_sample, "winner": self.winner,
        }

    def to_json(self) -> str:
        return json.dumps(finite_json(self.to_dict()), indent=2, default=_json_default)

    def tables(self) -> list[Any]:
        """Rich tables: the variants, then the comparisons."""
        from rich.table import Table

        exp = self.experiment
        reassigned = ", reassigned: no SRM check" if exp.reassigned else ""
        kind = "paired" if exp.paired else f"unit {exp.unit_key}{reassigned}"
        variants = Table(title=f"experiment {exp.name} ({exp.status}, {kind}, bucket v{exp.bucket_version})")
        variants.add_column("variant", no_wrap=True)
        for column in ("resources_id", "weight", "units", "rollouts", "success", "reward mean [95% CI]", "std",
                       "p50/p95 s", "errors"):
            variants.add_column(column)
        for v in self.variants:
            reward = _num(v.mean_reward) + (f" [{v.reward_ci[0]:.3f}, {v.reward_ci[1]:.3f}]" if v.reward_ci else "")
            latency = f"{v.latency_p50:.2f}/{v.latency_p95:.2f}" if v.latency_p50 is not None else ""
            variants.add_row(
                v.name, v.resources_id, "" if exp.paired else f"{v.weight:g}", str(v.units), str(v.rollouts),
                _pct(v.success_rate), reward, _num(v.std_reward), latency,
                ", ".join(f"{t}:{n}" for t, n in sorted(v.errors.items())),
            )
        comparisons = Table(title=f"against control {exp.control.name} (alpha {self.alpha:g})")
        comparisons.add_column("variant", no_wrap=True)
        comparisons.add_column("verdict", no_wrap=True)
        tests = ("p paired t", "p Wilcoxon") if exp.paired else ("lift", "p Welch", "P(beats)")
        for column in ("diff [95% CI]", "p sequential", *tests):
            comparisons.add_column(column)
        for c in self.comparisons:
            w, p, s = c.welch, c.paired, c.sequential
            diff, ci = (p.mean_diff, p.diff_ci) if p else ((w.diff, w.diff_ci) if w else (None, None))
            cells = [_num(diff) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""), _p(s.p_value if s else None)]
            if exp.paired:
                cells += [_p(p.t_p_value if p else None), _p(p.wilcoxon_p_value if p else None)]
            else:
                cells += [_pct(w.lift) if w else "", _p(w.p_value if w else None), _pct(c.prob_beats)]
            comparisons.add_row(c.variant, c.verdict, *cells)
        ran = Table(title="the snapshot versions each variant ran (what its reference named when each rollout "
                    "started)")
        for column in ("variant", "resources_id", "version", "rollouts"):
            ran.add_column(column)
        for v in self.variants:
            for run in v.ran:
                ran.add_row(v.name, run.resources_id, str(run.version), str(run.rollouts))
        out = [variants, ran, comparisons]
        for c in self.comparisons:
            if c.regressions:
                worse = Table(title=f"inputs worse under {c.variant} than under {c.control} (worst first, "
                              f"at most {MAX_REGRESSIONS})")
                for column in ("input", c.control, c.variant, "delta"):
                    worse.add_column(column)
                for r in c.regressions:
                    worse.add_row(r.unit, f"{r.control:.3f}", f"{r.treatment:.3f}", f"{r.delta:+.3f}")
                out.append(worse)
        if self.srm is not None:
            srm = Table(title="sample ratio (units vs weights)")
            for column in ("observed", "expected", "chi2", "p", ""):
                srm.add_column(column)
            skewed = "[bold red]SRM: assignment is skewed, do not trust the comparison[/]"
            verdict = skewed if self.srm.flagged else "ok"
            srm.add_row(" / ".join(map(str, self.srm.observed)), " / ".join(f"{e:.1f}" for e in self.srm.expected),
                        f"{self.srm.chi2:.2f}", _p(self.srm.p_value), verdict)
            out.append(srm)
        return out

    def save_chart(self, path: str | Path) -> Path:
        """A PNG of each variant's reward distribution (points and box) with its mean and 95% interval."""
        import matplotlib

        matplotlib.use("Agg")  # no display: reports are made on servers and in tests
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(self.variants), 4.2))
        try:
            rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
            for i, v in enumerate(self.variants):
                if v.rewards:
                    ax.boxplot([v.rewards], positions=[i], widths=0.5, showfliers=False)
                    ax.scatter(i + rng.uniform(-0.15, 0.15, len(v.rewards)), v.rewards, s=8, alpha=0.35)
                if v.mean_reward is not None and v.reward_ci is not None:
                    ax.errorbar([i + 0.3], [v.mean_reward], yerr=[[v.mean_reward - v.reward_ci[0]],
                                [v.reward_ci[1] - v.mean_reward]], fmt="o", color="black", capsize=5)
            ax.set_xticks(range(len(self.variants)), [f"{v.name}\n(n={len(v.rewards)})" for v in self.variants])
            ax.set_ylabel("reward")
            ax.set_title(f"{self.experiment.name}: reward by variant (mean and 95% CI)")
            fig.tight_layout()
            fig.savefig(path, format="png", dpi=100)
        finally:
            plt.close(fig)
        return path


@dataclass(frozen=True)
class Outcomes:
    """What one variant's rollouts came to, in columns: the input of every statistic.

    Made from the rollout records (:func:`outcomes_of`) or from the aggregates the store keeps
    per variant (:meth:`lightning_queue.experiments.Experiments.live_report`); the report is
    built the same way from either. ``rewards`` and ``reward_times`` (end times) are in the
    order the rollouts finished, as the sequential test sees them; ``unit_rewards`` maps each
    unit to its mean reward and its last rollout's end time (paired comparisons).
    """

    rollouts: int
    finished: int
    succeeded: int
    errors: dict[str, int]
    rewards: np.ndarray
    reward_times: np.ndarray
    latencies: np.ndarray
    unit_rewards: dict[str, tuple[float, float]]
    ran: dict[tuple[str, int], int] = field(default_factory=dict)
    """Finished rollouts per ``(resources_id, version)`` their last attempt ran with."""


def outcomes_of(rollouts: list[Rollout]) -> Outcomes:
    """The :class:`Outcomes` of these rollout records."""
    finished = [r for r in rollouts if r.status in ("succeeded", "failed")]
    rewarded = sorted(rewards_of(rollouts), key=lambda r: r.end_time or 0.0)
    groups: dict[str, list[Rollout]] = defaultdict(list)
    for r in rewarded:
        groups[str(r.metadata.get("unit"))].append(r)
    return Outcomes(
        rollouts=len(rollouts),
        finished=len(finished),
        succeeded=sum(r.status == "succeeded" for r in finished),
        errors=dict(Counter(r.error.type for r in finished if r.status == "failed" and r.error)),
        rewards=np.asarray([r.reward for r in rewarded], dtype=float),
        reward_times=np.asarray([r.end_time or 0.0 for r in rewarded], dtype=float),
        latencies=np.asarray([r.end_time - r.start_time for r in finished if r.start_time and r.end_time], dtype=float),
        unit_rewards={u: (float(np.mean([r.reward for r in rs])), max(r.end_time or 0.0 for r in rs))
                      for u, rs in groups.items()},
        ran=dict(Counter((r.ran_resources_id, r.ran_resources_version) for r in rollouts if r.is_finished
                         and r.ran_resources_id is not None and r.ran_resources_version is not None)),
    )


def outcomes_from_tally(
    rollouts: int, tally: dict[str, str], rewards: str, unit_rewards: dict[str, str]
) -> Outcomes:
    """The :class:`Outcomes` of a variant from the aggregates the store keeps for it (see
    ``lua/_experiment_tally.lua``): its tally hash, its rewards lines and its per-unit rewards."""
    ran = {}
    for name, n in tally.items():
        if name.startswith("ran:"):  # "ran:{version}:{resources_id}"
            version, _, resources_id = name.removeprefix("ran:").partition(":")
            ran[(resources_id, int(version))] = int(n)
    values = np.array(rewards.split(), dtype=float).reshape(-1, 3) if rewards else np.empty((0, 3))
    rewarded = ~np.isnan(values[:, 1])
    latencies = values[:, 2]
    units = {}
    for unit, held in unit_rewards.items():
        count, total, last = held.split()
        units[unit] = (float(total) / int(count), float(last))
    return Outcomes(
        rollouts=rollouts,
        finished=int(tally.get("finished", 0)),
        succeeded=int(tally.get("succeeded", 0)),
        errors={k.removeprefix("error:"): int(v) for k, v in tally.items() if k.startswith("error:")},
        rewards=values[rewarded, 1],
        reward_times=values[rewarded, 0],
        latencies=latencies[~np.isnan(latencies)],
        unit_rewards=units,
        ran=ran,
    )


def build_report(
    exp: Experiment, rollouts: dict[str, list[Rollout]], units: dict[str, int], *, alpha: float = 0.05,
    min_sample: int = 30,
) -> ExperimentReport:
    """The report of these rollout records (each variant's, by name)."""
    outcomes = {name: outcomes_of(rs) for name, rs in rollouts.items()}
    return report_from_outcomes(exp, outcomes, units, alpha=alpha, min_sample=min_sample)


def report_from_outcomes(
    exp: Experiment, outcomes: dict[str, Outcomes], units: dict[str, int], *, alpha: float = 0.05,
    min_sample: int = 30,
) -> ExperimentReport:
    """The report of each variant's :class:`Outcomes` (by name) and unit count."""
    variants = [_variant_stats(exp, v.name, outcomes[v.name], units[v.name], alpha) for v in exp.variants]
    control = variants[0]
    comparisons = [_compare(exp, control, v, outcomes, alpha, min_sample) for v in variants[1:]]
    check = None
    # A paired split is equal by construction; after a weight change or a re-bucketing the
    # counts mix several splits, so no single set of weights is the one to test against.
    if not exp.paired and not exp.reassigned and sum(v.units for v in variants) > 0:
        check = stats.srm([v.units for v in variants], [v.weight for v in variants])
    return ExperimentReport(exp, variants, comparisons, check, alpha, min_sample)


def rewards_of(rollouts: list[Rollout]) -> list[Rollout]:
    """The rollouts whose reward counts: succeeded, with a reward."""
    return [r for r in rollouts if r.status == "succeeded" and r.reward is not None]


def reward_interval(rewards: np.ndarray, alpha: float) -> tuple[float, float] | None:
    """The ``1 - alpha`` t-interval of the mean of ``rewards`` (None below two values)."""
    if len(rewards) < 2:
        return None
    mean, std = float(rewards.mean()), float(rewards.std(ddof=1))
    if not std:
        return (mean, mean)
    from scipy import stats as st

    low, high = st.t.interval(1 - alpha, len(rewards) - 1, loc=mean, scale=std / np.sqrt(len(rewards)))
    return (float(low), float(high))


def reward_trajectory(outcomes: Outcomes, alpha: float, points: int = 60) -> list[dict[str, Any]]:
    """The mean reward and its interval as they stood after each of up to ``points`` evenly
    spaced counts of rewards (in finishing order): what a chart of the variant over time shows.
    Each interval is :func:`reward_interval`'s, computed for all the counts at once."""
    from scipy import stats as st

    rewards = outcomes.rewards
    n = len(rewards)
    if n == 0:
        return []
    counts = np.unique(np.linspace(1, n, min(points, n)).round().astype(int))
    sums, squares = np.cumsum(rewards)[counts - 1], np.cumsum(rewards * rewards)[counts - 1]
    means = sums / counts
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.sqrt(np.maximum(squares - counts * means**2, 0.0) / (counts - 1))
        half = st.t.ppf(1 - alpha / 2, counts - 1) * std / np.sqrt(counts)
    half = np.where(std > 1e-12 * np.maximum(1.0, np.abs(means)), half, 0.0)  # constant so far: no width
    return [{"n": int(c), "time": float(outcomes.reward_times[c - 1]), "mean": float(m),
             "ci": [float(m - h), float(m + h)] if c > 1 else None}
            for c, m, h in zip(counts, means, half, strict=True)]


def _variant_stats(exp: Experiment, name: str, outcomes: Outcomes, units: int, alpha: float) -> VariantStats:
    variant = exp.variant(name)
    arr = outcomes.rewards
    mean = float(arr.mean()) if len(arr) else None
    std = float(arr.std(ddof=1)) if len(arr) > 1 else None
    latencies = outcomes.latencies
    finished, succeeded = outcomes.finished, outcomes.succeeded
    return VariantStats(
        name, variant.resources_id, variant.weight, units, outcomes.rollouts, finished, succeeded,
        finished - succeeded, succeeded / finished if finished else None, mean, std, reward_interval(arr, alpha),
        float(np.percentile(latencies, 50)) if len(latencies) else None,
        float(np.percentile(latencies, 95)) if len(latencies) else None, dict(outcomes.errors), arr.tolist(),
        [SnapshotRun(rid, version, n) for (rid, version), n in sorted(outcomes.ran.items(),
                                                                     key=lambda item: (-item[1], item[0]))],
    )


def _pairs(control: Outcomes, treatment: Outcomes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per unit, the mean reward under each variant; units with both, ordered by when
    their last rollout finished (the order a sequential test sees them in)."""
    c, t = control.unit_rewards, treatment.unit_rewards
    common = sorted(set(c) & set(t), key=lambda u: (max(c[u][1], t[u][1]), u))
    return (np.asarray([c[u][0] for u in common]), np.asarray([t[u][0] for u in common]),
            np.asarray([max(c[u][1], t[u][1]) for u in common]))


def regressions(control: Outcomes, treatment: Outcomes, limit: int = MAX_REGRESSIONS) -> list[Regression]:
    """The units (inputs) rewarded under both variants whose mean reward is lower under the treatment,
    the worst first (ties by unit), at most ``limit``."""
    c, t = control.unit_rewards, treatment.unit_rewards
    worse = [Regression(u, c[u][0], t[u][0]) for u in set(c) & set(t) if t[u][0] < c[u][0]]
    return sorted(worse, key=lambda r: (r.delta, r.unit))[:limit]


def _compare(exp: Experiment, control: VariantStats, treatment: VariantStats, outcomes: dict[str, Outcomes],
             alpha: float, min_sample: int) -> Comparison:
    c_out, t_out = outcomes[control.name], outcomes[treatment.name]
    prob_success = None
    if control.finished and treatment.finished:
        prob_success = stats.prob_beats_beta(control.succeeded, control.finished, treatment.succeeded,
                                             treatment.finished)
    welch = prob = paired = sequential = None
    c, t = c_out.rewards, t_out.rewards
    if len(c) >= 2 and len(t) >= 2:
        welch = stats.welch(c, t, alpha)
        prob = stats.prob_beats_normal(c, t)
    if exp.paired:
        pc, pt, _ = _pairs(c_out, t_out)
        n = len(pc)
        if n >= 2:
            paired = stats.paired(pc, pt, alpha)
            sequential = stats.sequential_paired(pc, pt)
    else:
        n = min(len(c), len(t))
        if n >= 2:
            sequential = stats.sequential(c, t, control_order=c_out.reward_times, treatment_order=t_out.reward_times)
    if n < min_sample or sequential is None:
        verdict = f"too few: {n}/{min_sample}"
    elif sequential.p_value < alpha:
        verdict = "better" if sequential.diff > 0 else "worse"
    else:
        verdict = "no significant difference"
    worse = regressions(c_out, t_out) if exp.paired else []
    return Comparison(treatment.name, control.name, welch, paired, sequential, prob, prob_success, verdict, worse)


def finite_json(value: Any) -> Any:
    """``value`` with every NaN and infinity (at any depth) made None, so it can be written as JSON."""
    # NaN and infinity are not JSON: an undefined statistic (a lift over a zero mean) is null.
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _num(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "" if value is None or not np.isfinite(value) else f"{value:.1%}"


def _p(value: float | None) -> str:
    return "" if value is None else (f"{value:.4f}" if value >= 1e-4 else f"{value:.1e}")
