"""The reply sampler: presence penalty, min_p, temperature, Mirostat (the legacy API's),
plus the OpenAI-compatible API's steps (OpenAI's penalties, top_p, and the
samplers llama.cpp's server and text-generation-webui define: repetition
penalty, DRY, top_k, typical_p, XTC).

For one step, on the logits of the next token (a step whose setting is
neutral does nothing):
0. a reply's logit bias (token id -> value, as in OpenAI's API) is added;
   DRY: a token that would extend a repeat of n >= dry_allowed_length tokens
   of the context (prompt and reply; never across a sequence breaker) has
   dry_multiplier x dry_base^(n - dry_allowed_length) subtracted;
1. banned tokens (0, the end-of-text token, and ids outside the vocabulary)
   get probability 0;
2. penalties on the tokens in the penalty window (the reply so far; with
   penalty_range, the last penalty_range tokens of the prompt and the reply):
   a token's logit is divided by factor if positive, multiplied if negative,
   where factor = (1 + presence_penalty) x repetition_penalty; then
   presence_offset (once) and frequency_penalty x (times in the window) are
   subtracted from it (OpenAI's presence and frequency penalties);
3. softmax;
4. min_p: tokens whose probability is below min_p x the top probability are dropped;
   top_k: only the k most likely stay; typical_p: the tokens whose surprise is
   closest to the distribution's entropy, until their probabilities reach
   typical_p; XTC: with probability xtc_probability, when two or more tokens
   have a probability of at least xtc_threshold, all of them but the least
   likely go (these three on the probabilities of step 3, renormalised);
5. temperature: the kept probabilities are raised to 1/temperature and renormalised;
   top_p: only the most likely of them whose probabilities first add up to
   top_p stay (renormalised);
6. Mirostat (v2): tokens whose surprise -log2(p) exceeds mu are dropped (the
   most likely token always stays), one token is drawn from the rest, and mu
   moves by rate x (tau - observed surprise). mu starts at 2 x tau.

A reply that asks for logprobs gets, for each drawn token, its log
probability and the most likely tokens' under the model's own distribution
(the softmax of the logits the model gave, before any step above).
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
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per use in the penalty window
    top_p: float = 1.0  # nucleus: the most likely tokens whose probabilities add up to top_p
    presence_offset: float = 0.0  # OpenAI's presence penalty: subtracted once from a token in the window
    repetition_penalty: float = 1.0  # a token in the window: logit divided by it (positive) or multiplied
    penalty_range: int | None = None  # None: the window is the reply; else the last n tokens of prompt + reply
    top_k: int = 0  # 0: off
    typical_p: float = 1.0  # 1: off
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0: off
    dry_multiplier: float = 0.0  # 0: off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_range: int | None = None  # None: the whole prompt and reply; else their last n tokens
    dry_breakers: frozenset = frozenset()  # token ids a repeat never extends across


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
    """One reply's sampling state: Mirostat's mu, the tokens used so far, the penalty window."""

    def __init__(self, settings, banned, seed=None, logit_bias=None, history=(), top_logprobs=None):
        self.settings = settings
        self.banned = banned  # LongTensor of token ids that are never sampled
        self.logit_bias = dict(logit_bias or {})  # token id -> added to its logit
        self.random = numpy.random.default_rng(seed)
        self.mu = 2.0 * settings.tau
        self.used = collections.Counter()  # token -> times used in this reply
        # The prompt and the reply so far, for DRY and a penalty window that reaches into the prompt.
        self.context = list(history) if settings.dry_multiplier or settings.penalty_range else []
        if settings.dry_multiplier:  # the same, as the compiled DRY search reads it
            self._dry_context = TokenLog(self.context)
            self._dry_breakers = torch.tensor(sorted(settings.dry_breakers), dtype=torch.long)
        if settings.penalty_range:
            self._window_tokens = collections.deque(self.context[-settings.penalty_range:])
            self._window = collections.Counter(self._window_tokens)
        self.top_logprobs = top_logprobs  # None: no logprobs; else how many of the most likely to report
        self.logprobs = None  # the last drawn token's (token, logprob, [(token, logprob), ...])

    @property
    def window(self):
        """The tokens the penalties of step 2 apply to, with their counts."""
        return self._window if self.settings.penalty_range else self.used

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
        if self.settings.dry_multiplier or self.settings.penalty_range:
            self.context.append(token)
        if self.settings.dry_multiplier:
            self._dry_context.append(token)
        if self.settings.penalty_range:
            self._window_tokens.append(token)
            self._window[token] += 1
            if len(self._window_tokens) > self.settings.penalty_range:
                gone = self._window_tokens.popleft()
                self._window[gone] -= 1
                if not self._window[gone]:
                    del self._window[gone]
        return token

    def penalties(self):
        """Step 2 for this reply: (token ids, factor, float32 amounts): each token's logit is divided by
        the factor if positive, multiplied if not, then loses its amount; None when nothing changes."""
        settings, window = self.settings, self.window
        factor = numpy.float32((1.0 + settings.presence_penalty) * settings.repetition_penalty)
        subtracts = bool(settings.frequency_penalty or settings.presence_offset)
        if not window or (factor == 1 and not subtracts):
            return None
        ids = numpy.fromiter(window, dtype=numpy.int64, count=len(window))
        if subtracts:
            counts = numpy.fromiter(window.values(), dtype=numpy.float64, count=len(window))
            amounts = (settings.frequency_penalty * counts + settings.presence_offset).astype(numpy.float32)
        else:
            amounts = numpy.zeros(len(window), dtype=numpy.float32)
        return ids, factor, amounts

    def dry_penalties(self):
        """DRY (step 0): {token: amount subtracted} for the tokens that would extend a repeat of at
        least dry_allowed_length tokens of the context; a repeat never extends across a breaker.
        The search is compiled (`rpserver::dry_repeats`) where the kernels are built."""
        settings = self.settings
        if not settings.dry_multiplier or len(self.context) < 2:
            return {}
        repeats = self._dry_repeats_compiled() if kernels.available() else self.dry_repeats_reference()
        allowed = settings.dry_allowed_length
        # The exponent is capped so that a long loop's penalty stays a finite float32.
        return {token: settings.dry_multiplier * settings.dry_base ** min(length - allowed, DRY_MAX_EXPONENT)
                for token, length in repeats}

    def _dry_repeats_compiled(self):
        context = self._dry_context.tokens
        if self.settings.dry_range is not None:
            context = context[-self.settings.dry_range:]
        tokens, lengths = torch.ops.rpserver.dry_repeats(torch.from_numpy(context), self._dry_breakers,
                                                         self.settings.dry_allowed_length)
        return zip(tokens.tolist(), lengths.tolist())

    def dry_repeats_reference(self):
        """DRY's search in Python (without the kernels, and the compiled one's reference): (token, the
        longest repeat it would extend) for the tokens whose repeat is at least dry_allowed_length."""
        settings = self.settings
        context = self.context if settings.dry_range is None else self.context[-settings.dry_range:]
        breakers, last = settings.dry_breakers, context[-1]
        if last in breakers:
            return []
        longest = {}  # next token -> the longest repeat it would extend
        end = len(context) - 1
        for at in numpy.flatnonzero(numpy.asarray(context[:-1], dtype=numpy.int64) == last).tolist():
            following = context[at + 1]
            if following in breakers:
                continue
            length = 1  # context[at] == last; how far back the match goes
            while length <= at and context[at - length] == context[end - length] and \
                    context[at - length] not in breakers:
                length += 1
            if length > longest.get(following, 0):
                longest[following] = length
        return [(token, length) for token, length in longest.items() if length >= settings.dry_allowed_length]

    @property
    def truncates(self):
        settings = self.settings
        return bool(settings.top_k or settings.typical_p < 1.0 or settings.xtc_probability > 0.0)

    def xtc_cut(self):
        """XTC's threshold for this step: when XTC is on, its coin is drawn from the reply's random
        numbers (before the draw's); NO_XTC (no cut) when it is off or the coin says no."""
        settings = self.settings
        if settings.xtc_probability > 0.0 and self.random.random() < settings.xtc_probability:
            return settings.xtc_threshold
        return NO_XTC

    def truncate(self, logits):
        """Step 4's top_k, typical_p and XTC on this reply's survivors (float32 logits, in id order):
        the indices of those that stay, ascending. In numpy: without the kernels, and the reference
        of the compiled `rpserver::sampling_truncate`."""
        settings = self.settings
        index = numpy.arange(len(logits))
        if settings.top_k and settings.top_k < len(index):
            index = numpy.sort(numpy.argsort(-logits, kind="stable")[:settings.top_k])
        if settings.typical_p >= 1.0 and settings.xtc_probability <= 0.0:
            return index
        scaled = numpy.exp(logits[index].astype(numpy.float64) - float(logits[index].max()))
        probs = scaled / scaled.sum()
        if settings.typical_p < 1.0 and len(index) > 1:
            with numpy.errstate(divide="ignore"):
                surprise = -numpy.log(probs)
            entropy = float(numpy.sum(numpy.where(probs > 0, probs * surprise, 0.0)))
            order = numpy.argsort(numpy.abs(surprise - entropy), kind="stable")
            count = min(int(numpy.searchsorted(numpy.cumsum(probs[order]), settings.typical_p)) + 1, len(order))
            keep = numpy.sort(order[:count])
            index, probs = index[keep], probs[keep] / probs[keep].sum()
        xtc_threshold = self.xtc_cut()
        if xtc_threshold <= 1.0:
            above = numpy.flatnonzero(probs >= xtc_threshold)
            if len(above) >= 2:  # all of them go but the least likely
                least = above[numpy.argmin(probs[above])]
                index = index[numpy.isin(numpy.arange(len(index)), above[above != least], invert=True)]
        return index

    def report(self, token, logprobs):
        """Keep the drawn token's log probability and the most likely tokens' (logprobs: the row's
        log-softmax over the vocabulary)."""
        top = []
        if self.top_logprobs:
            values, ids = torch.topk(logprobs, self.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
        self.logprobs = (token, float(logprobs[token]), top)


# DRY's penalty grows as dry_base ** (repeat - dry_allowed_length) up to this exponent.
DRY_MAX_EXPONENT = 64

# An XTC threshold no probability reaches: no cut this step.
NO_XTC = 2.0


class TokenLog:
    """A growing int64 array of token ids (`tokens`: a view of those so far), appended to in
    amortised constant time: what the compiled DRY search reads each step without a copy."""

    def __init__(self, tokens=()):
        self._buffer = numpy.zeros(max(64, 2 * len(tokens)), dtype=numpy.int64)
        self._buffer[:len(tokens)] = tokens
        self._length = len(tokens)

    @property
    def tokens(self):
        return self._buffer[:self._length]

    def append(self, token):
        if self._length == len(self._buffer):
            self._buffer = numpy.concatenate([self._buffer, numpy.zeros_like(self._buffer)])
        self._buffer[self._length] = token
        self._length += 1


@torch.inference_mode()
def candidates_batch(samplers, logits):
    """Steps 0-5 for B replies at once; logits [B, vocab] (modified in place if on the CPU).

    Returns a list of (ids, probabilities) numpy arrays. No full softmax is
    needed: a token survives min_p when its logit is at least
    max + ln(min_p), and temperature on the survivors' renormalised
    probabilities is a softmax of their logits / temperature (`survivors`);
    the survivors are few, and the rest runs in numpy.
    """
    ids, kept, counts = truncate(samplers, *survivors(samplers, logits))
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
    """Steps 0, 1, 2 and min_p for B replies: (token ids, float32 logits) of every row's survivors,
    row after row, and their count per row; logits [B, vocab] (modified in place if on the CPU).

    The full-vocabulary part (the penalties, each row's top logit, the
    survivors) is one compiled pass over each row where inference/kernels is
    built (`rpserver::sampling_candidates`), else numpy and PyTorch
    operations with the same float32 arithmetic (`_survivors_numpy`).
    """
    logits = logits.to("cpu", torch.float32).contiguous()
    for row, sampler in enumerate(samplers):
        shift = dict(sampler.logit_bias)
        for token, amount in sampler.dry_penalties().items():
            shift[token] = shift.get(token, 0.0) - amount
        if shift:
            ids = torch.tensor(list(shift), dtype=torch.long)
            logits[row, ids] += torch.tensor(list(shift.values()), dtype=torch.float32)
    logits.index_fill_(1, samplers[0].banned, -math.inf)
    # With min_p 0 (ln = -inf) every finite logit survives; banned ones (-inf) never do.
    log_min_p = torch.log(torch.tensor([s.settings.min_p for s in samplers], dtype=torch.float32))
    compiled = _survivors_compiled if kernels.available() else _survivors_numpy
    return compiled(samplers, logits, log_min_p)


NO_PENALTIES = (numpy.zeros(0, dtype=numpy.int64), numpy.float32(1.0), numpy.zeros(0, dtype=numpy.float32))


def _survivors_compiled(samplers, logits, log_min_p):
    """Step 2 and min_p in one compiled pass over each row (inference/kernels/sampling.cpp):
    (token ids, float32 logits) of every row's survivors, row after row, and their count per row."""
    penalties = [sampler.penalties() or NO_PENALTIES for sampler in samplers]
    rows = numpy.zeros(len(samplers) + 1, dtype=numpy.int64)
    numpy.cumsum([len(ids) for ids, _, _ in penalties], out=rows[1:])
    factors = torch.tensor([factor for _, factor, _ in penalties], dtype=torch.float32)
    # The kernel subtracts frequency x count: here count is each token's whole amount, frequency 1.
    ones = torch.ones(len(samplers), dtype=torch.float32)
    ids, kept, found = torch.ops.rpserver.sampling_candidates(
        logits, torch.from_numpy(numpy.concatenate([ids for ids, _, _ in penalties])),
        torch.from_numpy(numpy.concatenate([amounts for _, _, amounts in penalties])), torch.from_numpy(rows),
        factors, ones, log_min_p)
    return ids.numpy(), kept.numpy(), found.numpy()


def _survivors_numpy(samplers, logits, log_min_p):
    """_survivors_compiled's result from numpy and PyTorch operations (without the kernels)."""
    flat = logits.numpy().reshape(-1)  # the same memory, for numpy's cheaper scattered reads and writes
    batch, vocab = logits.shape
    # The penalised tokens, as positions in the flat logits, through numpy (torch.tensor() of a Python
    # list costs ~1 us per element, and torch's two-index gather and scatter ~4x numpy's flat ones).
    at, factors, amounts = [], [], []
    for row, sampler in enumerate(samplers):
        penalties = sampler.penalties()
        if penalties is not None:
            ids, factor, amount = penalties
            at.append(ids + row * vocab)
            factors.append(numpy.full(len(ids), factor, dtype=numpy.float32))
            amounts.append(amount)
    if at:
        at, factor, amount = numpy.concatenate(at), numpy.concatenate(factors), numpy.concatenate(amounts)
        picked = flat[at]
        flat[at] = numpy.where(picked > 0, picked / factor, picked * factor) - amount
    threshold = (logits.amax(dim=1, keepdim=True) + log_min_p.unsqueeze(1)).clamp(min=FLOAT_MIN)
    where = numpy.flatnonzero((logits >= threshold).numpy())
    row_of, ids = numpy.divmod(where, vocab)
    return ids, flat[where], numpy.bincount(row_of, minlength=batch)


def truncate(samplers, ids, kept, counts):
    """top_k, typical_p and XTC (step 4) on the survivors of the rows that set them: one compiled call
    for the batch (`rpserver::sampling_truncate`) where the kernels are built, else numpy per row."""
    if not any(sampler.truncates for sampler in samplers):
        return ids, kept, counts
    step = _truncate_compiled if kernels.available() else _truncate_numpy
    return step(samplers, ids, kept, counts)


def _truncate_compiled(samplers, ids, kept, counts):
    settings = [sampler.settings for sampler in samplers]
    ids, kept, counts = torch.ops.rpserver.sampling_truncate(
        torch.from_numpy(ids), torch.from_numpy(kept), torch.from_numpy(numpy.asarray(counts, dtype=numpy.int64)),
        torch.tensor([s.top_k for s in settings], dtype=torch.long),
        torch.tensor([s.typical_p for s in settings], dtype=torch.float64),
        torch.tensor([sampler.xtc_cut() for sampler in samplers], dtype=torch.float64))
    return ids.numpy(), kept.numpy(), counts.numpy()


def _truncate_numpy(samplers, ids, kept, counts):
    """_truncate_compiled's result, row by row in numpy (Sampler.truncate)."""
    starts = numpy.concatenate([[0], numpy.cumsum(counts)])
    keep, counts = [], numpy.array(counts, dtype=numpy.int64)
    for row, sampler in enumerate(samplers):
        start, end = int(starts[row]), int(starts[row + 1])
        index = sampler.truncate(kept[start:end]) + start if sampler.truncates else numpy.arange(start, end)
        keep.append(index)
        counts[row] = len(index)
    keep = numpy.concatenate(keep)
    return ids[keep], kept[keep], counts


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
    without them, numpy per reply. A reply that asked for logprobs gets them
    from the logits as they came (`Sampler.report`).
    """
    wanted = [row for row, sampler in enumerate(samplers) if sampler.top_logprobs is not None]
    logprobs = torch.log_softmax(logits[wanted].to("cpu", torch.float32), dim=1) if wanted else None
    if not kernels.available():
        tokens = [sampler.draw(ids, probs)
                  for sampler, (ids, probs) in zip(samplers, candidates_batch(samplers, logits))]
    else:
        ids, kept, counts = truncate(samplers, *survivors(samplers, logits))
        settings = [sampler.settings for sampler in samplers]
        drawn, surprises = torch.ops.rpserver.sampling_draw(
            torch.from_numpy(ids), torch.from_numpy(kept), torch.from_numpy(numpy.asarray(counts, dtype=numpy.int64)),
            torch.tensor([s.temperature for s in settings], dtype=torch.float64),
            torch.tensor([s.top_p for s in settings], dtype=torch.float64),
            torch.tensor([sampler.mu for sampler in samplers], dtype=torch.float64),
            torch.tensor([sampler.random.random() for sampler in samplers], dtype=torch.float64))
        tokens = [sampler.accept(token, surprise)
                  for sampler, token, surprise in zip(samplers, drawn.tolist(), surprises.tolist())]
    for at, row in enumerate(wanted):
        samplers[row].report(tokens[row], logprobs[at])
    return tokens


def banned_tokens(tokenizer, vocab_size):
    """Token 0 and every id the tokenizer cannot spell."""
    return torch.tensor([i for i in range(vocab_size) if i == 0 or i not in tokenizer.pieces], dtype=torch.long)
