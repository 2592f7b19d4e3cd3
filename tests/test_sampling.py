"""The sampler of API.md on fixed logits."""

import collections
import math

import pytest
import torch

from inference.sampling import LIMITS, Sampler, SamplingSettings, check_setting

BANNED = torch.tensor([0], dtype=torch.long)


def logits_for(probabilities):
    """Logits whose softmax is `probabilities` (index 0 gets a huge logit: it must be banned)."""
    logits = torch.log(torch.tensor(probabilities, dtype=torch.float32))
    logits[0] = 50.0
    return logits


def test_defaults_match_the_api():
    assert SamplingSettings() == SamplingSettings(tau=3, rate=0.1, min_p=0.05, temperature=1.2, presence_penalty=0.2)
    assert set(LIMITS) == {"tau", "rate", "min_p", "temperature", "presence_penalty"}


def test_token_zero_is_never_a_candidate():
    ids, _ = Sampler(SamplingSettings(min_p=0.0), BANNED).candidates(logits_for([1, 0.5, 0.5]))
    assert 0 not in ids.tolist()


def test_min_p_drops_tokens_below_a_fraction_of_the_top_one():
    sampler = Sampler(SamplingSettings(min_p=0.3, temperature=1.0), BANNED)
    ids, probs = sampler.candidates(logits_for([1, 0.5, 0.2, 0.14, 0.16]))
    # top is 0.5; 0.3 x 0.5 = 0.15 keeps 0.5, 0.2 and 0.16, drops 0.14
    assert ids.tolist() == [1, 2, 4]
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.2, 0.16], dtype=torch.float64) / 0.86)


def test_temperature_reshapes_the_kept_probabilities():
    sampler = Sampler(SamplingSettings(min_p=0.0, temperature=2.0), BANNED)
    ids, probs = sampler.candidates(logits_for([1, 0.64, 0.36]))
    expected = torch.tensor([0.8, 0.6], dtype=torch.float64)  # p ** (1/2)
    torch.testing.assert_close(probs, expected / expected.sum())


def test_presence_penalty_divides_positive_and_multiplies_negative_logits():
    sampler = Sampler(SamplingSettings(min_p=0.0, temperature=1.0, presence_penalty=1.0), BANNED)
    logits = torch.tensor([50.0, 2.0, -1.0, 1.0])
    sampler.used = collections.Counter({1: 1, 2: 1})
    _, probs = sampler.candidates(logits)
    expected = torch.softmax(torch.tensor([1.0, -2.0, 1.0], dtype=torch.float64), dim=0)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-6)


def test_mirostat_keeps_tokens_within_mu_and_learns_towards_tau():
    settings = SamplingSettings(tau=1.25, rate=0.5, min_p=0.0, temperature=1.0, presence_penalty=0.0)
    sampler = Sampler(settings, BANNED, seed=0)
    assert sampler.mu == 2.5
    # surprises: 1 bit (0.5), 2 bits (0.25), 3 bits (0.125 twice): mu=2.5 keeps the first two.
    logits = logits_for([1, 0.5, 0.25, 0.125, 0.125])
    seen = set()
    for _ in range(20):
        sampler.mu = 2.5
        token = sampler.sample(logits)
        seen.add(token)
        renormalised = {1: 2 / 3, 2: 1 / 3}[token]
        assert sampler.mu == pytest.approx(2.5 - 0.5 * (-math.log2(renormalised) - 1.25))
    assert seen == {1, 2}


def test_the_most_likely_token_survives_a_tiny_mu():
    sampler = Sampler(SamplingSettings(tau=0.0, min_p=0.0, temperature=1.0), BANNED)
    sampler.mu = 0.0
    assert sampler.sample(logits_for([1, 0.2, 0.5, 0.3])) == 2


def test_used_tokens_are_remembered_for_the_penalty():
    sampler = Sampler(SamplingSettings(), BANNED, seed=1)
    token = sampler.sample(logits_for([1, 0.9, 0.1]))
    assert sampler.used == {token: 1}


@pytest.mark.parametrize("name,value,message", [
    ("tau", "x", "tau must be a number, got 'x'"),
    ("temperature", "0", "temperature must be in (0, 5], got 0"),
    ("rate", "2", "rate must be in [0, 1], got 2"),
    ("min_p", "inf", "min_p must be in [0, 1], got inf"),
])
def test_settings_out_of_range_name_the_field(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_setting(name, value)


def test_frequency_penalty_subtracts_per_use():
    sampler = Sampler(SamplingSettings(min_p=0.0, temperature=1.0, presence_penalty=0.0, frequency_penalty=1.5),
                      torch.tensor([0]))
    sampler.used = collections.Counter({1: 2, 2: 1})
    logits = torch.tensor([0.0, 5.0, 5.0, 5.0])
    ids, probs = sampler.candidates(logits)
    odds = dict(zip(ids.tolist(), probs.tolist()))
    assert odds[1] / odds[3] == pytest.approx(math.exp(-3.0), rel=1e-5)
    assert odds[2] / odds[3] == pytest.approx(math.exp(-1.5), rel=1e-5)


def test_top_p_keeps_the_most_likely_tokens_that_reach_it():
    logits = torch.log(torch.tensor([1e-9, 0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingSettings(min_p=0.0, temperature=1.0, presence_penalty=0.0, top_p=0.75),
                      torch.tensor([0]))
    ids, probs = sampler.candidates(logits)
    assert sorted(ids.tolist()) == [1, 2]
    assert probs.sum().item() == pytest.approx(1.0)
    sampler = Sampler(SamplingSettings(min_p=0.0, temperature=1.0, presence_penalty=0.0, top_p=0.1),
                      torch.tensor([0]))
    assert sampler.candidates(logits)[0].tolist() == [1]  # at least the top one
