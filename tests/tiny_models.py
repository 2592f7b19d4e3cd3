"""The models the suite serves, written into the run's data directory when this is first imported:
the tiny model (random weights, 2 layers of 128) and its endless variant."""

import torch

from environment import ENDLESS_MODEL, TINY_MODEL
from inference.checkpoint import write_demo_model
from inference.tokenizer import world_tokenizer


def write_endless_model(path):
    """The tiny model, changed so that it never writes a line break: its replies never end their turn
    (a blank line) and run to the length limit; with UNTIL_THE_READER_LEAVES (servers.py), until
    their reader leaves.

    One component of the final norm's output is pinned to 100 (weight 0, bias 100), and that column of
    the head is +1 for every token and -1 for those containing a line break: they score ~200 below every
    other token (the rest of a logit is a few units), so no sampler setting keeps them.
    """
    weights = torch.load(TINY_MODEL)
    breaks = [token for token, piece in world_tokenizer().pieces.items() if b"\n" in piece]
    weights["ln_out.weight"][0] = 0
    weights["ln_out.bias"][0] = 100
    weights["head.weight"][:, 0] = 1
    weights["head.weight"][breaks, 0] = -1
    torch.save(weights, path)
    return path


write_demo_model(TINY_MODEL, n_layer=2, n_embd=128)
write_endless_model(ENDLESS_MODEL)
