"""The statistics of experiments: pure functions over arrays, built on scipy and numpy.

Nothing here touches Redis; :mod:`lightning_queue.experiments` feeds these
functions the rewards and outcomes it reads. Distributions come from
``scipy.stats``; nothing is hand-written but the closed forms that have no
scipy function (the mSPRT mixture likelihood ratio, the delta method).

What each test answers:

* :func:`welch` - is the treatment's mean different (two independent groups)?
  Difference, relative lift (delta-method interval) and Welch's t-test.
* :func:`paired` - the same inputs under both variants: paired t-test and
  Wilcoxon signed-rank on the per-input differences.
* :func:`prob_beats_normal` / :func:`prob_beats_beta` - the Bayesian chance the
  treatment beats the control (normal approximation of the means with a flat
  prior; Beta-Binomial with a uniform prior for success rates).
* :func:`srm` - sample-ratio mismatch: chi-square of the observed counts
  against the configured weights, flagged at p < 0.001.
* :func:`msprt_p_values` / :func:`sequential` / :func:`sequential_paired` -
  always-valid p-values (mSPRT with a normal mixture, Johari, Pekelis and
  Walsh 2017), so an algorithm may look after every batch and stop as soon as
  p < alpha without inflating its false-positive rate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import integrate, stats

ArrayLike = Sequence[float] | np.ndarray

SRM_THRESHOLD = 0.001
"""An SRM check is flagged below this p-value (the convention of experimentation platforms)."""

DEFAULT_TAU = 0.5
"""mSPRT mixing standard deviation, in units of the outcome's standard deviation: the
effect sizes (standardised) the sequential test is most sensitive to. Any value keeps
the test valid; it only moves where its power is."""


_TINY = 1e-12


def _arr(values: ArrayLike) -> np.ndarray:
    return np.asarray(values, dtype=float)


# ----------------------------------------------------------------------------- fixed-horizon tests


@dataclass(frozen=True)
class Welch:
    """Treatment minus control, two independent groups (Welch's t-test, unequal variances).

    ``lift`` is the relative difference ``diff / control_mean`` with a
    delta-method interval (``nan`` when the control mean is 0).
    """

    control_mean: float
    treatment_mean: float
    diff: float
    diff_ci: tuple[float, float]
    lift: float
    lift_ci: tuple[float, float]
    t: float
    df: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def welch(control: ArrayLike, treatment: ArrayLike, alpha: float = 0.05) -> Welch:
    """Welch's t-test of ``treatment - control`` with its ``1 - alpha`` interval.

    Each group needs at least two values (``ValueError`` otherwise).
    """
    c, t = _arr(control), _arr(treatment)
    if len(c) < 2 or len(t) < 2:
        raise ValueError("Welch's t-test needs at least two values in each group")
    with warnings.catch_warnings():
        # Constant rewards (a deterministic agent) make scipy warn about precision; the
        # statistic it returns (inf or nan) is still the right answer for such data.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(t, c, equal_var=False)
        ci = result.confidence_interval(1 - alpha)
    mc, mt = float(c.mean()), float(t.mean())
    diff = mt - mc
    # Delta method for (mt - mc) / mc = mt/mc - 1: var ~ var(mt)/mc^2 + mt^2 var(mc)/mc^4.
    var_mc, var_mt = c.var(ddof=1) / len(c), t.var(ddof=1) / len(t)
    if mc != 0:
        lift = diff / mc
        se = float(np.sqrt(var_mt / mc**2 + mt**2 * var_mc / mc**4))
        z = float(stats.norm.ppf(1 - alpha / 2))
        lift_ci = (lift - z * se, lift + z * se)
    else:
        lift, lift_ci = float("nan"), (float("nan"), float("nan"))
    return Welch(mc, mt, diff, (float(ci.low), float(ci.high)), lift, lift_ci, float(result.statistic),
                 float(result.df), float(result.pvalue))


@dataclass(frozen=True)
class Paired:
    """Treatment minus control on the same inputs (``n`` pairs)."""

    n: int
    mean_diff: float
    diff_ci: tuple[float, float]
    t: float
    t_p_value: float
    wilcoxon_statistic: float
    wilcoxon_p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(control: ArrayLike, treatment: ArrayLike, alpha: float = 0.05) -> Paired:
    """Paired t-test and Wilcoxon signed-rank test of ``treatment[i] - control[i]``.

    ``control[i]`` and ``treatment[i]`` must come from the same input. When every
    difference is zero both p-values are 1 (there is nothing to detect).
    """
    c, t = _arr(control), _arr(treatment)
    if len(c) != len(t):
        raise ValueError(f"paired samples must have the same length, got {len(c)} and {len(t)}")
    if len(c) < 2:
        raise ValueError("a paired test needs at least two pairs")
    d = t - c
    if np.all(d == 0):
        return Paired(len(d), 0.0, (0.0, 0.0), 0.0, 1.0, 0.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # as in welch(): constant differences
        result = stats.ttest_rel(t, c)
        ci = result.confidence_interval(1 - alpha)
        w = stats.wilcoxon(t, c)
    return Paired(len(d), float(d.mean()), (float(ci.low), float(ci.high)), float(result.statistic),
                  float(result.pvalue), float(w.statistic), float(w.pvalue))


# ----------------------------------------------------------------------------- Bayesian


def prob_beats_normal(control: ArrayLike, treatment: ArrayLike) -> float:
    """P(treatment mean > control mean) under a flat prior and the normal approximation
    of each mean: ``Phi(diff / se)`` with Welch's standard error."""
    c, t = _arr(control), _arr(treatment)
    se = float(np.sqrt(c.var(ddof=1) / len(c) + t.var(ddof=1) / len(t)))
    diff = float(t.mean() - c.mean())
    if se == 0:
        return 0.5 if diff == 0 else float(diff > 0)
    return float(stats.norm.cdf(diff / se))


def prob_beats_beta(control_successes: int, control_n: int, treatment_successes: int, treatment_n: int) -> float:
    """P(treatment success rate > control's), Beta-Binomial with uniform Beta(1, 1) priors.

    Computed exactly (numerical integration of ``f_t(x) * F_c(x)``), not by sampling,
    so the same counts always give the same answer.
    """
    pc = stats.beta(1 + control_successes, 1 + control_n - control_successes)
    pt = stats.beta(1 + treatment_successes, 1 + treatment_n - treatment_successes)
    value, _ = integrate.quad(lambda x: pt.pdf(x) * pc.cdf(x), 0, 1, limit=200)
    return float(min(1.0, max(0.0, value)))


# ----------------------------------------------------------------------------- SRM


@dataclass(frozen=True)
class SampleRatio:
    observed: list[int]
    expected: list[float]
    chi2: float
    p_value: float
    flagged: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def srm(counts: Sequence[int], weights: Sequence[float], threshold: float = SRM_THRESHOLD) -> SampleRatio:
    """Chi-square goodness of fit of the observed ``counts`` to the configured ``weights``
    (normalised); ``flagged`` when p < ``threshold``: the assignment or the logging is
    broken and no comparison of these groups can be trusted."""
    observed = np.asarray(counts, dtype=float)
    w = np.asarray(weights, dtype=float)
    if len(observed) != len(w) or len(w) < 2:
        raise ValueError("srm needs one count per weight, at least two")
    total = observed.sum()
    expected = w / w.sum() * total
    if total == 0:
        return SampleRatio([int(x) for x in observed], expected.tolist(), 0.0, 1.0, False)
    result = stats.chisquare(observed, expected)
    p = float(result.pvalue)
    return SampleRatio([int(x) for x in observed], expected.tolist(), float(result.statistic), p, p < threshold)


# ----------------------------------------------------------------------------- sequential (mSPRT)


def msprt_p_values(diff: ArrayLike, variance: ArrayLike, tau2: ArrayLike) -> np.ndarray:
    """One mSPRT p-value per look (not yet made monotone), elementwise over arrays.

    ``diff`` is the estimate of the effect at each look, ``variance`` its
    variance (e.g. ``s_c^2/n_c + s_t^2/n_t``), ``tau2`` the variance of the
    normal mixture over the effect. The mixture likelihood ratio against
    "no effect" is ``sqrt(V/(V+tau2)) * exp(tau2 diff^2 / (2 V (V+tau2)))``;
    the p-value is ``min(1, 1/ratio)``. Take the running minimum over looks
    (:func:`always_valid`) for the always-valid p-value.
    """
    d, v, t2 = _arr(diff), _arr(variance), _arr(tau2)
    # Constant outcomes (every reward 1 in one arm, 0 in the other) have zero variance: floor it,
    # so a difference is overwhelming evidence and no difference none, instead of 0/0.
    v, t2 = np.maximum(v, _TINY), np.maximum(t2, _TINY)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_ratio = 0.5 * np.log(v / (v + t2)) + t2 * d**2 / (2 * v * (v + t2))
        p = np.exp(-np.maximum(log_ratio, 0.0))
    return np.where(np.isfinite(p), p, 1.0)


def always_valid(p_values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The running minimum along ``axis``: the always-valid p-value at each look."""
    return np.minimum.accumulate(p_values, axis=axis)


def _cumulative_moments(x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = np.cumsum(np.ones_like(x), axis=axis)
    s = np.cumsum(x, axis=axis)
    ss = np.cumsum(x * x, axis=axis)
    mean = s / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.maximum(ss - n * mean**2, 0.0) / (n - 1)
    return n, mean, var


def _two_sample_variance(
    nc: np.ndarray, vc: np.ndarray, nt: np.ndarray, vt: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The variance of the difference of means, and the pooled per-observation variance.

    The larger of Welch's ``vc/nc + vt/nt`` and the pooled ``s^2 (1/nc + 1/nt)``:
    Welch's alone fails when a small arm has seen no variation yet (a canary arm
    with no failure so far has variance 0, which made 30% of A/A tests of a 5%
    failure rate at a 10/90 split "significant"); the pooled one alone fails when
    the small arm is the noisier one. The larger is valid in both cases.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = ((nc - 1) * vc + (nt - 1) * vt) / (nc + nt - 2)
        return np.maximum(vc / nc + vt / nt, pooled * (1 / nc + 1 / nt)), pooled


def sequential_looks(
    control: np.ndarray, treatment: np.ndarray, tau: float = DEFAULT_TAU, min_sample: int = 2
) -> np.ndarray:
    """Always-valid p-values after each of ``k`` looks, for two groups observed together.

    ``control`` and ``treatment`` have shape ``(..., k, batch)``: look ``i``
    sees every batch up to ``i``. Vectorised over any leading axes (e.g. 1,000
    simulated experiments at once). Variances are the sample variances so far
    (plug-in); looks before ``min_sample`` values per group report p = 1.
    """
    shape = control.shape[:-2]
    c = control.reshape(*shape, -1)
    t = treatment.reshape(*shape, -1)
    nc, mc, vc = _cumulative_moments(c)
    nt, mt, vt = _cumulative_moments(t)
    kc, kt = control.shape[-1], treatment.shape[-1]
    at_c = np.arange(1, control.shape[-2] + 1) * kc - 1
    at_t = np.arange(1, treatment.shape[-2] + 1) * kt - 1
    nc, mc, vc = nc[..., at_c], mc[..., at_c], vc[..., at_c]
    nt, mt, vt = nt[..., at_t], mt[..., at_t], vt[..., at_t]
    variance, pooled = _two_sample_variance(nc, vc, nt, vt)
    p = msprt_p_values(mt - mc, variance, tau**2 * pooled)
    p = np.where((nc >= min_sample) & (nt >= min_sample), p, 1.0)
    return always_valid(p)


@dataclass(frozen=True)
class Sequential:
    """The always-valid p-value after the last observation, with the estimate then."""

    n_control: int
    n_treatment: int
    diff: float
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sequential(
    control: ArrayLike, treatment: ArrayLike, tau: float = DEFAULT_TAU, min_sample: int = 2,
    control_order: ArrayLike | None = None, treatment_order: ArrayLike | None = None,
) -> Sequential:
    """Two independent groups, observed in the order given by ``*_order`` (e.g. end
    times; default: the order of the arrays, control and treatment interleaved by
    rank). The p-value is the minimum over every prefix of the merged stream, i.e.
    as if someone had looked after every single observation, which is what keeps it
    valid however often the caller actually looks."""
    c, t = _arr(control), _arr(treatment)
    oc = _arr(control_order) if control_order is not None else np.arange(len(c)) / max(1, len(c))
    ot = _arr(treatment_order) if treatment_order is not None else np.arange(len(t)) / max(1, len(t))
    values = np.concatenate([c, t])
    is_t = np.concatenate([np.zeros(len(c), bool), np.ones(len(t), bool)])
    order = np.argsort(np.concatenate([oc, ot]), kind="stable")
    values, is_t = values[order], is_t[order]
    nt = np.cumsum(is_t)
    nc = np.cumsum(~is_t)

    def moments(mask: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.where(mask, values, 0.0)
        s, ss = np.cumsum(x), np.cumsum(x * x)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = s / n
            var = np.maximum(ss - n * mean**2, 0.0) / (n - 1)
        return mean, var

    mc, vc = moments(~is_t, nc)
    mt, vt = moments(is_t, nt)
    with np.errstate(invalid="ignore", divide="ignore"):
        variance, pooled = _two_sample_variance(nc, vc, nt, vt)
        p = msprt_p_values(mt - mc, variance, tau**2 * pooled)
    p = np.where((nc >= min_sample) & (nt >= min_sample), p, 1.0)
    final = float(always_valid(p)[-1]) if len(p) else 1.0
    diff = float(t.mean() - c.mean()) if len(c) and len(t) else float("nan")
    return Sequential(len(c), len(t), diff, final)


def sequential_paired(
    control: ArrayLike, treatment: ArrayLike, tau: float = DEFAULT_TAU, min_sample: int = 2
) -> Sequential:
    """Pairs observed in the order given: the one-sample mSPRT on the differences
    ``treatment[i] - control[i]`` (variance ``s_d^2 / n``), minimum over every prefix."""
    c, t = _arr(control), _arr(treatment)
    if len(c) != len(t):
        raise ValueError(f"paired samples must have the same length, got {len(c)} and {len(t)}")
    d = t - c
    if len(d) == 0:
        return Sequential(0, 0, float("nan"), 1.0)
    n, mean, var = _cumulative_moments(d)
    p = msprt_p_values(mean, var / n, tau**2 * var)
    p = np.where(n >= max(2, min_sample), p, 1.0)
    return Sequential(len(c), len(t), float(d.mean()), float(always_valid(p)[-1]))
