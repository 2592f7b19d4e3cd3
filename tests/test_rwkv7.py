"""Our batched RWKV-7 forward (inference/rwkv7/) against the rwkv package's RWKV_x070."""

import os

os.environ.setdefault("RWKV_V7_ON", "1")  # must be set before rwkv.model is imported
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ.setdefault("RWKV_CUDA_ON", "0")

import contextlib  # noqa: E402
import io  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import ROOT, assert_same_state  # noqa: E402
from inference import kernels  # noqa: E402
from inference.checkpoint import load_weights, write_demo_model  # noqa: E402
from inference.rwkv7 import PRECISION_TOLERANCE, RWKV7Config, RWKV7Model, layout, ops  # noqa: E402
from inference.rwkv7.linear import _Fp32KernelLinear, _Int8KernelLinear  # noqa: E402
from inference.rwkv7.model import _DECAY_SCALE, _GROUP_NORM_EPS  # noqa: E402
from inference.rwkv7.ops import _step, _steps  # noqa: E402

PROMPT = [5, 300, 1000, 25, 7777, 12, 65000, 33, 4096, 261, 0, 65535]
TIGHT = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_demo_model(tmp_path_factory.mktemp("rwkv7") / "tiny", n_layer=2, n_embd=128, seed=7)


@pytest.fixture(scope="module")
def weights(model_path):
    return load_weights(model_path)


@pytest.fixture(scope="module")
def reference(model_path):
    assert os.environ["RWKV_V7_ON"] == "1"
    with contextlib.redirect_stdout(io.StringIO()):
        from rwkv.model import RWKV

        return RWKV(str(model_path.with_suffix("")), "cpu fp32")


@pytest.fixture(scope="module")
def model(weights):
    return RWKV7Model(weights, precision="fp32")


def state_split(state):
    """A batched state -> list of B states of batch 1 (independent copies)."""
    return [[t[b : b + 1].clone() for t in state] for b in range(state[0].shape[0])]


def state_stack(states):
    """A list of states of batch 1 -> one batched state (new tensors)."""
    return [torch.cat(parts, dim=0) for parts in zip(*states)]


def read_alone(model, tokens):
    state = model.zero_state(1)
    model.forward_seq(torch.tensor([tokens]), state)
    return state


def test_the_model_reports_its_shape(model):
    assert model.config == RWKV7Config(n_layer=2, n_embd=128, n_head=2, head_size=64, vocab_size=65536)
    assert (model.n_layer, model.n_embd, model.n_head, model.head_size, model.vocab_size) == (2, 128, 2, 64, 65536)
    state = model.zero_state(3)
    assert len(state) == 6
    assert [tuple(t.shape) for t in state[:3]] == [(3, 128), (3, 2, 64, 64), (3, 128)]
    assert all(t.dtype == torch.float32 for t in state)


def test_fp32_decoding_matches_the_package_token_by_token(model, reference):
    state, theirs = model.zero_state(1), None
    for token in PROMPT:
        logits = model.forward_one(torch.tensor([token]), state)
        expected, theirs = reference.forward([token], theirs)
        assert logits.shape == (1, 65536) and logits.dtype == torch.float32
        torch.testing.assert_close(logits[0], expected.float(), **TIGHT)
    for ours, package in zip(state, theirs):
        torch.testing.assert_close(ours[0], package.float(), **TIGHT)


def test_a_batch_of_different_states_gives_each_row_what_the_sequence_gives_alone(model):
    histories = [PROMPT[:3], PROMPT[3:5], PROMPT[5:6], PROMPT]
    alone_states = [read_alone(model, h) for h in histories]
    batch = state_stack(alone_states)
    next_tokens = torch.tensor([7, 8, 9, 7])
    for _ in range(3):
        batched = model.forward_one(next_tokens, batch)
        for row, state in enumerate(alone_states):
            alone = model.forward_one(next_tokens[row : row + 1], state)
            torch.testing.assert_close(batched[row], alone[0], **TIGHT)
        next_tokens = batched.argmax(dim=-1)
    # The rows really differ (the test would be empty if every state were alike).
    assert not torch.allclose(batched[0], batched[1], atol=1e-2)
    for row, state in enumerate(state_split(batch)):
        for a, b in zip(state, alone_states[row]):
            torch.testing.assert_close(a, b, **TIGHT)


def test_greedy_decoding_picks_the_same_64_tokens_as_the_package(model, reference):
    state = model.zero_state(1)
    logits = model.forward_seq(torch.tensor([PROMPT]), state)[0]
    expected, theirs = reference.forward(list(PROMPT), None)
    ours_tokens, their_tokens = [], []
    for _ in range(64):
        ours_tokens.append(int(logits.argmax()))
        their_tokens.append(int(expected.argmax()))
        logits = model.forward_one(torch.tensor([ours_tokens[-1]]), state)[0]
        expected, theirs = reference.forward([their_tokens[-1]], theirs)
    assert ours_tokens == their_tokens
    assert len(set(ours_tokens)) > 1  # not a degenerate run of one token


def test_reading_a_prompt_matches_the_package_logits_and_state(model, reference):
    expected, theirs = reference.forward(list(PROMPT), None)
    state = model.zero_state(1)
    logits = model.forward_seq(torch.tensor([PROMPT]), state)
    assert logits.shape == (1, 65536)
    torch.testing.assert_close(logits[0], expected.float(), **TIGHT)
    for ours, package in zip(state, theirs):
        torch.testing.assert_close(ours[0], package.float(), **TIGHT)


@pytest.mark.parametrize("chunk", [256, 5, 1])
def test_reading_a_prompt_equals_stepping_one_token_at_a_time(model, chunk):
    stepped = model.zero_state(1)
    for t, token in enumerate(PROMPT):
        logits = model.forward_one(torch.tensor([token]), stepped)
        whole = model.zero_state(1)
        read = model.forward_seq(torch.tensor([PROMPT[:t + 1]]), whole, chunk=chunk)
        torch.testing.assert_close(read[0], logits[0], **TIGHT)
    for a, b in zip(whole, stepped):
        torch.testing.assert_close(a, b, **TIGHT)


def test_reading_prompts_for_a_batch_equals_reading_each_alone(model):
    prompts = [PROMPT[:6], PROMPT[6:]]
    start = [read_alone(model, [1, 2]), model.zero_state(1)]
    batch = state_stack(start)
    logits = model.forward_seq(torch.tensor(prompts), batch)
    for row, (prompt, state) in enumerate(zip(prompts, start)):
        alone = model.forward_seq(torch.tensor([prompt]), state)
        torch.testing.assert_close(logits[row], alone[0], **TIGHT)
        for a, b in zip(state_split(batch)[row], state):
            torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("lengths", [[3, 1, 7, 1], [1, 5, 5], [2, 6]])
def test_sequences_of_different_lengths_read_together_equal_each_read_alone(model, lengths):
    # Rows decoding one token and rows reading prompts of several lengths, in
    # one pass, from different states; the long rows need not come first.
    starts = [read_alone(model, PROMPT[:n + 1]) for n in range(len(lengths))]
    batch = state_stack(starts)
    token_lists = [PROMPT[row:row + n] for row, n in enumerate(lengths)]
    logits = model.forward(token_lists, batch)
    assert logits.shape == (len(lengths), 65536)
    for row, (tokens, state) in enumerate(zip(token_lists, starts)):
        alone = model.forward_seq(torch.tensor([tokens]), state)
        torch.testing.assert_close(logits[row], alone[0], **TIGHT)
        for a, b in zip(state_split(batch)[row], state):
            torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("jit", [True, False])
def test_snapshots_taken_inside_a_pass_equal_the_states_read_up_to_there(weights, model, precision, jit):
    # Rows of several lengths; snapshots after a row's first token, in the middle of its read
    # (two rows at the same step), at its next to last token, and rows without one.
    net = model if (precision, jit) == ("fp32", True) else RWKV7Model(weights, precision=precision, jit=jit)
    token_lists = [PROMPT[:7], PROMPT[2:4], PROMPT[:1], PROMPT[3:9], PROMPT[1:6], PROMPT[4:12]]
    after = [1, 1, 0, 3, 3, 7]
    state = net.zero_state(len(token_lists))
    logits, snapshots = net.forward_snapshots(token_lists, state, after)
    assert sorted(snapshots) == [0, 1, 3, 4, 5]
    plain_state = net.zero_state(len(token_lists))
    torch.testing.assert_close(logits, net.forward(token_lists, plain_state), **TIGHT)
    for a, b in zip(state, plain_state):
        torch.testing.assert_close(a, b, **TIGHT)
    for row, n in enumerate(after):
        if n:
            up_to_there = net.zero_state(1)
            net.forward([token_lists[row][:n]], up_to_there)
            if precision == "int8" and kernels.vectorised():
                assert all(torch.equal(a, b) for a, b in zip(snapshots[row], up_to_there))
            else:
                assert_same_state(snapshots[row], up_to_there, precision)


def test_a_snapshot_outside_a_sequence_is_refused(model):
    with pytest.raises(ValueError, match="0 < n < length"):
        model.forward_snapshots([[1, 2], [3]], model.zero_state(2), [2, 0])


def test_the_compiled_and_the_eager_forward_agree(weights, model):
    eager = RWKV7Model(weights, precision="fp32", jit=False)
    assert isinstance(model._network, torch.jit.ScriptModule) and not isinstance(eager._network, torch.jit.ScriptModule)
    token_lists = [PROMPT[:4], [7], PROMPT[4:]]
    compiled_state, eager_state = model.zero_state(3), eager.zero_state(3)
    torch.testing.assert_close(model.forward(token_lists, compiled_state), eager.forward(token_lists, eager_state),
                               **TIGHT)
    for a, b in zip(compiled_state, eager_state):
        torch.testing.assert_close(a, b, **TIGHT)


def test_a_pass_with_an_empty_sequence_is_refused(model):
    with pytest.raises(ValueError, match="at least one token"):
        model.forward([[1, 2], []], model.zero_state(2))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_lower_precision_stays_within_its_documented_relative_error(weights, model, precision):
    lower = RWKV7Model(weights, precision=precision)
    prompt = torch.tensor([PROMPT * 3])
    ref_state, low_state = model.zero_state(1), lower.zero_state(1)
    errors = []
    expected, got = model.forward_seq(prompt, ref_state), lower.forward_seq(prompt, low_state)
    errors.append(((got - expected).norm() / expected.norm()).item())
    for token in (11, 22, 33, 44):
        expected = model.forward_one(torch.tensor([token]), ref_state)
        got = lower.forward_one(torch.tensor([token]), low_state)
        errors.append(((got - expected).norm() / expected.norm()).item())
    assert max(errors) < PRECISION_TOLERANCE[precision], errors
    assert max(errors) > 0  # it really ran in another precision


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_row_of_a_mixed_batch_stays_within_the_documented_relative_error(weights, model, precision):
    # int8 quantises a pass's activations together: a row's error must not grow with its batch-mates.
    lower = RWKV7Model(weights, precision=precision)
    prompts = [[(p * (i + 3)) % 65000 + 1 for p in PROMPT] * (1 + i % 3) for i in range(8)]
    ref_state, low_state = model.zero_state(8), lower.zero_state(8)
    errors = []
    for step in [prompts, *([[token]] * 8 for token in (11, 22, 33))]:
        expected, got = model.forward(step, ref_state), lower.forward(step, low_state)
        errors += ((got - expected).norm(dim=1) / expected.norm(dim=1)).tolist()
    assert max(errors) < PRECISION_TOLERANCE[precision], errors


def test_an_int8_row_reads_the_same_alone_as_in_a_batch_or_in_other_chunks(weights):
    # Each row's int8 products (exact integer sums) and float32 LoRA products (one summing
    # order) are computed the same whatever else is in the pass and however its tokens are split
    # over passes (one per pass, as a reply reads them, or all at once): bit for bit, where the
    # kernels are built with AVX2. Without them MKL's sgemm can differ in the last bit with the
    # number of rows, and such a bit can move an activation to the other int8 step: then only
    # within the bound.
    int8 = RWKV7Model(weights, precision="int8")
    prompts = [[(p * (i + 3)) % 65000 + 1 for p in PROMPT] * (1 + i % 3) for i in range(4)]
    batch_state = int8.zero_state(4)
    together = int8.forward(prompts, batch_state)
    for row, prompt in enumerate(prompts):
        state = int8.zero_state(1)
        int8.forward([prompt[:5]], state)
        alone = int8.forward([prompt[5:]], state)
        if kernels.vectorised():
            assert torch.equal(alone[0], together[row])
            assert all(torch.equal(a[0], b[row]) for a, b in zip(state, batch_state))
            one_by_one = int8.zero_state(1)  # as a reply reads its tokens: one per pass
            for token in prompt:
                last = int8.forward([[token]], one_by_one)
            assert torch.equal(last[0], together[row])
            assert all(torch.equal(a[0], b[row]) for a, b in zip(one_by_one, batch_state))
        else:
            assert ((alone[0] - together[row]).norm() / together[row].norm()).item() < PRECISION_TOLERANCE["int8"]
            assert_same_state(state, [t[row : row + 1] for t in batch_state], "int8")


def int8_reference(x, linear):
    """What _Int8KernelLinear computes, from its stored integers: rows quantised to
    q = round(x * (63.5 / max |x|)) (in float32, as the kernel does), exact integer sums
    (float64 holds them exactly), scaled back."""
    N, K = linear.weights[0].shape
    weight = linear.weights[0].view(N // 4, K // 32, 4, 32).transpose(1, 2).reshape(N, K).double()
    top = x.abs().amax(dim=1, keepdim=True)
    q = torch.round(x * torch.full_like(top, 63.5).div(top)).double()  # a true division, as in C++
    return (q @ weight.t()) * (top.double() / 63.5) * linear.scales[0].double()


@pytest.mark.skipif(not kernels.vectorised(), reason="the int8 kernel needs the kernels built with AVX2")
def test_the_int8_kernel_multiplies_each_row_alone_and_exactly(weights):
    int8 = RWKV7Model(weights, precision="int8", jit=False)
    assert type(int8._network.blocks[0].RKV) is _Int8KernelLinear and type(int8._network.head_linear) is _Int8KernelLinear
    generator = torch.Generator().manual_seed(5)
    for N, K in ((768, 768), (3072, 768), (768, 3072), (4096, 768), (64, 32)):
        weight = torch.randn(N, K, generator=generator)
        linear = _Int8KernelLinear(weight)
        x = torch.randn(37, K, generator=generator) * torch.rand(37, 1, generator=generator) * 4
        together = linear(x)
        torch.testing.assert_close(together.double(), int8_reference(x, linear), rtol=1e-5, atol=1e-5)
        for rows in (slice(0, 1), slice(3, 5), slice(8, 11), slice(5, 37)):  # 1 row, pairs, odd counts
            assert torch.equal(linear(x[rows]), together[rows])
        exact = x @ weight.t()  # and int8's rounding is small next to the product itself
        assert 0 < ((together - exact).norm() / exact.norm()).item() < 0.03


@pytest.mark.skipif(not kernels.vectorised(), reason="the product kernels need the kernels built with AVX2")
@pytest.mark.parametrize("kernel", [_Int8KernelLinear, _Fp32KernelLinear])
def test_products_side_by_side_in_one_call_equal_each_product_alone(kernel):
    """R, K and V (or the LoRA halves) in one kernel call, each reading its own columns of the
    input (rows several inputs apart): the same numbers as separate calls on those columns, and
    a column range past the input is refused with a clear error."""
    generator = torch.Generator().manual_seed(9)
    shapes, columns = [(64, 96), (32, 64), (128, 96), (8, 32)], [96, 0, 160, 288]
    weights = [torch.randn(N, K, generator=generator) for N, K in shapes]
    together = kernel(weights, columns)
    for rows in (1, 2, 5, 37):
        x = torch.randn(rows, 320, generator=generator) * torch.rand(rows, 1, generator=generator) * 4
        y = together(x)
        assert y.shape == (rows, sum(N for N, _ in shapes))
        start = 0
        for weight, column, (N, K) in zip(weights, columns, shapes):
            alone = kernel(weight)(x[:, column:column + K].contiguous())
            assert torch.equal(y[:, start:start + N], alone)
            start += N
    with pytest.raises(RuntimeError, match=r"reads columns \[288, 320\) of x, which has 300"):
        together(torch.randn(2, 300))


@pytest.mark.skipif(not kernels.vectorised(), reason="the fused time mix needs the kernels built with AVX2")
@pytest.mark.parametrize("first", [True, False])
def test_the_fused_time_mix_equals_its_torch_operations_and_each_row_is_computed_alone(first):
    """inference/kernels/time_mix.cpp against ops._prepare_ops / _finish_ops (float rounding
    apart), on inputs shaped as the model makes them (r, k, v and the LoRA outputs as column
    slices of wider tensors); a row's result is the same alone as among 37."""
    generator = torch.Generator().manual_seed(11)
    H, N = 4, 64
    C = H * N

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    rkv, up, v_first = rand(37, 3 * C) * 2, rand(37, 4 * C), rand(37, C)
    vectors = [rand(2 * C), rand(C), rand(C), torch.rand(C, generator=generator), rand(C)]  # wa0 v0 k_k k_a r_k
    o, coef_in, lnx_w, lnx_b = rand(37, H, 2, N), rand(37, H, 3), rand(C), rand(C)
    fused = ops._prepare(rkv, up, v_first, *vectors, _DECAY_SCALE, H, first)
    plain = ops._prepare_ops(rkv, up, v_first, *vectors, _DECAY_SCALE, H, first)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = up[:, 2 * C:3 * C]
    fused_y = ops._finish(o, coef_in, plain[2], g, lnx_w, lnx_b, _GROUP_NORM_EPS)
    torch.testing.assert_close(fused_y, ops._finish_ops(o, coef_in, plain[2], g, lnx_w, lnx_b, _GROUP_NORM_EPS),
                               rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(5, 7), slice(20, 37)):
        alone = ops._prepare(rkv[rows], up[rows], v_first[rows], *vectors, _DECAY_SCALE, H, first)
        assert all(torch.equal(a, b[rows]) for a, b in zip(alone, fused))
        assert torch.equal(ops._finish(o[rows], coef_in[rows], plain[2][rows], g[rows], lnx_w, lnx_b,
                                       _GROUP_NORM_EPS), fused_y[rows])


@pytest.mark.skipif(not kernels.vectorised(), reason="the fused token shift needs the kernels built with AVX2")
@pytest.mark.parametrize("lengths", [[1, 1, 1], [5, 1, 3], [7]])
def test_the_fused_token_shift_and_mixes_equal_their_torch_operations(lengths):
    """rwkv7_shift_mix (layer norm, token shift, six mixes side by side) against
    ops._shift_mix_ops, float rounding apart: the same outputs and the same state
    left behind (each sequence's last xx), for one token per sequence and for runs."""
    generator = torch.Generator().manual_seed(13)
    C, M, B = 64, sum(lengths), len(lengths)
    x = torch.randn(M, C, generator=generator) * 3 + 1
    ln_w, ln_b, mixes = torch.randn(C, generator=generator), torch.randn(C, generator=generator), \
        torch.rand(6, C, generator=generator)
    prev = torch.randn(B, C, generator=generator)
    rows = layout(lengths, torch.device("cpu"))
    fused_prev, plain_prev = prev.clone(), prev.clone()
    fused = ops._shift_mix(x, ln_w, ln_b, 1e-5, fused_prev, mixes, rows)
    plain = ops._shift_mix_ops(x, ln_w, ln_b, 1e-5, plain_prev, mixes, rows)
    for a, b in zip(fused + (fused_prev,), plain + (plain_prev,)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused_prev, prev)


def test_fp16_on_the_cpu_is_refused_with_a_clear_error(weights):
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        RWKV7Model(weights, precision="fp16")


def test_an_unknown_precision_is_refused(weights):
    with pytest.raises(ValueError, match="precision"):
        RWKV7Model(weights, precision="fp8")


def test_the_compiled_state_update_equals_the_torch_one():
    # `make install` builds the kernels wherever there is a C++ compiler; only without one does the
    # forward pass fall back to TorchScript operations (the next test checks that path).
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler here: the compiled kernels cannot be built, the TorchScript fallback serves")
    assert kernels.available(), "the compiled kernels are not built: run `make install` (python -m inference.kernels)"
    generator = torch.Generator().manual_seed(3)
    for heads in (12, 384):  # one sequence of the 0.1B shape; 32 of them
        S = torch.randn(heads, 64, 64, generator=generator) * 0.3
        q, u = torch.randn(heads, 2, 64, generator=generator), torch.randn(heads, 2, 64, generator=generator)
        v, w = torch.randn(heads, 1, 64, generator=generator), torch.rand(heads, 1, 64, generator=generator)
        fused, plain = S.clone(), S.clone()
        torch.testing.assert_close(torch.ops.rpserver.wkv7_step(fused, q, u, v, w), _step(plain, q, u, v, w),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # Several tokens in a row (a prompt), each head's state kept in the cache throughout; the
    # inputs shaped as the model makes them (unit kk, b = kk * a with a in (0, 1)), so that 40
    # updates stay bounded as they do in the model.
    T, heads = 40, 24

    def rand(*shape):
        return torch.rand(T, heads, *shape, generator=generator)

    kk = torch.nn.functional.normalize(torch.randn(T, heads, 1, 64, generator=generator), dim=-1)
    w, r, k, v = 0.5 + 0.5 * rand(1, 64), rand(1, 64) - 0.5, rand(1, 64) - 0.5, rand(1, 64) - 0.5
    q, u = torch.cat((w * r, kk), dim=2), torch.cat((-kk * rand(1, 64), k), dim=2)
    S = torch.randn(heads, 64, 64, generator=generator) * 0.3
    fused, plain = S.clone(), S.clone()
    torch.testing.assert_close(torch.ops.rpserver.wkv7_steps(fused, q, u, v, w), _steps(plain, q, u, v, w),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_the_fallback_without_compiled_kernels_gives_the_same_logits_and_int8_within_its_bound(model_path, model):
    tokens = [PROMPT, PROMPT[:5], [42]]
    script = (
        "import sys, torch\n"
        "from inference import kernels\n"
        "from inference.checkpoint import load_weights\n"
        "from inference.rwkv7 import RWKV7Model\n"
        "assert not kernels.available()\n"
        f"weights = load_weights({str(model_path)!r})\n"
        "logits = {}\n"
        "for precision in ('fp32', 'int8'):\n"
        "    m = RWKV7Model(weights, precision=precision)\n"
        f"    logits[precision] = m.forward({tokens!r}, m.zero_state(3))\n"
        "assert type(m._network.blocks[0].RKV.linears[0]).__name__ == '_Int8Linear'  # fbgemm's\n"
        "torch.save(logits, sys.argv[1])\n"
    )
    out = model_path.with_name("fallback-logits.pt")
    env = {**os.environ, "RPSERVER_KERNELS": "off"}
    subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, env=env, check=True, timeout=120)
    fallback, expected = torch.load(out), model.forward(tokens, model.zero_state(3))
    torch.testing.assert_close(fallback["fp32"], expected, **TIGHT)
    errors = ((fallback["int8"] - expected).norm(dim=1) / expected.norm(dim=1)).tolist()
    assert 0 < max(errors) < PRECISION_TOLERANCE["int8"], errors
