"""The experiment statistics against scipy, textbook values, and simulations.

The simulations are vectorised with numpy (a few seconds in all) and seeded, so
their rates are reproducible; the README quotes the numbers they print
(``pytest tests/unit/test_stats.py -s``).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sp

from lightning_queue.experiments import stats
from lightning_queue.experiments.manager import bucket

# Student's sleep data (Cushny and Peebles 1905), R's `sleep`: extra hours of sleep under two drugs.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


# --------------------------------------------------------------------------- fixed-horizon tests


def test_welch_matches_the_textbook_sleep_example() -> None:
    # R: t.test(extra ~ group, data = sleep) -> t = -1.8608, df = 17.776, p = 0.07939,
    # 95% CI of group1 - group2: [-3.3654832, 0.2054832]. Ours is group2 - group1.
    w = stats.welch(SLEEP_1, SLEEP_2)
    assert w.t == pytest.approx(1.8608, abs=1e-4)
    assert w.df == pytest.approx(17.776, abs=1e-3)
    assert w.p_value == pytest.approx(0.07939, abs=1e-5)
    assert w.diff == pytest.approx(1.58)
    assert w.diff_ci == pytest.approx((-0.2054832, 3.3654832), abs=1e-6)


def test_welch_agrees_with_scipy_and_the_delta_method() -> None:
    rng = np.random.default_rng(3)
    c, t = rng.normal(10, 2, 200), rng.normal(10.5, 3, 150)
    w = stats.welch(c, t, alpha=0.1)
    ref = sp.ttest_ind(t, c, equal_var=False)
    assert w.p_value == pytest.approx(ref.pvalue) and w.t == pytest.approx(ref.statistic)
    assert w.diff_ci == pytest.approx(tuple(ref.confidence_interval(0.9)))
    # The relative lift and its delta-method standard error, written out.
    mc, mt = c.mean(), t.mean()
    se = np.sqrt(t.var(ddof=1) / len(t) / mc**2 + mt**2 * c.var(ddof=1) / len(c) / mc**4)
    assert w.lift == pytest.approx(mt / mc - 1)
    assert w.lift_ci == pytest.approx((w.lift - sp.norm.ppf(0.95) * se, w.lift + sp.norm.ppf(0.95) * se))


def test_welch_lift_is_undefined_over_a_zero_control_mean() -> None:
    w = stats.welch([1.0, -1.0, 0.0], [1.0, 2.0, 3.0])
    assert np.isnan(w.lift)
    with pytest.raises(ValueError, match="at least two"):
        stats.welch([1.0], [1.0, 2.0])


def test_paired_matches_the_textbook_sleep_example() -> None:
    # R: t.test(extra ~ group, data = sleep, paired = TRUE) -> t = -4.0621, df = 9, p = 0.002833,
    # mean difference -1.58, 95% CI [-2.4598858, -0.7001142]. Ours is group2 - group1.
    p = stats.paired(SLEEP_1, SLEEP_2)
    assert p.t == pytest.approx(4.0621, abs=1e-4)
    assert p.t_p_value == pytest.approx(0.002833, abs=1e-6)
    assert p.mean_diff == pytest.approx(1.58)
    assert p.diff_ci == pytest.approx((0.7001142, 2.4598858), abs=1e-6)
    ref = sp.wilcoxon(SLEEP_2, SLEEP_1)
    assert (p.wilcoxon_statistic, p.wilcoxon_p_value) == pytest.approx((ref.statistic, ref.pvalue))


def test_paired_with_no_differences_finds_nothing() -> None:
    p = stats.paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert p.t_p_value == 1.0 and p.wilcoxon_p_value == 1.0
    with pytest.raises(ValueError, match="same length"):
        stats.paired([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------- Bayesian


def test_prob_beats_normal_is_the_normal_cdf_of_the_standardised_difference() -> None:
    c, t = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.5]
    se = np.sqrt(np.var(c, ddof=1) / 4 + np.var(t, ddof=1) / 4)
    assert stats.prob_beats_normal(c, t) == pytest.approx(sp.norm.cdf((np.mean(t) - np.mean(c)) / se))
    assert stats.prob_beats_normal(t, c) == pytest.approx(1 - stats.prob_beats_normal(c, t))


def test_prob_beats_beta_against_known_values_and_sampling() -> None:
    # Equal counts: exactly one half by symmetry.
    assert stats.prob_beats_beta(30, 100, 30, 100) == pytest.approx(0.5, abs=1e-9)
    # Beta(2,1) vs Beta(1,2) (1/1 vs 0/1 successes): P(X > Y) = 5/6 in closed form.
    assert stats.prob_beats_beta(0, 1, 1, 1) == pytest.approx(5 / 6, abs=1e-9)
    rng = np.random.default_rng(0)
    draws_c, draws_t = rng.beta(1 + 40, 1 + 60, 400_000), rng.beta(1 + 52, 1 + 48, 400_000)
    assert stats.prob_beats_beta(40, 100, 52, 100) == pytest.approx((draws_t > draws_c).mean(), abs=3e-3)


# --------------------------------------------------------------------------- SRM


def test_srm_matches_mendels_peas() -> None:
    # Mendel's dihybrid cross, 315/108/101/32 against 9:3:3:1: chi2 = 0.470, p = 0.925 (the textbook values).
    check = stats.srm([315, 108, 101, 32], [9, 3, 3, 1])
    assert check.chi2 == pytest.approx(0.470, abs=1e-3)
    assert check.p_value == pytest.approx(0.925, abs=1e-3)
    assert not check.flagged


def test_srm_flags_a_skewed_split_and_not_a_fair_one() -> None:
    assert stats.srm([5_250, 4_750], [0.5, 0.5]).flagged  # 52.5/47.5 over 10,000 units: p ~ 6e-7
    assert not stats.srm([5_050, 4_950], [0.5, 0.5]).flagged  # p ~ 0.32
    assert stats.srm([900, 100], [0.8, 0.2]).flagged
    ref = sp.chisquare([900, 100], [800, 200])
    assert stats.srm([900, 100], [0.8, 0.2]).p_value == pytest.approx(ref.pvalue)


# --------------------------------------------------------------------------- sequential


def test_msprt_closed_form() -> None:
    # One look, diff 0.5, V = 0.01, tau2 = 0.04: ratio = sqrt(0.2) exp(0.04*0.25/(2*0.01*0.05)).
    ratio = np.sqrt(0.01 / 0.05) * np.exp(0.04 * 0.25 / (2 * 0.01 * 0.05))
    assert stats.msprt_p_values([0.5], [0.01], [0.04])[0] == pytest.approx(1 / ratio)
    assert stats.msprt_p_values([0.0], [0.01], [0.04])[0] == 1.0  # no evidence: capped at 1
    assert list(stats.always_valid(np.array([0.9, 0.2, 0.5, 0.1]))) == [0.9, 0.2, 0.2, 0.1]


EXPERIMENTS, LOOKS, BATCH = 2_000, 50, 20  # 2,000 experiments, a look after each batch of 20 per arm


def test_aa_false_positive_rate_with_peeking_stays_below_alpha() -> None:
    """2,000 A/A experiments, peeking after every one of 50 batches and stopping at the first
    p < 0.05: the always-valid p-value keeps the false-positive rate at or below alpha, while
    a Welch t-test peeked at the same way is far above it (the problem the mSPRT solves)."""
    rng = np.random.default_rng(20261124)
    alpha = 0.05
    for name, draw in (("normal", lambda: rng.normal(0.5, 0.2, (EXPERIMENTS, LOOKS, BATCH))),
                       ("binary", lambda: (rng.random((EXPERIMENTS, LOOKS, BATCH)) < 0.3).astype(float))):
        c, t = draw(), draw()
        p = stats.sequential_looks(c, t, min_sample=BATCH)
        rate = float((p[:, -1] < alpha).mean())
        # The naive alternative: Welch's t-test at every look.
        naive = np.zeros(EXPERIMENTS, bool)
        for k in range(1, LOOKS + 1):
            naive |= sp.ttest_ind(t[:, :k].reshape(EXPERIMENTS, -1), c[:, :k].reshape(EXPERIMENTS, -1), axis=1,
                                  equal_var=False).pvalue < alpha
        print(f"\nA/A {name}: sequential false-positive rate {rate:.4f} (alpha {alpha}); "
              f"Welch peeked {LOOKS} times: {naive.mean():.4f}")
        assert rate <= alpha
        assert naive.mean() > 2 * alpha  # peeking really does inflate a fixed-horizon test


def test_aa_false_positive_rate_of_a_lopsided_split_of_rare_failures() -> None:
    """A canary's situation: 10% of traffic in the treatment, a 5% failure rate, a look after
    each of 100 batches. A variance estimated from an arm that has not failed yet is 0; the
    test must not mistake that for certainty."""
    rng = np.random.default_rng(99)
    rates = {}
    for name, kc, kt in (("10/90", 18, 2), ("90/10", 2, 18), ("5/95", 19, 1)):
        c = (rng.random((EXPERIMENTS, 100, kc)) < 0.05).astype(float)
        t = (rng.random((EXPERIMENTS, 100, kt)) < 0.05).astype(float)
        rates[name] = float((stats.sequential_looks(c, t, min_sample=BATCH)[:, -1] < 0.05).mean())
    print(f"\nA/A lopsided, 5% failure rate, 100 looks: {rates}")
    assert all(rate <= 0.05 for rate in rates.values()), rates


def test_aa_false_positive_rate_of_the_sequential_paired_test() -> None:
    """2,000 paired A/A evaluations of 500 inputs with a shared per-input difficulty, the
    always-valid p-value read after every pair."""
    rng = np.random.default_rng(17)
    false_positives = 0
    for _ in range(EXPERIMENTS):
        difficulty = rng.normal(0, 1, 500)
        c, t = difficulty + rng.normal(0, 0.5, 500), difficulty + rng.normal(0, 0.5, 500)
        false_positives += stats.sequential_paired(c, t, min_sample=BATCH).p_value < 0.05
    rate = false_positives / EXPERIMENTS
    print(f"\nA/A paired, 500 pairs, a look after every pair: {rate:.4f}")
    assert rate <= 0.05


def test_sequential_power_on_a_known_effect() -> None:
    """A true effect of 0.2 standard deviations, up to 1,000 per arm: the sequential test
    finds it in most experiments, usually well before the end."""
    rng = np.random.default_rng(7)
    c = rng.normal(0.0, 1.0, (EXPERIMENTS, LOOKS, BATCH))
    t = rng.normal(0.2, 1.0, (EXPERIMENTS, LOOKS, BATCH))
    p = stats.sequential_looks(c, t, min_sample=BATCH)
    power = float((p[:, -1] < 0.05).mean())
    stopped = np.argmax(p < 0.05, axis=1)[p[:, -1] < 0.05]
    fixed = float((sp.ttest_ind(t.reshape(EXPERIMENTS, -1), c.reshape(EXPERIMENTS, -1), axis=1).pvalue < 0.05).mean())
    print(f"\npower, d=0.2, 1,000 per arm: sequential {power:.3f} (median stop after "
          f"{(np.median(stopped) + 1) * BATCH:.0f} per arm); fixed-horizon t-test {fixed:.3f}")
    assert power >= 0.8
    # The price of being free to stop at any look: a test run once, at the end, has more power.
    assert power <= fixed


def test_sequential_from_arrays_matches_the_vectorised_looks() -> None:
    rng = np.random.default_rng(11)
    c, t = rng.normal(0, 1, (1, 10, 5)), rng.normal(0.6, 1, (1, 10, 5))
    looks = stats.sequential_looks(c, t, min_sample=5)[0, -1]
    # The same observations, arriving one per arm at a time, looked at after every one.
    order = np.arange(50, dtype=float)
    single = stats.sequential(c.ravel(), t.ravel(), min_sample=5, control_order=order, treatment_order=order + 0.5)
    assert single.p_value <= looks + 1e-12  # looking more often can only lower the running minimum
    assert single.diff == pytest.approx(t.mean() - c.mean())


def _unit_split(n_inputs: int, seed: int) -> np.ndarray:
    # The unit-hash split an experiment makes: each input goes to one arm by its bucket.
    return np.array([bucket(f"power-{seed}", 1, str(i)) < 5_000 for i in range(n_inputs)])


def test_paired_beats_a_unit_split_on_a_small_evaluation_set() -> None:
    """30 inputs whose difficulty varies far more than the effect (sd 0.25 vs effect 0.1,
    noise 0.1). Same rollout budget (60): paired runs each input under both variants; the
    unit-hash split runs each input twice under its one variant. 1,000 simulated evaluations."""
    rng = np.random.default_rng(5)
    sims, n, effect = 1_000, 30, 0.1
    split = _unit_split(n, 0)
    difficulty = rng.normal(0.5, 0.25, (sims, n))

    def run(arm: int, repeats: int) -> np.ndarray:
        return difficulty[:, :, None] + effect * arm + rng.normal(0, 0.1, (sims, n, repeats))

    c, t = run(0, 1)[:, :, 0], run(1, 1)[:, :, 0]
    paired_t = (sp.ttest_rel(t, c, axis=1).pvalue < 0.05).mean()
    wilcoxon = (sp.wilcoxon(t, c, axis=1).pvalue < 0.05).mean()
    twice_c, twice_t = run(0, 2), run(1, 2)
    split_c = twice_c[:, ~split, :].reshape(sims, -1)
    split_t = twice_t[:, split, :].reshape(sims, -1)
    welch = (sp.ttest_ind(split_t, split_c, axis=1, equal_var=False).pvalue < 0.05).mean()
    seq_paired = np.mean([stats.sequential_paired(c[i], t[i]).p_value < 0.05 for i in range(sims)])
    print(f"\npower on 30 inputs, effect 0.1: paired t {paired_t:.3f}, Wilcoxon {wilcoxon:.3f}, "
          f"sequential paired {seq_paired:.3f}; unit-hash split (Welch) {welch:.3f}")
    assert paired_t > 0.9
    assert welch < 0.5
    assert paired_t > welch + 0.4
    assert seq_paired > welch
