"""Known answers and statistical checks for the pure proxy-tuning arithmetic."""

import math

import pytest
import torch
from scipy.stats import chisquare

from blackbox_proxy import ConfigurationError
from blackbox_proxy.maths.combiner import choose, proxy_scores, top_p_filter, tuned_distribution


def test_proxy_scores_known_answer():
    hosted = torch.tensor([-0.1, -2.4, -5.0])
    delta = torch.tensor([-3.0, 0.5, 4.0])
    assert proxy_scores(hosted, delta, 1.0).tolist() == pytest.approx([-3.1, -1.9, -1.0])
    assert proxy_scores(hosted, delta, 0.5).tolist() == pytest.approx([-1.6, -2.15, -3.0])
    # alpha = 0 is the hosted model itself, even with an infinite offset
    inf = torch.tensor([math.inf, 0.0, 0.0])
    assert proxy_scores(hosted, inf, 0.0).tolist() == pytest.approx(hosted.tolist())
    assert hosted.tolist() == pytest.approx([-0.1, -2.4, -5.0])  # input untouched


def test_tuned_distribution_matches_white_box_formula():
    # p~ ∝ p_L * (p_E / p_A)^alpha, computed by hand with probabilities
    p_l = torch.tensor([0.6, 0.3, 0.1])
    p_e = torch.tensor([0.2, 0.5, 0.3])
    p_a = torch.tensor([0.5, 0.25, 0.25])
    alpha = 1.5
    expected = p_l * (p_e / p_a) ** alpha
    expected = expected / expected.sum()
    scores = proxy_scores(p_l.log(), p_e.log() - p_a.log(), alpha)
    assert tuned_distribution(scores, 1.0).tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    # temperature 2 flattens: softmax(scores / 2)
    flat = torch.softmax(scores / 2, 0)
    assert tuned_distribution(scores, 2.0).tolist() == pytest.approx(flat.tolist())


def test_greedy_and_ties():
    scores = torch.tensor([-1.0, -0.5, -0.5, -math.inf], dtype=torch.float64)
    assert tuned_distribution(scores, 0.0).tolist() == [0.0, 1.0, 0.0, 0.0]  # first of a tie
    assert tuned_distribution(torch.tensor([-math.inf, 2.0]), 1.0).tolist() == pytest.approx([0.0, 1.0])


def test_top_p_known_answer():
    probs = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert top_p_filter(probs, 0.6).tolist() == pytest.approx([0.0, 0.625, 0.375])
    assert top_p_filter(probs, 0.5).tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert top_p_filter(probs, 1.0).tolist() == pytest.approx(probs.tolist())
    assert top_p_filter(probs, 0.01).tolist() == pytest.approx([0.0, 1.0, 0.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
        ({"temperature": math.nan}, "temperature must be"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        tuned_distribution(torch.tensor([0.0, 1.0]), **kwargs)


def test_sampler_matches_target_distribution():
    """20,000 seeded draws follow p^ (chi-square), and a wrong target is rejected."""
    scores = proxy_scores(torch.tensor([-0.3, -1.6, -2.5, -4.0]), torch.tensor([0.0, 1.0, -0.5, 2.0]), 1.0)
    probs = tuned_distribution(scores, 0.8, top_p=0.97)
    gen = torch.Generator().manual_seed(1234)
    n = 20_000
    counts = torch.zeros(4)
    for _ in range(n):
        counts[choose(probs, gen)] += 1
    support = probs > 0
    assert counts[~support].sum() == 0  # top-p removed entries are never drawn
    expected = probs[support] * n
    assert chisquare(counts[support].numpy(), expected.numpy()).pvalue > 0.01
    wrong = tuned_distribution(scores, 1.0)[support]  # e.g. forgetting the temperature
    wrong = wrong / wrong.sum() * n
    assert chisquare(counts[support].numpy(), wrong.numpy()).pvalue < 1e-6
