"""The model and the engine on a CUDA GPU (`cuda fp16`, `cuda bf16`), against the exact CPU fp32 forward.

Skipped as a whole, with one reason in the summary, where no CUDA device is present.
"""

import asyncio

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device here: the cuda fp16/bf16 model and engine tests need one", allow_module_level=True)

from inference.backends import Rwkv7Backend, resolve_strategy  # noqa: E402
from inference.checkpoint import load_weights, write_demo_model  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.rwkv7 import PRECISION_TOLERANCE, RWKV7Model  # noqa: E402
from inference.sampling import SamplingSettings  # noqa: E402
from inference.tokenizer import world_tokenizer  # noqa: E402

PROMPT = [5, 300, 1000, 25, 7777, 12, 65000, 33, 4096, 261, 0, 65535]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("cuda") / "tiny", n_layer=2, n_embd=128, seed=7)


@pytest.fixture(scope="module")
def weights(model_path):
    return load_weights(model_path)


@pytest.fixture(scope="module")
def exact(weights):
    return RWKV7Model(weights, precision="fp32")


def relative_errors(expected, got):
    got = got.float().cpu()
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).reshape(-1).tolist()


def test_auto_picks_cuda_fp16():
    assert resolve_strategy("auto") == "cuda fp16"


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_stays_within_its_documented_relative_error(weights, exact, precision):
    gpu = RWKV7Model(weights, device="cuda", precision=precision)
    prompts = [[(p * (i + 3)) % 65000 + 1 for p in PROMPT] * (1 + i % 3) for i in range(8)]
    ref_state, gpu_state = exact.zero_state(8), gpu.zero_state(8)
    errors = []
    for step in [prompts, *([[token]] * 8 for token in (11, 22, 33, 44))]:
        errors += relative_errors(exact.forward(step, ref_state), gpu.forward(step, gpu_state))
    assert max(errors) < PRECISION_TOLERANCE[precision], errors
    assert all(t.device.type == "cuda" and t.dtype == torch.float32 for t in gpu_state)
    long = torch.tensor([PROMPT * 30])  # forward_seq in several pieces
    expected = exact.forward_seq(long, exact.zero_state(1))
    assert max(relative_errors(expected, gpu.forward_seq(long.cuda(), gpu.zero_state(1), chunk=64))) < \
        PRECISION_TOLERANCE[precision]


@pytest.mark.parametrize("strategy", ["cuda fp16", "cuda bf16"])
def test_a_reply_on_cuda_hands_back_the_state_of_everything_it_read(model_path, strategy):
    backend = Rwkv7Backend(model_path, strategy)
    engine = Engine(backend, world_tokenizer())
    prompt = engine.tokenizer.encode("friend: Hello there, how are you today?\n\nMira:")

    async def reply_then_reread():
        others = [engine.generate(None, engine.tokenizer.encode(f"friend: other {i}\n\nMira:"), SamplingSettings(),
                                  max_tokens=8, seed=i) for i in range(3)]
        mine = engine.generate(None, prompt, SamplingSettings(), max_tokens=8, seed=1)
        for generation in [*others, mine]:
            async for _ in generation:
                pass
        reread, _ = await engine.read(None, prompt + mine.reply.tokens)
        return mine.reply, reread

    try:
        reply, reread = asyncio.run(reply_then_reread())
    finally:
        engine.stop()
    for got, expected in zip(reply.state, reread):
        assert got.device.type == "cuda"
        assert (got - expected).norm() <= 0.05 * expected.norm() + 1e-3
    stored = backend.state_tensors(reply.state)
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in stored)
    restored = backend.state_from_tensors(stored)
    assert all(t.device.type == "cuda" and torch.equal(t.cpu(), s.unsqueeze(0)) for t, s in zip(restored, stored))
