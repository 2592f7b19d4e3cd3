"""The reply sampler of the legacy API: presence penalty, min_p, temperature, Mirostat.

For one step, on the logits of the next token:
1. banned tokens (0, the end-of-text token, and ids outside the vocabulary)
   get probability 0;
2. presence penalty: every token already used in this reply has its logit
   divided by (1 + presence_penalty) if positive, multiplied if negative;
3. softmax;
4. min_p: tokens whose probability is below min_p x the top probability are dropped;
5. temperature: the kept probabilities are raised to 1/temperature and renormalised;
6. Mirostat (v2): tokens whose surprise -log2(p) exceeds mu are dropped (the
   most likely token always stays), one token is drawn from the rest, and mu
   moves by rate x (tau - observed surprise). mu starts at 2 x tau.
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    tau: float = 3.0
    rate: float = 0.1
    min_p: float = 0.05
    temperature: float = 1.2
    presence_penalty: float = 0.2


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

    def __init__(self, settings, banned, generator=None):
        self.settings = settings
        self.banned = banned  # LongTensor of token ids that are never sampled
        self.generator = generator
        self.mu = 2.0 * settings.tau
        self.used = set()

    def candidates(self, logits):
        """(token ids, probabilities) left after steps 1-5, before Mirostat."""
        s = self.settings
        logits = logits.float().clone()
        logits[self.banned] = -math.inf
        if self.used and s.presence_penalty:
            used = torch.tensor(sorted(self.used), dtype=torch.long)
            picked = logits[used]
            factor = 1.0 + s.presence_penalty
            logits[used] = torch.where(picked > 0, picked / factor, picked * factor)
        probs = torch.softmax(logits, dim=-1)
        ids = torch.nonzero((probs >= s.min_p * probs.max()) & (probs > 0)).flatten()
        kept = probs[ids].double()
        kept = kept ** (1.0 / s.temperature)
        return ids, kept / kept.sum()

    def sample(self, logits):
        """Draw the next token and update Mirostat's mu."""
        ids, probs = self.candidates(logits)
        surprise = -torch.log2(probs)
        allowed = surprise <= self.mu
        allowed[torch.argmax(probs)] = True
        ids, probs = ids[allowed], probs[allowed]
        probs = probs / probs.sum()
        choice = torch.multinomial(probs, 1, generator=self.generator).item()
        observed = -math.log2(probs[choice].item())
        self.mu -= self.settings.rate * (observed - self.settings.tau)
        token = int(ids[choice])
        self.used.add(token)
        return token


def banned_tokens(tokenizer, vocab_size):
    """Token 0 and every id the tokenizer cannot spell."""
    return torch.tensor([i for i in range(vocab_size) if i == 0 or i not in tokenizer.pieces], dtype=torch.long)
