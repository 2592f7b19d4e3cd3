"""Our batched RWKV-7 forward against the rwkv package's RWKV-7 (RWKV_V7_ON=1)."""

import os

import pytest
import torch

from conftest import TINY_MODEL
from inference.checkpoint import load_weights
from inference.rwkv7 import PRECISION_TOLERANCE, RWKV7Model, state_split, state_stack

os.environ.setdefault("RWKV_V7_ON", "1")  # conftest sets these before anything imports rwkv.model
from rwkv.model import RWKV  # noqa: E402

TOKENS = [5, 300, 1000, 25, 7777, 12, 65000, 33, 4096, 261]


@pytest.fixture(scope="module")
def weights():
    return load_weights(TINY_MODEL)


@pytest.fixture(scope="module")
def reference():
    return RWKV(str(TINY_MODEL.with_suffix("")), "cpu fp32")


@pytest.fixture(scope="module")
def model(weights):
    return RWKV7Model(weights)


def close(ours, theirs, tolerance=1e-4):
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance)


def test_reading_a_prompt_matches_the_package(model, reference):
    expected_logits, expected_state = reference.forward(TOKENS, None)
    state = model.zero_state(1)
    logits = model.forward_seq(torch.tensor([TOKENS]), state)
    close(logits[0], expected_logits)
    for ours, theirs in zip(state, expected_state):
        close(ours[0], theirs)


def test_decoding_matches_the_package_token_by_token(model, reference):
    state, theirs = model.zero_state(1), None
    for token in TOKENS:
        logits = model.forward_one(torch.tensor([token]), state)
        expected, theirs = reference.forward([token], theirs)
        close(logits[0], expected)


def test_greedy_decoding_picks_the_same_64_tokens(model, reference):
    state = model.zero_state(1)
    logits = model.forward_seq(torch.tensor([TOKENS]), state)[0]
    expected, theirs = reference.forward(TOKENS, None)
    ours_tokens, their_tokens = [], []
    for _ in range(64):
        ours_tokens.append(int(logits.argmax()))
        their_tokens.append(int(expected.argmax()))
        logits = model.forward_one(torch.tensor([ours_tokens[-1]]), state)[0]
        expected, theirs = reference.forward([their_tokens[-1]], theirs)
    assert ours_tokens == their_tokens


def test_reading_at_once_equals_stepping_one_token_at_a_time(model):
    whole, stepped = model.zero_state(1), model.zero_state(1)
    logits = model.forward_seq(torch.tensor([TOKENS]), whole)
    for token in TOKENS:
        last = model.forward_one(torch.tensor([token]), stepped)
    close(logits, last)
    for a, b in zip(whole, stepped):
        close(a, b)


def test_a_batch_of_different_states_equals_each_sequence_alone(model):
    histories = [TOKENS[:3], TOKENS[3:5], TOKENS[5:6], TOKENS]
    states = []
    for history in histories:
        state = model.zero_state(1)
        model.forward_seq(torch.tensor([history]), state)
        states.append(state)
    batch = state_stack(states)
    next_tokens = torch.tensor([7, 8, 9, 10])
    batched = model.forward_one(next_tokens, batch)
    for row, state in enumerate(states):
        alone = model.forward_one(next_tokens[row:row + 1], state)
        close(batched[row], alone[0])
        for a, b in zip(state_split(batch)[row], state):
            close(a, b)


def test_states_split_and_stack_back_unchanged(model):
    state = model.zero_state(3)
    model.forward_one(torch.tensor([1, 2, 3]), state)
    parts = state_split(state)
    assert len(parts) == 3 and parts[0][1].shape == (1, model.n_head, 64, 64)
    for a, b in zip(state_stack(parts), state):
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_precision_stays_within_its_documented_error(weights, model, precision):
    reference_logits = model.forward_seq(torch.tensor([TOKENS * 3]), model.zero_state(1))
    lower = RWKV7Model(weights, precision=precision)
    logits = lower.forward_seq(torch.tensor([TOKENS * 3]), lower.zero_state(1))
    error = ((logits - reference_logits).norm() / reference_logits.norm()).item()
    assert error < PRECISION_TOLERANCE[precision], error


def test_fp16_on_the_cpu_is_refused_clearly(weights):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        RWKV7Model(weights, precision="fp16")
