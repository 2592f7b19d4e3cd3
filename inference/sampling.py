"""The reply sampler: presence penalty, min_p, temperature, Mirostat (the legacy API's),
plus frequency penalty and top_p (the OpenAI-compatible API's).

For one step, on the logits of the next token:
0. a reply's logit bias (token id -> value, as in OpenAI's API) is added;
1. banned tokens (0, the end-of-text token, and ids outside the vocabulary)
   get probability 0;
2. presence penalty: every token already used in this reply has its logit
   divided by (1 + presence_penalty) if positive, multiplied if negative;
   frequency penalty: frequency_penalty x (times used) is subtracted from it;
3. softmax;
4. min_p: tokens whose probability is below min_p x the top probability are dropped;
5. temperature: the kept probabilities are raised to 1/temperature and renormalised;
   top_p: only the most likely of them whose probabilities first add up to
   top_p stay (renormalised);
6. Mirostat (v2): tokens whose surprise -log2(p) exceeds mu are dropped (the
   most likely token always stays), one token is drawn from the rest, and mu
   moves by rate x (tau - observed surprise). mu starts at 2 x tau.
"""

import collections
import math
from dataclasses import dataclass

import numpy
import torch

from . import kernels


@dataclass(frozen=True)
class SamplingSettings:
    tau: float = 3.0
    rate: float = 0.1
    min_p: float = 0.05
    temperature: float = 1.2
    presence_penalty: float = 0.2
    # The OpenAI-compatible API's extras (the legacy API leaves them neutral):
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per use in this reply
    top_p: float = 1.0  # nucleus: the most likely tokens whose probabilities add up to top_p


FLOAT_MIN = torch.finfo(torch.float32).min

# (low, high, low inclusive) for each field: what the API accepts.
LIMITS = {
    "tau": (0.0, 20.0, True),
    "rate": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, True),
    "temperature": (0.0, 5.0, False),
    "presence_penalty": (0.0, 10.0, True),
}


def check_setting(name, value):
    """The value as a float, or ValueError with a message naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}")
    low, high, low_inclusive = LIMITS[name]
    if not math.isfinite(number) or number > high or number < low or (number == low and not low_inclusive):
        bracket = "[" if low_inclusive else "("
        raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value}")
    return number


class Sampler:
    """One reply's sampling state: Mirostat's mu and the tokens used so far."""

    def __init__(self, settings, banned, seed=None, logit_bias=None):
        self.settings = settings
        self.banned = banned  # LongTensor of token ids that are never sampled
        self.logit_bias = dict(logit_bias or {})  # token id -> added to its logit
        self.random = numpy.random.default_rng(seed)
        self.mu = 2.0 * settings.tau
        self.used = collections.Counter()  # token -> times used in this reply

    def candidates(self, logits):
        """(token ids, probabilities) tensors left after steps 1-5, before Mirostat."""
        ids, probs = candidates_batch([self], logits.unsqueeze(0).clone())[0]
        return torch.from_numpy(ids), torch.from_numpy(probs)

    def sample(self, logits):
        """Draw the next token and update Mirostat's mu."""
        return sample_batch([self], logits.unsqueeze(0).clone())[0]

    def draw(self, ids, probs):
        """Step 6 on this reply's candidates: Mirostat, then one draw (numpy, without the kernels;
        with them, sample_batch draws every reply's token in one compiled call)."""
        allowed = -numpy.log2(probs) <= self.mu
        allowed[numpy.argmax(probs)] = True
        ids, probs = ids[allowed], probs[allowed]
        cumulative = numpy.cumsum(probs)
        choice = min(int(numpy.searchsorted(cumulative, self.random.random() * cumulative[-1], side="right")),
                     len(ids) - 1)
        return self.accept(int(ids[choice]), -math.log2(probs[choice] / cumulative[-1]))

    def accept(self, token, surprise):
        """Record the drawn token; Mirostat's mu moves by rate x (tau - its surprise in bits)."""
        self.mu -= self.settings.rate * (surprise - self.settings.tau)
        self.used[token] += 1
        return token


@torch.inference_mode()
def candidates_batch(samplers, logits):
    """Steps 1-5 for B replies at once; logits [B, vocab] (modified in place if on the CPU).

    Returns a list of (ids, probabilities) numpy arrays. No full softmax is
    needed: a token survives min_p when its logit is at least
    max + ln(min_p), and temperature on the survivors' renormalised
    probabilities is a softmax of their logits / temperature (`survivors`);
    the survivors are few, and the rest runs in numpy.
    """
    ids, kept, counts = survivors(samplers, logits)
    kept = kept.astype(numpy.float64)
    splits = numpy.cumsum(counts)[:-1]
    result = []
    for sampler, row_ids, row_kept in zip(samplers, numpy.split(ids, splits), numpy.split(kept, splits)):
        scaled = numpy.exp((row_kept - row_kept.max()) / sampler.settings.temperature)
        probs = scaled / scaled.sum()
        if sampler.settings.top_p < 1.0:
            row_ids, probs = nucleus(row_ids, probs, sampler.settings.top_p)
        result.append((row_ids, probs))
    return result


@torch.inference_mode()
def survivors(samplers, logits):
    """Steps 1, 2 and 4 for B replies: (token ids, float32 logits) of every row's survivors,
    row after row, and their count per row; logits [B, vocab] (modified in place if on the CPU).

    The full-vocabulary part (the penalties, each row's top logit, the
    survivors) is one compiled pass over each row where inference/kernels is
    built (`rpserver::sampling_candidates`), else numpy and PyTorch
    operations with the same float32 arithmetic (`_survivors_numpy`).
    """
    logits = logits.to("cpu", torch.float32).contiguous()
    for row, sampler in enumerate(samplers):
        if sampler.logit_bias:
            ids = torch.tensor(list(sampler.logit_bias), dtype=torch.long)
            logits[row, ids] += torch.tensor(list(sampler.logit_bias.values()), dtype=torch.float32)
    logits.index_fill_(1, samplers[0].banned, -math.inf)
    # With min_p 0 (ln = -inf) every finite logit survives; banned ones (-inf) never do.
    log_min_p = torch.log(torch.tensor([s.settings.min_p for s in samplers], dtype=torch.float32))
    compiled = _survivors_compiled if kernels.available() else _survivors_numpy
    return compiled(samplers, logits, log_min_p)


def _survivors_compiled(samplers, logits, log_min_p):
    """Steps 2 and 4 in one compiled pass over each row (inference/kernels/sampling.cpp):
    (token ids, float32 logits) of every row's survivors, row after row, and their count per row."""
    used = [numpy.fromiter(s.used, dtype=numpy.int64, count=len(s.used)) for s in samplers]
    rows = numpy.zeros(len(samplers) + 1, dtype=numpy.int64)
    numpy.cumsum([len(u) for u in used], out=rows[1:])
    counts = numpy.zeros(rows[-1], dtype=numpy.float32)  # read for the rows with a frequency penalty only
    for row, sampler in enumerate(samplers):
        if sampler.used and sampler.settings.frequency_penalty:
            counts[rows[row]:rows[row + 1]] = numpy.fromiter(sampler.used.values(), dtype=numpy.float32,
                                                             count=len(sampler.used))
    presence = torch.tensor([1.0 + s.settings.presence_penalty for s in samplers], dtype=torch.float32)
    frequency = torch.tensor([s.settings.frequency_penalty for s in samplers], dtype=torch.float32)
    ids, kept, found = torch.ops.rpserver.sampling_candidates(
        logits, torch.from_numpy(numpy.concatenate(used)), torch.from_numpy(counts), torch.from_numpy(rows),
        presence, frequency, log_min_p)
    return ids.numpy(), kept.numpy(), found.numpy()


def _survivors_numpy(samplers, logits, log_min_p):
    """_survivors_compiled's result from numpy and PyTorch operations (without the kernels)."""
    flat = logits.numpy().reshape(-1)  # the same memory, for numpy's cheaper scattered reads and writes
    batch, vocab = logits.shape
    # The used tokens, as positions in the flat logits, through numpy (torch.tensor() of a Python
    # list costs ~1 us per element, and torch's two-index gather and scatter ~4x numpy's flat ones).
    used_at, factors = [], []
    for row, sampler in enumerate(samplers):
        if sampler.used and sampler.settings.presence_penalty:
            used_at.append(used_positions(sampler, row, vocab))
            factors.append(numpy.full(len(sampler.used), 1.0 + sampler.settings.presence_penalty, dtype=numpy.float32))
    if used_at:
        used_at, factor = numpy.concatenate(used_at), numpy.concatenate(factors)
        picked = flat[used_at]
        flat[used_at] = numpy.where(picked > 0, picked / factor, picked * factor)
    for row, sampler in enumerate(samplers):
        if sampler.used and sampler.settings.frequency_penalty:
            counts = numpy.fromiter(sampler.used.values(), dtype=numpy.float32, count=len(sampler.used))
            flat[used_positions(sampler, row, vocab)] -= numpy.float32(sampler.settings.frequency_penalty) * counts
    threshold = (logits.amax(dim=1, keepdim=True) + log_min_p.unsqueeze(1)).clamp(min=FLOAT_MIN)
    where = numpy.flatnonzero((logits >= threshold).numpy())
    row_of, ids = numpy.divmod(where, vocab)
    return ids, flat[where], numpy.bincount(row_of, minlength=batch)


def used_positions(sampler, row, vocab):
    """Where the reply's used tokens are in the flat logits of a batch, row `row`."""
    return numpy.fromiter(sampler.used, dtype=numpy.int64, count=len(sampler.used)) + row * vocab


def nucleus(ids, probs, top_p):
    """The most likely tokens whose probabilities first reach top_p (at least one), renormalised."""
    order = numpy.argsort(-probs, kind="stable")
    keep = order[:int(numpy.searchsorted(numpy.cumsum(probs[order]), top_p)) + 1]
    return ids[keep], probs[keep] / probs[keep].sum()


def sample_batch(samplers, logits):
    """One token for each of B replies; logits [B, vocab] (modified in place).

    With the kernels, steps 5 and 6 of every row are one compiled call
    (`rpserver::sampling_draw`: the quantities of candidates_batch and
    Sampler.draw up to float64 rounding, drawn from the same random number);
    without them, numpy per reply.
    """
    if not kernels.available():
        return [sampler.draw(ids, probs) for sampler, (ids, probs) in zip(samplers, candidates_batch(samplers, logits))]
    ids, kept, counts = survivors(samplers, logits)
    settings = [sampler.settings for sampler in samplers]
    tokens, surprises = torch.ops.rpserver.sampling_draw(
        torch.from_numpy(ids), torch.from_numpy(kept), torch.from_numpy(counts),
        torch.tensor([s.temperature for s in settings], dtype=torch.float64),
        torch.tensor([s.top_p for s in settings], dtype=torch.float64),
        torch.tensor([sampler.mu for sampler in samplers], dtype=torch.float64),
        torch.tensor([sampler.random.random() for sampler in samplers], dtype=torch.float64))
    return [sampler.accept(token, surprise)
            for sampler, token, surprise in zip(samplers, tokens.tolist(), surprises.tolist())]


def banned_tokens(tokenizer, vocab_size):
    """Token 0 and every id the tokenizer cannot spell."""
    return torch.tensor([i for i in range(vocab_size) if i == 0 or i not in tokenizer.pieces], dtype=torch.long)
