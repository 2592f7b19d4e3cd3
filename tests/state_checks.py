"""Comparing model states: how close a state read again must be to the state first read."""

import torch
from django.conf import settings

from inference.backends import parse_strategy, resolve_strategy
from inference.rwkv7 import PRECISION_TOLERANCE


def server_precision():
    """The precision the suite's servers (and this process's engine) compute in."""
    return parse_strategy(resolve_strategy(settings.RPSERVER["STRATEGY"]))[1]


def state_errors(a, b):
    """Each tensor's relative error of state a against state b."""
    return [((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item() for x, y in zip(a, b)]


# How close a state read again must be to the state first read. At fp32 the
# two differ by float rounding only: elementwise 1e-4. At the lossy
# precisions activations are rounded to a grid in every pass, and where
# reading tokens one per pass (a reply) and all at once (a rebuild) give
# float results that differ in their last bit, a value can round to either
# side of a grid step and the difference propagates (on CI's machine, before
# the LoRA products were summed in one order whatever the batch, one such
# flip moved a rebuilt int8 state by up to 0.003 where its values reach ~8).
# The int8 and bf16 passes on the CPU with the kernels built are now the
# same bit for bit (int8: tests/test_rwkv7.py; both: bench/reread.py); fp16
# and bf16 on CUDA and int8 without the kernels are not.
# So there each tensor is compared as a whole, by its relative (Frobenius)
# error, against the precision's own bound (rwkv7.PRECISION_TOLERANCE, int8
# 0.06): bench/reread.py measures how far re-reading goes (for int8 in its
# worst case, every activation nudged, 0.020) and how far a wrong state is
# (the state one token earlier: more than 1.2).
def assert_same_state(a, b, precision="fp32"):
    """a is state b read again, at `precision`."""
    assert len(a) == len(b)
    if precision == "fp32":
        for x, y in zip(a, b):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)
    else:
        assert max(state_errors(a, b)) <= PRECISION_TOLERANCE[precision], state_errors(a, b)
