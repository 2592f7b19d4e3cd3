"""The sampler of API.md on fixed logits."""

import collections
import contextlib
import math

import numpy
import pytest
import torch

from inference import kernels, sampling
from inference.sampling import LIMITS, Sampler, SamplingSettings, check_setting

BANNED = torch.tensor([0], dtype=torch.long)


@contextlib.contextmanager
def without_kernels():
    """The sampler as it runs without the compiled kernels (numpy and Python): the reference."""
    loaded = kernels.available()
    kernels._loaded = False
    try:
        yield
    finally:
        kernels._loaded = loaded


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


@pytest.mark.skipif(not kernels.available(), reason="the compiled sampling pass needs the kernels built")
def test_the_compiled_survivors_are_the_numpy_ones():
    """inference/kernels/sampling.cpp keeps the same tokens with the same logits as the numpy path:
    presence and frequency penalties on used tokens of either sign, banned tokens, min_p 0."""
    generator = torch.Generator().manual_seed(3)
    vocab = 4099  # not a multiple of 8: the vector loops' tails run too
    settings = [SamplingSettings(), SamplingSettings(min_p=0.0, presence_penalty=0.0),
                SamplingSettings(min_p=0.3, presence_penalty=1.5, frequency_penalty=0.7),
                SamplingSettings(min_p=0.01, presence_penalty=0.0, frequency_penalty=-0.4)]
    samplers = []
    for row in range(12):
        sampler = Sampler(settings[row % len(settings)], BANNED)
        for token in torch.randint(vocab, (row * 7,), generator=generator).tolist():
            sampler.used[token] += 1
        samplers.append(sampler)
    logits = torch.randn(len(samplers), vocab, generator=generator) * 3.0
    logits[:, 5] = 40.0  # a used token far on top in some rows
    samplers[4].used[5] += 2
    logits.index_fill_(1, BANNED, -math.inf)
    log_min_p = torch.log(torch.tensor([s.settings.min_p for s in samplers], dtype=torch.float32))
    compiled_logits, numpy_logits = logits.clone(), logits.clone()
    ids, kept, counts = sampling._survivors_compiled(samplers, compiled_logits, log_min_p)
    want_ids, want_kept, want_counts = sampling._survivors_numpy(samplers, numpy_logits, log_min_p)
    assert counts.tolist() == want_counts.tolist() and counts.sum() > len(samplers)
    assert ids.tolist() == want_ids.tolist()
    assert kept.tobytes() == want_kept.astype(numpy.float32).tobytes()
    assert torch.equal(compiled_logits, numpy_logits)  # the penalties, applied in place alike


@pytest.mark.skipif(not kernels.available(), reason="the compiled sampling pass needs the kernels built")
def test_the_compiled_sampling_pass_refuses_a_token_outside_the_vocabulary():
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        torch.ops.rpserver.sampling_candidates(
            torch.zeros(1, 8), torch.tensor([8]), torch.ones(1), torch.tensor([0, 1]), torch.ones(1), torch.zeros(1),
            torch.zeros(1))


@pytest.mark.skipif(not kernels.available(), reason="the compiled draw needs the kernels built")
def test_the_compiled_draw_is_the_numpy_one():
    """inference/kernels/sampling.cpp's draw (temperature, top_p, Mirostat, the draw) picks the tokens the
    numpy path picks from the same random numbers, with the same surprise; over many draws, on peaked
    and flat rows, with and without top_p, mu cutting some candidates and a mu keeping only the top."""
    generator = torch.Generator().manual_seed(5)
    settings = [SamplingSettings(), SamplingSettings(temperature=0.4, top_p=0.8),
                SamplingSettings(min_p=0.0, temperature=2.5, tau=6.0), SamplingSettings(min_p=0.02, top_p=0.3),
                # The OpenAI door's steps: penalties over a window reaching into the prompt, DRY, top_k,
                # typical_p, XTC (which draws from the reply's random numbers too).
                SamplingSettings(min_p=0.0, presence_penalty=0.0, presence_offset=-0.7, frequency_penalty=0.3,
                                 repetition_penalty=1.3, penalty_range=40, top_k=50, xtc_probability=0.5,
                                 xtc_threshold=0.02, dry_multiplier=0.8, dry_breakers=frozenset({3})),
                SamplingSettings(min_p=0.0, temperature=0.8, typical_p=0.7, top_k=200, dry_multiplier=2.0,
                                 dry_allowed_length=1, dry_range=30)]
    history = torch.randint(1, 12, (60,), generator=generator).tolist()  # a repetitive prompt, for DRY
    compiled = [Sampler(settings[row % len(settings)], BANNED, seed=row, history=history) for row in range(16)]
    reference = [Sampler(settings[row % len(settings)], BANNED, seed=row, history=history) for row in range(16)]
    compiled[3].mu = reference[3].mu = 0.0  # only the most likely token is allowed
    drawn = set()
    for step in range(60):
        logits = torch.randn(len(compiled), 1031, generator=generator) * (0.5 + step % 4)
        logits[::5, 7] = 9.0  # some rows peaked
        logits[:, 1:12] += 2.0  # the prompt's tokens likely, so that repeats (DRY) happen
        tokens = sampling.sample_batch(compiled, logits.clone())
        with without_kernels():
            want = sampling.sample_batch(reference, logits.clone())
        assert tokens == want
        for mine, theirs in zip(compiled, reference):
            assert mine.mu == pytest.approx(theirs.mu, rel=1e-12, abs=1e-12)
            assert mine.used == theirs.used
        drawn.update(tokens)
    assert len(drawn) > 100  # the draws really spread over the candidates


@pytest.mark.skipif(not kernels.available(), reason="the compiled truncation needs the kernels built")
def test_the_compiled_truncation_is_the_numpy_one():
    """top_k, typical_p and XTC (inference/kernels/sampling.cpp's sampling_truncate) keep the tokens numpy's
    Sampler.truncate keeps, with the same XTC coins from the same seeds: on the whole vocabulary (min_p 0)
    and on few survivors, with tied logits, k past the survivors, and rows that set none of them."""
    generator = torch.Generator().manual_seed(11)
    vocab = 4099
    settings = [SamplingSettings(min_p=0.0, top_k=40), SamplingSettings(min_p=0.0, typical_p=0.9),
                SamplingSettings(min_p=0.0, top_k=300, typical_p=0.5, xtc_probability=0.5, xtc_threshold=0.01),
                SamplingSettings(min_p=0.02, top_k=5000), SamplingSettings(),
                SamplingSettings(min_p=0.0, typical_p=0.999), SamplingSettings(min_p=0.05, xtc_probability=1.0,
                                                                                xtc_threshold=0.05),
                SamplingSettings(min_p=0.0, top_k=1)]
    compiled = [Sampler(settings[row % len(settings)], BANNED, seed=row) for row in range(16)]
    reference = [Sampler(settings[row % len(settings)], BANNED, seed=row) for row in range(16)]
    cut = collections.Counter()
    for step in range(12):
        logits = torch.randn(len(compiled), vocab, generator=generator) * (1.0 + step % 3)
        if step % 2:
            logits = torch.round(logits * 2) / 2  # many tied logits
        logits[::3, 7] = 6.0  # some rows peaked
        survivors = sampling.survivors(compiled, logits)
        ids, kept, counts = sampling._truncate_compiled(compiled, *survivors)
        want_ids, want_kept, want_counts = sampling._truncate_numpy(reference, *survivors)
        assert counts.tolist() == want_counts.tolist()
        assert ids.tolist() == want_ids.tolist()
        assert kept.tobytes() == want_kept.tobytes()
        for row, (before, after) in enumerate(zip(survivors[2].tolist(), counts.tolist())):
            cut[row % len(settings)] += before > after
    assert cut[4] == 0 and all(cut[i] for i in (0, 1, 2, 5, 6, 7))  # every row that sets a step is cut by it


@pytest.mark.skipif(not kernels.available(), reason="the compiled DRY search needs the kernels built")
def test_the_compiled_dry_search_is_the_python_one():
    """inference/kernels/sampling.cpp's dry_repeats finds the repeats (and their lengths) the Python search
    finds, over a reply growing on a repetitive prompt: with breakers, a range, and a long loop."""
    generator = torch.Generator().manual_seed(13)
    settings = [SamplingSettings(dry_multiplier=0.8, dry_breakers=frozenset({3, 5})),
                SamplingSettings(dry_multiplier=1.0, dry_allowed_length=1, dry_range=50),
                SamplingSettings(dry_multiplier=2.0, dry_allowed_length=4)]
    history = torch.randint(1, 9, (300,), generator=generator).tolist() + [1, 2, 4, 6] * 40
    found = 0
    for setting in settings:
        sampler = Sampler(setting, BANNED, history=history)
        for token in torch.randint(1, 9, (80,), generator=generator).tolist():
            compiled = dict(sampler._dry_repeats_compiled())
            assert compiled == dict(sampler.dry_repeats_reference())
            found += len(compiled)
            sampler.accept(token, 0.0)
    assert found > 100


@pytest.mark.skipif(not kernels.available(), reason="the compiled draw needs the kernels built")
def test_the_compiled_draw_refuses_a_row_without_candidates():
    with pytest.raises(RuntimeError, match="at least one candidate"):
        torch.ops.rpserver.sampling_draw(
            torch.tensor([3]), torch.ones(1), torch.tensor([1, 0]), *[torch.ones(2, dtype=torch.float64)] * 4)


def probabilities(sampler, logits):
    ids, probs = sampler.candidates(torch.tensor(logits))
    return dict(zip(ids.tolist(), probs.tolist()))


NEUTRAL = {"min_p": 0.0, "temperature": 1.0, "presence_penalty": 0.0}


def test_top_k_keeps_the_k_most_likely():
    odds = probabilities(Sampler(SamplingSettings(**NEUTRAL, top_k=2), BANNED), [50.0, 1.0, 3.0, 2.0, 0.5])
    assert set(odds) == {2, 3} and odds[2] == pytest.approx(math.e / (math.e + 1))


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    probs = numpy.array([0.5, 0.3, 0.15, 0.05])
    entropy = -(probs * numpy.log(probs)).sum()  # 1.14 nats; surprises 0.69, 1.20, 1.90, 3.00
    assert sorted(abs(-numpy.log(probs) - entropy).argsort()[:2].tolist()) == [0, 1]
    odds = probabilities(Sampler(SamplingSettings(**NEUTRAL, typical_p=0.5), BANNED),
                         [50.0, *numpy.log(probs).tolist()])
    # 0.3 (closest) then 0.5 reach 0.5: those two stay.
    assert set(odds) == {1, 2} and odds[1] == pytest.approx(0.5 / 0.8)


def test_xtc_removes_the_likely_tokens_but_the_least_of_them():
    logits = [50.0, *numpy.log([0.4, 0.3, 0.2, 0.1]).tolist()]
    sampler = Sampler(SamplingSettings(**NEUTRAL, xtc_threshold=0.15, xtc_probability=1.0), BANNED)
    assert set(probabilities(sampler, logits)) == {3, 4}  # 0.4 and 0.3 go; 0.2 (the least above) stays
    never = Sampler(SamplingSettings(**NEUTRAL, xtc_threshold=0.15, xtc_probability=0.0), BANNED)
    assert set(probabilities(never, logits)) == {1, 2, 3, 4}


def test_openai_penalties_subtract_and_the_repetition_penalty_divides_over_the_window():
    settings = SamplingSettings(**NEUTRAL, presence_offset=0.5, frequency_penalty=0.25, repetition_penalty=2.0,
                                penalty_range=3)
    sampler = Sampler(settings, BANNED, history=[1, 1, 2, 9, 9])
    assert sampler.window == {2: 1, 9: 2}  # the last three tokens
    sampler.accept(1, 0.0)
    assert sampler.window == {9: 2, 1: 1}
    logits = [50.0, 4.0, 4.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]
    odds = probabilities(sampler, logits)
    # 1: 4 / 2 - 0.5 - 0.25; 9: 4 / 2 - 0.5 - 0.5; 2 (left the window) keeps 4; 3 (not in it) -4.
    assert math.log(odds[1] / odds[2]) == pytest.approx(1.25 - 4.0, rel=1e-5)
    assert math.log(odds[9] / odds[2]) == pytest.approx(1.0 - 4.0, rel=1e-5)
    assert math.log(odds[3] / odds[4]) == pytest.approx(-4.0, rel=1e-5)


def test_dry_penalises_the_token_that_would_extend_a_repeat():
    settings = SamplingSettings(**NEUTRAL, dry_multiplier=0.5, dry_base=2.0, dry_allowed_length=2,
                                dry_breakers=frozenset({8}))
    # 5 6 7 4 ... 5 6 7: 4 would extend a repeat of three tokens (0.5 x 2^(3-2) = 1); after
    # 5 6 8 5 6, 8 (a breaker) is never penalised.
    assert Sampler(settings, BANNED, history=[5, 6, 7, 4, 1, 2, 5, 6, 7]).dry_penalties() == {4: 1.0}
    assert Sampler(settings, BANNED, history=[5, 6, 3, 1, 5, 6]).dry_penalties() == {3: 0.5}
    assert Sampler(settings, BANNED, history=[5, 6, 8, 1, 5, 6]).dry_penalties() == {}
    # A repeat does not extend across a breaker: 8 5 6 ... 8 5 6 counts two tokens, not three.
    assert Sampler(settings, BANNED, history=[8, 5, 6, 3, 8, 5, 6]).dry_penalties() == {3: 0.5}
    assert Sampler(settings, BANNED, history=[1, 5, 6, 3, 2, 5, 6]).dry_penalties() == {3: 0.5}
    long = Sampler(settings, BANNED, history=[1, 5, 6, 3, 1, 5, 6])
    assert long.dry_penalties() == {3: 1.0}
    odds = probabilities(long, [50.0, 1.0, 1.0, 1.0])
    assert math.log(odds[3] / odds[1]) == pytest.approx(-1.0, rel=1e-5)


def test_logprobs_are_the_models_distribution_before_the_sampler():
    sampler = Sampler(SamplingSettings(**NEUTRAL, top_k=1, frequency_penalty=2.0), BANNED, top_logprobs=2)
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    token = sampler.sample(logits)
    assert token == 1
    want = torch.log_softmax(logits, dim=0)
    assert sampler.logprobs[0] == 1 and sampler.logprobs[1] == pytest.approx(want[1].item())
    assert [t for t, _ in sampler.logprobs[2]] == [1, 2]
    assert [v for _, v in sampler.logprobs[2]] == pytest.approx([want[1].item(), want[2].item()])
