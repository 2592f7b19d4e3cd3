"""The engine on the tiny real model: reading, generating, batching, cancelling."""

import asyncio
import os
import subprocess
import sys

import pytest
import torch
from django.conf import settings

from conftest import assert_same_state
from inference.backends import Rwkv7Backend, RwkvPackageBackend
from inference.engine import Engine, FinishReason, Job, JobStatus
from inference.runtime import demo_model_path
from inference.sampling import SamplingSettings
from inference.tokenizer import world_tokenizer

PROMPT = "friend: Hello there, how are you today?\n\nMira:"


@pytest.fixture(scope="module")
def engine():
    """An exact (cpu fp32) engine: batching, chunking and snapshots must not
    change a single result, which the default int8 only promises within its
    error bound (activations are quantised per pass)."""
    engine = Engine(Rwkv7Backend(settings.RPSERVER["MODEL"] or demo_model_path(), "cpu fp32"), world_tokenizer())
    yield engine
    engine.stop()


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(generation):
    texts = [text async for text in generation]
    return texts, generation.reply


def generate(engine, *args, **kwargs):
    """(texts, reply) of one reply generated alone."""

    async def go():
        return await collect(engine.generate(*args, **kwargs))

    return run(go())


def test_reading_in_chunks_equals_reading_at_once(engine):
    tokens = engine.tokenizer.encode(PROMPT * 3)
    chunked = Engine(engine.backend, engine.tokenizer, prefill_chunk=5)
    try:
        whole, _ = run(engine.read(None, tokens))
        parts, snapshots = run(chunked.read(None, tokens, snapshot_at={7}))
        assert_same_state(whole, parts)
        seven, _ = run(engine.read(None, tokens[:7]))
        assert_same_state(snapshots[7], seven)
    finally:
        chunked.stop()


def test_a_reply_hands_back_the_state_of_everything_it_read(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    texts, reply = generate(engine, None, prompt, SamplingSettings(), max_tokens=6, seed=3,
                            snapshot_at={len(prompt) - 1})
    assert texts[-1] == reply.text
    expected, _ = run(engine.read(None, prompt + reply.tokens))
    assert_same_state(reply.state, expected)
    before_last, _ = run(engine.read(None, prompt[:-1]))
    assert_same_state(reply.snapshots[len(prompt) - 1], before_last)


def test_a_reply_takes_its_snapshot_inside_the_pass_that_reads_its_prompt(engine):
    # One pass reads the prompt (taking the state before its last token on the way) and
    # samples the token; one reads that token and the closing blank line. The snapshot
    # used to be a pass of its own, and the first token came a pass later.
    prompt = engine.tokenizer.encode(PROMPT)
    assert len(prompt) <= engine.prefill_chunk
    steps = engine.steps
    _, reply = generate(engine, None, prompt, SamplingSettings(), max_tokens=1, seed=5,
                        snapshot_at={len(prompt) - 1})
    assert engine.steps - steps == 2
    before_last, _ = run(engine.read(None, prompt[:-1]))
    assert_same_state(reply.snapshots[len(prompt) - 1], before_last)


def test_a_reply_cut_at_the_limit_still_reads_the_closing_blank_line(engine):
    # No token holding a line break can be written: the reply cannot end its turn, and is cut.
    no_breaks = {token: -100 for token, piece in engine.tokenizer.pieces.items() if b"\n" in piece}
    _, reply = generate(engine, None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=3, seed=1,
                        logit_bias=no_breaks)
    assert reply.finish_reason is FinishReason.LENGTH
    assert len(reply.tokens) == 3 + len(engine.turn_end_tokens)
    assert reply.tokens[-len(engine.turn_end_tokens):] == engine.turn_end_tokens
    assert engine.tokenizer.decode(reply.tokens).endswith("\n\n")


def test_a_reply_that_ends_its_turn_reads_its_own_blank_line_only(engine):
    # The blank line's token is favoured far above all others: the reply writes it at once, and ends.
    blank_line = {token: 100 for token in engine.turn_end_tokens}
    _, reply = generate(engine, None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=3, seed=1,
                        logit_bias=blank_line)
    assert reply.finish_reason is FinishReason.STOP
    assert reply.tokens == engine.turn_end_tokens and reply.text == ""


def test_a_reply_alone_equals_the_same_reply_among_others(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    _, alone = generate(engine, None, prompt, SamplingSettings(), max_tokens=10, seed=42)

    async def together():
        others = [engine.generate(None, engine.tokenizer.encode(f"friend: other {i}\n\nMira:"),
                                  SamplingSettings(temperature=0.5 + i), max_tokens=10, seed=i) for i in range(3)]
        mine = engine.generate(None, prompt, SamplingSettings(), max_tokens=10, seed=42)
        results = await asyncio.gather(*(collect(g) for g in [*others, mine]))
        return results[-1][1]

    batched = run(together())
    assert batched.tokens == alone.tokens and batched.text == alone.text
    assert_same_state(batched.state, alone.state)


def test_streams_progress_together(engine):

    async def two():
        order = []

        async def follow(name, generation):
            async for _ in generation:
                order.append(name)

        a = engine.generate(None, engine.tokenizer.encode("a:"), SamplingSettings(), max_tokens=8, seed=1)
        b = engine.generate(None, engine.tokenizer.encode("b:"), SamplingSettings(), max_tokens=8, seed=2)
        await asyncio.gather(follow("a", a), follow("b", b))
        return order

    order = run(two())
    # Interleaved, not one stream after the other.
    assert order.index("b") < len(order) - order[::-1].index("a") - 1


def test_a_cancelled_reply_frees_the_engine(engine):

    async def cancel_then_read():
        generation = engine.generate(None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=10_000)
        async for _ in generation:
            generation.cancel()
            break
        before = engine.tokens_generated
        state, _ = await asyncio.wait_for(engine.read(None, [1, 2, 3]), timeout=30)
        return before, engine.tokens_generated, state

    before, after, state = run(cancel_then_read())
    assert after - before < 100 and state is not None


def test_prompts_read_together_equal_prompts_read_alone(engine):
    prompts = [engine.tokenizer.encode(PROMPT * n) for n in (1, 2, 3)]
    alone = [run(engine.read(None, tokens))[0] for tokens in prompts]

    async def together():
        return await asyncio.gather(*(engine.read(None, tokens, snapshot_at={5}) for tokens in prompts))

    for (state, snapshots), expected, tokens in zip(run(together()), alone, prompts):
        assert_same_state(state, expected)
        assert_same_state(snapshots[5], run(engine.read(None, tokens[:5]))[0])


def test_a_reply_decoding_while_a_long_prompt_is_read_in_chunks_is_unchanged(engine):
    # Both start together with a 4-token chunk per turn shared by the readers:
    # the reply's prompt is read in a few turns, and the long prompt (4x as
    # long) is still being read through the reply's decode steps, each turn
    # one forward pass that mixes a chunk with a decode step.
    prompt = engine.tokenizer.encode(PROMPT)
    long_prompt = engine.tokenizer.encode(PROMPT * 4)
    _, alone = generate(engine, None, prompt, SamplingSettings(), max_tokens=12, seed=7)
    expected_read, _ = run(engine.read(None, long_prompt))
    mixed = Engine(engine.backend, engine.tokenizer, prefill_chunk=4)

    async def together():
        generation = mixed.generate(None, prompt, SamplingSettings(), max_tokens=12, seed=7)
        (_, reply), (state, _) = await asyncio.gather(collect(generation), mixed.read(None, long_prompt))
        return reply, state

    try:
        reply, read_state = run(together())
    finally:
        mixed.stop()
    assert len(long_prompt) - len(prompt) >= 4 * 2  # so at least two decode turns also read a chunk
    assert reply.tokens == alone.tokens and reply.text == alone.text
    assert_same_state(reply.state, alone.state)
    assert_same_state(read_state, expected_read)


def test_a_slot_batch_keeps_each_state_in_its_row_as_others_come_and_go(engine):
    backend = engine.backend
    states = {key: run(engine.read(None, engine.tokenizer.encode(f"{key}: hello")))[0] for key in "abcde"}
    batch = backend.new_batch()
    for key in "abcde":
        batch.add(key, states[key])
    assert batch.remove("b") is not None and batch.remove("a") is not None  # rows move to fill the gaps
    batch.add("f", None)  # the zero state
    expected = {key: backend.read([7, 8], states[key]) for key in "cde"}
    expected["f"] = backend.read([7, 8], backend.zero_state())
    # Any order, any length; "e" and "c" also hand back their states after their first token.
    logits, snapshots = batch.step({key: [7, 8] for key in ("f", "e", "d", "c")}, {"e": 1, "c": 1})
    for row, key in enumerate(("f", "e", "d", "c")):
        torch.testing.assert_close(logits[row], expected[key][0], rtol=1e-4, atol=1e-4)
        assert_same_state(batch.state(key), expected[key][1])
    assert set(snapshots) == {"e", "c"}
    for key in snapshots:
        assert_same_state(snapshots[key], backend.read([7], states[key])[1])
    assert len(batch) == 4 and "a" not in batch and "f" in batch


def test_a_batch_of_the_rwkv_package_takes_snapshots_inside_a_step_too(engine):
    backend = RwkvPackageBackend(settings.RPSERVER["MODEL"] or demo_model_path(), "cpu fp32")
    batch = backend.new_batch()
    batch.add("a", None)
    batch.add("b", None)
    logits, snapshots = batch.step({"a": [5, 6, 7], "b": [8]}, {"a": 2})
    assert list(snapshots) == ["a"]
    assert_same_state(snapshots["a"], backend.read([5, 6], backend.zero_state())[1])
    expected_logits, expected = backend.read([5, 6, 7], backend.zero_state())
    torch.testing.assert_close(logits[0], expected_logits, rtol=1e-4, atol=1e-4)
    assert_same_state(batch.state("a"), expected)


def test_prompts_read_together_share_the_chunk_oldest_first_with_a_few_tokens_for_each(engine):
    chunked = Engine(engine.backend, engine.tokenizer, prefill_chunk=64)

    def job(number, length, snapshot_at=()):
        return Job(id=number, tokens=[1] * length, state=None, snapshot_at=frozenset(snapshot_at), loop=None,
                   events=None)

    jobs = [job(1, 30), job(2, 100), job(3, 100), job(4, 2), job(5, 100, snapshot_at={3, 5})]
    # 6 each reserved (at most half the chunk: 30), the other 34 to the oldest first; a read
    # passes one snapshot point (taken inside the pass) and stops at the next.
    assert chunked._read_sizes(jobs) == {1: 30, 2: 16, 3: 6, 4: 2, 5: 5}
    many = chunked._read_sizes([job(n, 1000) for n in range(20)])
    assert sum(many.values()) == 64 and many[0] == 45 and many[19] == 1  # 20 x 1, and 44 to the oldest
    assert chunked._read_sizes([job(n, 1000) for n in range(100)])[99] == 1  # never nothing


def test_reading_nothing_hands_back_a_copy_of_the_state(engine):
    start, _ = run(engine.read(None, [1, 2, 3]))
    state, snapshots = run(engine.read(start, [], snapshot_at={0}))
    assert_same_state(state, start)
    assert_same_state(snapshots[0], start)
    assert all(a is not b for a, b in zip(state, start))
    zero, _ = run(engine.read(None, []))
    assert all(float(t.abs().sum()) == 0 for t in zero)


def test_a_reply_ending_with_a_token_that_holds_more_than_the_blank_line_reads_only_the_blank_line(engine):
    # "\n\n   " forced as the first token: the context must end exactly at "\n\n".
    prompt = engine.tokenizer.encode(PROMPT)
    spaces = next(t for t, piece in engine.tokenizer.pieces.items() if piece == b"\n\n   ")
    texts, reply = generate(engine, None, prompt, SamplingSettings(), max_tokens=20, seed=1,
                            logit_bias={spaces: 1000})
    assert reply.finish_reason is FinishReason.STOP
    assert reply.tokens == engine.tokenizer.encode("\n\n") and reply.text == "" and texts[-1] == ""
    expected, _ = run(engine.read(None, prompt + reply.tokens))
    assert_same_state(reply.state, expected)


def test_a_stop_string_ends_the_reply_and_the_text_is_cut_before_it(engine):
    prompt = engine.tokenizer.encode(PROMPT)
    user = engine.tokenizer.encode("User")[0]
    # "UserUser...": the stop string "rUs" spans the first two tokens and ends inside the second.
    texts, reply = generate(engine, None, prompt, SamplingSettings(), max_tokens=20, seed=1,
                            logit_bias={user: 1000}, stop=["rUs", "never"])
    assert reply.finish_reason is FinishReason.STOP and reply.text == "Use"
    assert all(not text.endswith(("r", "rU")) for text in texts)  # a possible stop string is held back
    assert engine.tokenizer.decode(reply.tokens) == "UserUs\n\n"
    expected, _ = run(engine.read(None, prompt + reply.tokens))
    assert_same_state(reply.state, expected)


def test_a_logit_bias_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate(None, [1], SamplingSettings(), 5, logit_bias={10**9: 1.0})


def test_stats_count_steps_tokens_and_jobs_waiting_for_a_row(engine):
    single = Engine(engine.backend, engine.tokenizer, max_batch=1)

    async def two_replies():
        first = single.generate(None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=6, seed=1)
        second = single.generate(None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=6, seed=2)
        async for _ in first:
            during = single.stats()
            break
        await collect(first)
        await collect(second)
        return during

    try:
        during = run(two_replies())
        after = single.stats()
    finally:
        single.stop()
    assert during["running"] == 1 and during["waiting"] == 1
    assert after["running"] == 0 and after["waiting"] == 0 and after["last_batch_size"] == 1
    assert after["tokens_generated"] >= 2 and after["tokens_read"] == 2 * len(engine.tokenizer.encode(PROMPT))
    assert after["steps"] >= after["tokens_generated"]


def test_a_reply_cancelled_while_it_waits_for_a_row_never_runs(engine):
    single = Engine(engine.backend, engine.tokenizer, max_batch=1)

    async def one_running_one_cancelled():
        first = single.generate(None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=8, seed=1)
        second = single.generate(None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=8, seed=2)
        second.cancel()
        await collect(first)
        return first._job, second._job

    try:
        first, second = run(one_running_one_cancelled())
        stats = single.stats()
    finally:
        single.stop()
    assert first.status is JobStatus.FINISHED and second.status is JobStatus.ABORTED
    assert second.generated == [] and second.read == 0
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["tokens_read"] == len(engine.tokenizer.encode(PROMPT))


SERIAL_HELPER = """
import os, sys, threading, torch
sys.path.insert(0, os.getcwd())
from inference.threads import serial_thread
torch.set_num_threads(2)
alive = lambda: len(os.listdir('/proc/self/task'))
def helper(serial):
    if serial:
        serial_thread()
    before = alive()
    for _ in range(3):
        torch.zeros(1 << 20).add_(1)  # far over torch's grain size: parallel when it may be
    print(torch.get_num_threads(), alive() - before)
thread = threading.Thread(target=helper, args=(sys.argv[1] == "serial",))
thread.start()
thread.join()
"""


@pytest.mark.parametrize("serial, expected", [("serial", "1 0"), ("default", "2 1")])
def test_a_serial_helper_thread_never_starts_workers_of_its_own(serial, expected):
    """Only the engine thread may run torch on several cores (inference/threads.py): a
    state-blob thread that did would start an OpenMP worker team, and every process
    with more OpenMP threads than cores decodes at about half speed. The "default"
    case shows that the check sees such a team (it needs 2 cores)."""
    if serial == "default" and (os.cpu_count() or 1) < 2:
        pytest.skip("one core: torch never starts a worker team here")
    result = subprocess.run([sys.executable, "-c", SERIAL_HELPER, serial], capture_output=True, text=True,
                            timeout=60, cwd=settings.BASE_DIR)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
