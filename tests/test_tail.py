"""Tail probes for the speculative strategy (issue 16): the maths on hand-built numbers (known
answers), and the probed distribution: exact with every candidate, consistent in the draws.
The decoder and the statistical test are in test_tail_decoder.py."""

import math

import pytest
import torch

from blackbox_proxy.maths import tail as tails

LOG = math.log


# ----- known answers ---------------------------------------------------------------------------------


def test_tail_bound_fills_the_highest_weights_at_the_cap():
    w = torch.tensor([1.0, 10.0, 3.0, 0.5])
    assert tails.tail_bound(w, 0.25, 0.1) == pytest.approx(0.1 * 10 + 0.1 * 3 + 0.05 * 1)
    assert tails.tail_bound(w, 0.25, 0.3) == pytest.approx(0.25 * 10)  # one token may hold it all
    assert tails.tail_bound(w, 0.0, 0.1) == 0.0  # k = the vocabulary: nothing outside
    assert tails.tail_bound(w, 0.9, 0.1) == pytest.approx(0.9 * 10)  # inconsistent cap: the loose bound
    # the bound is attained: p = (.1, .1, .05) on w = (10, 3, 1) sums to exactly that
    assert float(torch.tensor([0.1, 0.1, 0.05]) @ torch.tensor([10.0, 3.0, 1.0])) == pytest.approx(1.35)


def test_tail_view_bounds_and_clipping():
    lp = torch.tensor([LOG(0.6), LOG(0.3)], dtype=torch.float64)
    lw = torch.tensor([0.0, LOG(2.0)], dtype=torch.float64)  # Z_C = 0.6 + 0.6 = 1.2
    view = tails.tail_view(lp, lw, torch.tensor([LOG(4.0), 0.0, LOG(0.5)], dtype=torch.float64), p_cap=0.3)
    # T = 0.1 fits on the highest tail weight: B = 0.1 * 4
    assert (view.z_c, view.tail_mass, view.bound) == pytest.approx((1.2, 0.1, 0.4))
    assert not view.settled and math.exp(view.log_z_hi) == pytest.approx(1.6)
    assert math.exp(view.log_z()) == pytest.approx(1.4)  # midpoint without an estimate
    assert math.exp(view.log_z(0.1)) == pytest.approx(1.3)
    assert math.exp(view.log_z(5.0)) == pytest.approx(1.6) and math.exp(view.log_z(-1.0)) == pytest.approx(1.2)
    # a tail whose weights are all tiny: B = 0.1 * 1e-3 <= 1e-3 Z_C, no probe is worth asking
    tiny = tails.tail_view(lp, lw, torch.full((3,), LOG(1e-3), dtype=torch.float64), p_cap=0.3)
    assert tiny.bound == pytest.approx(1e-4) and tiny.settled
    full = tails.tail_view(torch.tensor([LOG(0.5), LOG(0.5)], dtype=torch.float64), lw, torch.zeros(0), 0.5)
    assert full.bound == 0.0 and full.settled and math.exp(full.log_z()) == pytest.approx(1.5)  # exact Z
    assert tails.tail_view(lp, torch.full((2,), -math.inf), torch.full((3,), -math.inf), 0.3) is None


def test_plan_probe_bans_the_candidates_and_tilts_the_expert_tail():
    # ids 0, 1 are candidates; tail 2..5. p_E ranks the tail 3 > 2 > 5 > 4; room for 2 tilts (cap 4)
    lp_e = torch.tensor([0.3, 0.2, 0.2, 0.25, 0.01, 0.04], dtype=torch.float64).log()
    lp_a = torch.tensor([0.4, 0.3, 0.1, 0.05, 0.1, 0.05], dtype=torch.float64).log()
    log_w = lp_e - lp_a
    plan = tails.plan_probe([0, 1], log_w, lp_e, lp_a, cap=4, draws=8, share=0.8)
    assert plan.banned == (0, 1) and plan.tilted.tolist() == [2, 3] and plan.draws == 8  # ids sorted
    # lambda: 0.8/0.2 * p_A(rest = {4, 5}) / sum_S p_A w = 4 * 0.15 / 0.45 (p_A w = p_E at alpha 1)
    lam = 4 * 0.15 / 0.45
    assert plan.log_h.tolist() == pytest.approx([LOG(lam * 2.0), LOG(lam * 5.0)], abs=0.005)  # rounded to 0.01
    assert plan.log_h.tolist() == [round(x, 2) for x in plan.log_h.tolist()]
    # what the estimate needs to guess w of tilted tokens no draw finds
    assert plan.tilted_log_pa.exp().tolist() == pytest.approx([0.1, 0.05])
    assert plan.tilted_log_w.exp().tolist() == pytest.approx([2.0, 5.0])
    bias = dict(plan.logit_bias())
    assert bias[0] == bias[1] == -100.0 and len(bias) == 4
    assert plan.log_tilt(torch.tensor([2, 4, 3])).tolist() == pytest.approx([LOG(lam * 2.0), 0.0, LOG(lam * 5.0)], abs=0.005)
    # had p_L's tail been p_A's, 80% of the draws would land on the tilted tokens
    h = torch.ones(6, dtype=torch.float64)
    h[[2, 3]] = plan.log_h.exp()
    g = lp_a.exp() * h
    g[[0, 1]] = 0
    assert float(g[[2, 3]].sum() / g.sum()) == pytest.approx(0.8, abs=0.002)  # the biases are rounded
    untilted = tails.plan_probe([0, 1], None, None, None, cap=300)
    assert untilted.tilted.numel() == 0 and untilted.logit_bias() == ((0, -100.0), (1, -100.0))


def test_tail_estimate_counts_found_tokens_exactly_and_splits_the_rest():
    # tilted 5, 6, 9 (h = e^-2, e^-1, e^-1; p_A .1, .1, .2; w 10, 3, 2); plain tail tokens 7, 8
    plan = tails.ProbePlan((0,), torch.tensor([5, 6, 9]), torch.tensor([-2.0, -1.0, -1.0], dtype=torch.float64), 5,
                           torch.tensor([LOG(0.1), LOG(0.1), LOG(0.2)], dtype=torch.float64),
                           torch.tensor([LOG(10.0), LOG(3.0), LOG(2.0)], dtype=torch.float64))
    p = {5: 0.02, 6: 0.01, 7: 0.05, 8: 0.01}
    w = {5: 10.0, 6: 3.0, 7: 1.0, 8: 4.0}

    def estimate(draws):
        ids = torch.tensor(draws)
        return tails.tail_estimate(plan, ids, torch.tensor([LOG(p[i]) for i in draws], dtype=torch.float64),
                                   torch.tensor([LOG(w[i]) for i in draws], dtype=torch.float64), tail_mass=0.2)

    est = estimate([5, 5, 7, 8, 7])  # tilted 5 twice, plain draws 7, 8, 7
    # N^ = T n / sum 1/h = 0.2 * 5 / (2 e^2 + 3), p_L(R)^ = N^ * 3/5; found: 0.02 * 10 (once);
    # unfound tilted {6, 9}: p_A-weighted w = (.1 * 3 + .2 * 2) / .3
    m_r = 0.2 * 3 / (2 * math.exp(2) + 3)
    assert est.z_tail == pytest.approx(0.2 + m_r * 2.0 + (0.18 - m_r) * 0.7 / 0.3)
    assert est.ids.tolist() == [5, 7, 8]
    assert est.mass.tolist() == pytest.approx([0.02, m_r * 2 / 3, m_r / 3])  # SIR: p_L(R)^ / n_R per draw
    assert est.log_w.exp().tolist() == pytest.approx([10.0, 1.0, 4.0])
    only = estimate([5, 6])  # no plain draw: the rest is taken as tilted and unfound (9: w = 2)
    assert only.z_tail == pytest.approx(0.2 + 0.03 + 0.17 * 2.0) and only.mass.tolist() == pytest.approx([0.02, 0.01])
    assert estimate([]) is None


def test_replacement_reaches_the_tail_entries():
    # C: p_L = (.5, .3), w = (1, 3); tail entry mass .2, w = 6; Z = .5 + .9 + 1.2 = 2.6
    est = tails.TailEstimate(1.2, torch.tensor([9]), torch.tensor([0.2], dtype=torch.float64),
                             torch.tensor([LOG(6.0)], dtype=torch.float64), "")
    lp = torch.tensor([LOG(0.5), LOG(0.3)], dtype=torch.float64)
    lw = torch.tensor([0.0, LOG(3.0)], dtype=torch.float64)
    r = tails.replacement(lp, lw, est, LOG(2.6))
    # residual ∝ p_L (w/Z - 1)+ = (0, .3 * .4/2.6, .2 * 3.4/2.6)
    expected = torch.tensor([0.0, 0.3 * 0.4, 0.2 * 3.4])
    assert r.tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert tails.replacement(lp, lw, None, LOG(2.6)).tolist() == pytest.approx([0.0, 1.0])  # candidates only
    # every entry over-drafted: the target renormalised over the allowed entries
    r = tails.replacement(lp, lw, est, LOG(100.0), torch.tensor([True, False, True]))
    assert r.tolist() == pytest.approx([0.5 / 1.7, 0.0, 1.2 / 1.7])


def random_position(seed, size=40, peaked=3.0):
    g = torch.Generator().manual_seed(seed)
    p_l = torch.softmax(torch.randn(size, generator=g, dtype=torch.float64) * peaked, 0)
    lp_e = torch.log_softmax(torch.randn(size, generator=g, dtype=torch.float64) * peaked, 0)
    lp_a = torch.log_softmax(torch.randn(size, generator=g, dtype=torch.float64) * peaked, 0)
    return p_l, lp_e, lp_a


def test_probed_distribution_is_exact_with_every_candidate_and_converges_with_draws():
    p_l, lp_e, lp_a = random_position(0, peaked=1.5)
    exact = torch.softmax(p_l.log() + lp_e - lp_a, 0)
    order = torch.argsort(p_l, descending=True)
    gen = torch.Generator().manual_seed(0)
    every, asked = tails.probed_distribution(p_l, lp_e, lp_a, 1.0, order, generator=gen)
    assert asked == 0.0 and torch.allclose(every, exact, atol=1e-12)  # k = vocabulary: exact, no call
    from blackbox_proxy.maths.rejection import speculative_distribution

    today = speculative_distribution(p_l, lp_e, lp_a, 1.0, order[:3])
    tv_old = 0.5 * float((today - exact).abs().sum())
    capped, asked = tails.probed_distribution(p_l, lp_e, lp_a, 1.0, order[:3], generator=gen, cap=2)
    assert asked == 0.0 and torch.equal(capped, today)  # 3 candidates cannot be banned with 2 entries
    tvs = []
    for draws in (16, 64, 256):
        few, asked = tails.probed_distribution(p_l, lp_e, lp_a, 1.0, order[:3], generator=gen, draws=draws, samples=64)
        assert 0 < asked < 1 and float(few.sum()) == pytest.approx(1.0)
        tvs.append(0.5 * float((few - exact).abs().sum()))
    # the candidates-only rule: 0.53 here (floor 0.67); the probes: 0.012, then 0.003-0.004 (the
    # Monte Carlo noise of 64 simulated probes): consistent in the draws
    assert tvs[0] < 0.05 * tv_old and max(tvs[1:]) < 0.5 * tvs[0]
