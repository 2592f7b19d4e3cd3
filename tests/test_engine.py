"""The engine on the tiny real model: reading, generating, batching, cancelling."""

import asyncio

import torch

from inference.engine import Engine, FinishReason
from inference.runtime import get_engine
from inference.sampling import SamplingSettings

PROMPT = "friend: Hello there, how are you today?\n\nMira:"


def run(coroutine):
    return asyncio.run(coroutine)


def assert_same_state(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-5)


async def collect(generation):
    texts = [text async for text in generation]
    return texts, generation.reply


def generate(engine, *args, **kwargs):
    """(texts, reply) of one reply generated alone."""

    async def go():
        return await collect(engine.generate(*args, **kwargs))

    return run(go())


def test_reading_in_chunks_equals_reading_at_once():
    engine = get_engine()
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


def test_a_reply_hands_back_the_state_of_everything_it_read():
    engine = get_engine()
    prompt = engine.tokenizer.encode(PROMPT)
    texts, reply = generate(engine, None, prompt, SamplingSettings(), max_tokens=6, seed=3,
                            snapshot_at={len(prompt) - 1})
    assert texts[-1] == reply.text
    expected, _ = run(engine.read(None, prompt + reply.tokens))
    assert_same_state(reply.state, expected)
    before_last, _ = run(engine.read(None, prompt[:-1]))
    assert_same_state(reply.snapshots[len(prompt) - 1], before_last)


def test_a_reply_cut_at_the_limit_still_reads_the_closing_blank_line():
    engine = get_engine()
    _, reply = generate(engine, None, engine.tokenizer.encode(PROMPT), SamplingSettings(), max_tokens=3, seed=1)
    if reply.finish_reason is FinishReason.LENGTH:
        assert len(reply.tokens) == 3 + len(engine.turn_end_tokens)
        assert reply.tokens[-len(engine.turn_end_tokens):] == engine.turn_end_tokens
    else:
        assert b"\n\n" in engine.tokenizer.decode_bytes(reply.tokens)
    assert engine.tokenizer.decode(reply.tokens).endswith("\n\n") or reply.finish_reason is FinishReason.STOP


def test_a_reply_alone_equals_the_same_reply_among_others():
    engine = get_engine()
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


def test_streams_progress_together():
    engine = get_engine()

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


def test_a_cancelled_reply_frees_the_engine():
    engine = get_engine()

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


def test_prompts_read_together_equal_prompts_read_alone():
    engine = get_engine()
    prompts = [engine.tokenizer.encode(PROMPT * n) for n in (1, 2, 3)]
    alone = [run(engine.read(None, tokens))[0] for tokens in prompts]

    async def together():
        return await asyncio.gather(*(engine.read(None, tokens, snapshot_at={5}) for tokens in prompts))

    for (state, snapshots), expected, tokens in zip(run(together()), alone, prompts):
        assert_same_state(state, expected)
        assert_same_state(snapshots[5], run(engine.read(None, tokens[:5]))[0])
