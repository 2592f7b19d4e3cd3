"""A batched RWKV-7 ("Goose") forward pass in plain PyTorch. No Django here.

Same maths as `RWKV_x070` in the `rwkv` package (which stays the reference the
tests compare against), organised for serving:

* `forward_one` advances B independent sequences by one token each, so the
  weights are read once per step for the whole batch (decoding a small model
  on a CPU is bound by memory bandwidth, not arithmetic).
* `forward_seq` reads a prompt: everything that does not depend on the
  recurrent state (token shift, linear layers, LoRAs, norms, channel mix) runs
  for all tokens at once; only the small per-head state update loops over
  tokens (per token and layer: one bmm, a copy, a scale, a rank-2 update).
* Precisions: "fp32"; "bf16" (big matrices stored and multiplied in bfloat16,
  everything else in float32); "fp16" (CUDA only); "int8" (CPU only: big
  matrices as per-output-channel int8 weights run through fbgemm's dynamic
  quantised linear, everything else in float32). The recurrent state is
  float32 in every precision, so states are interchangeable between them.

State layout (a plain list of 3 * n_layer tensors, all float32, on the
model's device; B = number of sequences in the batch, C = n_embd,
H = n_head, N = head_size):

    state[3*i + 0]  layer i time-mix x_prev      (B, C)     layer-normed input of the previous token
    state[3*i + 1]  layer i time-mix kv state    (B, H, N, N)  rows index value dims, columns key dims
    state[3*i + 2]  layer i channel-mix x_prev   (B, C)

`forward_one` and `forward_seq` update the state tensors IN PLACE (the list
and its tensors stay the same objects) and return only the logits.
"""

import math
import warnings

import torch
import torch.nn.functional as F

# Relative error ||logits - logits_fp32|| / ||logits_fp32|| that each reduced
# precision is allowed (and tested) to stay within, on one decode step after a
# short prompt. Measured on random demo models: bf16 about 0.3-0.5 %, int8
# about 1-2 %; the bounds leave headroom for other weights and sizes.
PRECISION_TOLERANCE = {"fp32": 1e-4, "bf16": 0.02, "int8": 0.06, "fp16": 0.02}

PRECISIONS = ("fp32", "bf16", "fp16", "int8")

# Decay: w = exp(-exp(-0.5) * sigmoid(w0 + lora(x))), as in the reference.
_DECAY_SCALE = -math.exp(-0.5)
_GROUP_NORM_EPS = 64e-5
_LAYER_NORM_EPS = 1e-5

# forward_seq processes a long prompt in pieces of this many tokens: the
# activations stay small and cache friendly, the result is the same.
DEFAULT_SEQ_CHUNK = 256


# --------------------------------------------------------------------------
# Linear layers in each precision: a pair (fn, weight) used as fn(x, weight),
# x float32 (M, in) -> float32 (M, out).


def _mm_fp32(x, weight_t):
    return torch.mm(x, weight_t)


def _mm_half(x, weight):
    return F.linear(x.to(weight.dtype), weight).float()


def _mm_int8(x, packed):
    return torch.ops.quantized.linear_dynamic(x, packed, False)


def _make_linear(weight, precision, device):
    """weight: (out, in) as stored in the checkpoint."""
    if precision == "fp32":
        return (_mm_fp32, weight.to(device=device, dtype=torch.float32).t().contiguous())
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return (_mm_half, weight.to(device=device, dtype=dtype).contiguous())
    # int8: symmetric per-output-channel weights, activations quantised on the fly.
    w = weight.float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero_points = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized dtypes are deprecated; fbgemm's kernels are still the fastest
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)
    return (_mm_int8, torch.ops.quantized.linear_prepack(qweight, None))


# --------------------------------------------------------------------------
# State helpers.


def state_split(state):
    """A batched state -> list of B states of batch 1 (independent copies)."""
    batch = state[0].shape[0]
    return [[t[b : b + 1].clone() for t in state] for b in range(batch)]


def state_stack(states):
    """A list of states (any batch sizes) -> one batched state (new tensors)."""
    if not states:
        raise ValueError("state_stack needs at least one state")
    return [torch.cat(parts, dim=0) for parts in zip(*states)]


def _projections(layer, mixed, v_first, H, N):
    """The time mix's projections from the six token-shifted inputs (6, M, C).

    Returns r, k (with its in-context scaling), v (mixed with layer 0's
    value), the decay w, a, the gate g, kk (normalised per head), all (M, C),
    and v_first (layer 0's value, for the layers after it).
    """
    (_, _, _, w0, w1, w2, a0, a1, a2, v0, v1, v2, g1, g2, k_k, k_a, _, R, K, V, *_) = layer
    xr, xw, xk, xv, xa, xg = mixed.unbind(0)
    r = R[0](xr, R[1])
    k = K[0](xk, K[1])
    v = V[0](xv, V[1])
    w = torch.sigmoid(torch.tanh(xw @ w1) @ w2 + w0).mul_(_DECAY_SCALE).exp_()
    a = torch.sigmoid(torch.addmm(a0, xa @ a1, a2))
    g = torch.sigmoid(xg @ g1) @ g2
    kk = F.normalize((k * k_k).view(-1, H, N), dim=-1).view(k.shape)
    k = k * (1 + (a - 1) * k_a)
    if v1 is None:
        v_first = v
    else:
        v = torch.lerp(v, v_first, torch.sigmoid(torch.addmm(v0, xv @ v1, v2)))
    return r, k, v, w, a, g, kk, v_first


class RWKV7Model:
    """RWKV-7 weights prepared once for fast batched inference.

    `weights` is the checkpoint's dict of tensors (official key names, e.g.
    from `inference.checkpoint.load_weights`). Inference runs under
    `torch.inference_mode`; the thread count is left to the caller.
    """

    def __init__(self, weights, device="cpu", precision="fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        device = torch.device(device)
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device: CPUs have no fast float16 "
                             "matrix multiply; use 'bf16' or 'int8' on CPU")
        if precision == "int8" and device.type != "cpu":
            raise ValueError("precision 'int8' runs on the CPU only (fbgemm); use 'fp16' or 'bf16' on CUDA")
        self.device = device
        self.precision = precision
        with torch.inference_mode():
            self._prepare(weights)

    # ------------------------------------------------------------------ load

    def _prepare(self, weights):
        dev, prec = self.device, self.precision
        self.n_head, self.head_size = weights["blocks.0.att.r_k"].shape
        self.vocab_size, self.n_embd = weights["emb.weight"].shape
        self.n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        C = self.n_embd

        def vec(key):
            return weights[key].to(device=dev, dtype=torch.float32).reshape(-1).contiguous()

        def mat(key):  # small matrices used as x @ m (LoRAs), kept float32
            return weights[key].to(device=dev, dtype=torch.float32).contiguous()

        w = {}
        # ln0 folded into the embedding (the table is only ever looked up).
        emb = F.layer_norm(weights["emb.weight"].float(), (C,), vec("blocks.0.ln0.weight").cpu(),
                           vec("blocks.0.ln0.bias").cpu(), eps=_LAYER_NORM_EPS)
        w["emb"] = emb.to(device=dev, dtype=torch.float32 if prec == "fp32" else torch.bfloat16)
        del emb
        layers = []
        for i in range(self.n_layer):
            b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
            p = f"{i}."
            w[p + "ln1.w"], w[p + "ln1.b"] = vec(b + "ln1.weight"), vec(b + "ln1.bias")
            w[p + "ln2.w"], w[p + "ln2.b"] = vec(b + "ln2.weight"), vec(b + "ln2.bias")
            # The six token-shift mixes, stacked so one op makes all six inputs.
            w[p + "maa"] = torch.stack([vec(a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]).unsqueeze(1)
            for n in ("w0", "a0", "v0", "k_k", "k_a"):
                w[p + n] = vec(a + n)
            w[p + "r_k"] = vec(a + "r_k")
            for n in ("w1", "w2", "a1", "a2", "g1", "g2"):
                w[p + n] = mat(a + n)
            if i > 0:  # layer 0 takes v as v_first; its v0/v1/v2 are unused
                w[p + "v1"], w[p + "v2"] = mat(a + "v1"), mat(a + "v2")
            else:
                w[p + "v1"] = w[p + "v2"] = None
            w[p + "lnx.w"], w[p + "lnx.b"] = vec(a + "ln_x.weight"), vec(a + "ln_x.bias")
            for n, key in (("R", "receptance"), ("K", "key"), ("V", "value"), ("O", "output")):
                w[p + n] = _make_linear(weights[a + key + ".weight"], prec, dev)
            w[p + "fx_k"] = vec(f + "x_k")
            w[p + "FK"] = _make_linear(weights[f + "key.weight"], prec, dev)
            w[p + "FV"] = _make_linear(weights[f + "value.weight"], prec, dev)
            layers.append(tuple(w[p + n] for n in (
                "ln1.w", "ln1.b", "maa", "w0", "w1", "w2", "a0", "a1", "a2", "v0", "v1", "v2",
                "g1", "g2", "k_k", "k_a", "r_k", "R", "K", "V", "O", "lnx.w", "lnx.b",
                "ln2.w", "ln2.b", "fx_k", "FK", "FV")))
        w["ln_out.w"], w["ln_out.b"] = vec("ln_out.weight"), vec("ln_out.bias")
        w["head"] = _make_linear(weights["head.weight"], prec, dev)
        self.weights = w
        self._layers = layers

    # ----------------------------------------------------------------- state

    def zero_state(self, batch=1):
        B, C, H, N = batch, self.n_embd, self.n_head, self.head_size
        state = []
        for _ in range(self.n_layer):
            state.append(torch.zeros(B, C, device=self.device))
            state.append(torch.zeros(B, H, N, N, device=self.device))
            state.append(torch.zeros(B, C, device=self.device))
        return state

    def _embed(self, tokens):
        return self.weights["emb"][tokens.to(self.device)].float()

    def _head(self, x):
        w = self.weights
        x = F.layer_norm(x, (self.n_embd,), w["ln_out.w"], w["ln_out.b"], eps=_LAYER_NORM_EPS)
        fn, weight = w["head"]
        return fn(x, weight)

    # ------------------------------------------------------------- forward

    def forward(self, token_lists, state):
        """Advance B sequences by their own tokens, all in one pass.

        token_lists: B lists of token ids, each at least one long and of any
        length (a decode step gives one token per sequence, a prompt chunk
        many); `state` (batch B, row b for token_lists[b]) is updated in
        place. Returns float32 logits [B, vocab] after each list's last
        token. Every token goes through the linear layers together, so the
        weights are read once for the whole pass; the caller keeps the total
        number of tokens reasonable (the engine reads prompts in chunks).
        """
        with torch.inference_mode():
            rows = _Rows([len(tokens) for tokens in token_lists], self.device)
            flat = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.long, device=self.device)
            x = self._hidden(flat, rows, state)
            return self._head(x if rows.single else x[rows.last])

    def forward_one(self, tokens, state):
        """One decode step for B sequences: tokens LongTensor [B] -> logits float32 [B, vocab].

        `state` (batch B) is updated in place.
        """
        with torch.inference_mode():
            tokens = torch.as_tensor(tokens).reshape(-1)
            return self._head(self._hidden(tokens, _Rows([1] * tokens.shape[0], self.device), state))

    def forward_seq(self, tokens, state, full_output=False, chunk=DEFAULT_SEQ_CHUNK):
        """Read T tokens for B sequences: tokens LongTensor [B, T] (or [T] for B=1).

        Returns float32 logits [B, vocab] after the last token, or [B, T, vocab]
        for every token with full_output=True. `state` is updated in place.
        Long inputs are processed `chunk` tokens at a time.
        """
        with torch.inference_mode():
            tokens = torch.as_tensor(tokens)
            if tokens.dim() == 1:
                tokens = tokens.unsqueeze(0)
            B, T = tokens.shape
            if T == 0:
                raise ValueError("forward_seq needs at least one token")
            outputs = []
            for start in range(0, T, chunk):
                part = tokens[:, start : start + chunk]
                x = self._hidden(part.reshape(-1), _Rows([part.shape[1]] * B, self.device), state)
                x = x.view(B, part.shape[1], self.n_embd)
                if full_output:
                    outputs.append(self._head(x.reshape(-1, self.n_embd)).view(B, part.shape[1], -1))
            if full_output:
                return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
            return self._head(x[:, -1])

    def _hidden(self, tokens, rows, state):
        """Run the layers over the flat tokens [M] laid out by `rows`; returns hidden states [M, C]."""
        x = self._embed(tokens)
        C, H, N = self.n_embd, self.n_head, self.head_size
        v_first = None
        for i, L in enumerate(self._layers):
            (ln1w, ln1b, maa, w0, w1, w2, a0, a1, a2, v0, v1, v2, g1, g2, k_k, k_a, r_k,
             R, K, V, O, lnxw, lnxb, ln2w, ln2b, fx_k, FK, FV) = L
            att_prev, S, ffn_prev = state[3 * i], state[3 * i + 1], state[3 * i + 2]

            # ---- time mix
            xx = F.layer_norm(x, (C,), ln1w, ln1b, eps=_LAYER_NORM_EPS)
            mixed = torch.addcmul(xx, _shift(xx, att_prev, rows), maa)  # (6, M, C)
            r, k, v, w, a, g, kk, v_first = _projections(L, mixed, v_first, H, N)
            y = _recurrence(S, r, k, v, w, a, kk, rows, H, N)
            y = F.group_norm(y, H, lnxw, lnxb, eps=_GROUP_NORM_EPS)
            bonus = (r * k * r_k).view(-1, H, N).sum(dim=-1, keepdim=True)
            y = y.view(-1, H, N).addcmul_(bonus, v.view(-1, H, N)).view(-1, C)
            x = x + O[0](y * g, O[1])

            # ---- channel mix
            xx = F.layer_norm(x, (C,), ln2w, ln2b, eps=_LAYER_NORM_EPS)
            kx = torch.addcmul(xx, _shift(xx, ffn_prev, rows), fx_k)
            kx = torch.relu(FK[0](kx, FK[1])).square_()
            x = x + FV[0](kx, FV[1])
        return x


class _Rows:
    """How the tokens of B sequences read together are laid out: flat, one
    sequence after another, M = sum(lengths) positions in all.

    The recurrence takes every sequence's first token in one batched step,
    then the later tokens of the sequences that have more ("readers"),
    longest first, so that at each later step the sequences still reading
    are the first few readers.
    """

    def __init__(self, lengths, device):
        if not lengths or min(lengths) < 1:
            raise ValueError("every sequence needs at least one token")
        self.count, self.total = len(lengths), sum(lengths)
        self.single = self.total == self.count  # one token each: position b is sequence b
        if self.single:
            self.readers = []
            return
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        self.first = torch.tensor(starts, device=device)
        self.last = torch.tensor([s + n - 1 for s, n in zip(starts, lengths)], device=device)
        self.readers = sorted((b for b, n in enumerate(lengths) if n > 1), key=lambda b: -lengths[b])
        self.readers_index = torch.tensor(self.readers, device=device)
        self.readers_in_place = self.readers == list(range(self.count))  # e.g. a uniform prompt chunk
        later = range(1, max(lengths))
        # How many readers are still reading at each later step.
        self.active = [sum(1 for b in self.readers if lengths[b] > t) for t in later]
        # Runs of later steps with as many readers reading: (start, end, readers), steps counted from 0.
        self.segments = []
        for t, n in enumerate(self.active):
            if self.segments and self.segments[-1][2] == n:
                self.segments[-1][1] = t + 1
            else:
                self.segments.append([t, t + 1, n])
        # Position of each reader's t-th token (its last one once it has no more), [T-1, readers].
        self.later = torch.tensor([[starts[b] + min(t, lengths[b] - 1) for b in self.readers] for t in later],
                                  device=device)
        # The positions the later steps produce, in step order.
        self.later_flat = torch.tensor([starts[b] + t for t, n in zip(later, self.active) for b in self.readers[:n]],
                                       device=device)


def _shift(xx, prev, rows):
    """Token shift: (input of the previous token - input) per position, the
    state's `prev` standing before each sequence's first token; `prev` then
    becomes each sequence's last input."""
    if rows.single:
        delta = prev - xx
        prev.copy_(xx)
        return delta
    shifted = xx.roll(1, 0)
    shifted[rows.first] = prev
    prev.copy_(xx[rows.last])
    return shifted.sub_(xx)


def _step(S, q, u, v, w):
    """One token for n sequences' heads: S (nH, N, N) updated in place.

    q (nH, 2, N) holds w*r and kk, so one bmm gives S (w*r) and S kk (a
    row-vector bmm against S^T is much faster on CPU than S @ column);
    then S' = S diag(w) - (S kk) b^T + v k^T is one scale and one rank-2
    update with u (nH, 2, N) = (-b, k). Returns the bmm's output (nH, 2, N).
    """
    o = torch.bmm(q, S.transpose(1, 2))
    S.mul_(w)
    S.baddbmm_(torch.cat((o[:, 1:], v), dim=1).transpose(1, 2), u)
    return o


def _recurrence(S, r, k, v, w, a, kk, rows, H, N):
    """The time mix's state update over all positions; returns y [M, C] and
    updates S (B, H, N, N) in place.

    With b = kk*a, each token does S' = S diag(w) - (S kk) b^T + v k^T and
    y = S' r = S (w*r) - (S kk)(b.r) + v (k.r).
    """
    M, B = rows.total, rows.count
    r4, k4, v4, w4, kk4 = (t.view(M, H, 1, N) for t in (r, k, v, w, kk))
    b4 = kk4 * a.view(M, H, 1, N)
    q = torch.cat((w4 * r4, kk4), dim=2)  # (M, H, 2, N)
    u = torch.cat((b4.neg(), k4), dim=2)  # (M, H, 2, N)

    first = (q, u, v4, w4) if rows.single else (t[rows.first] for t in (q, u, v4, w4))
    q0, u0, v0, w0 = (t.reshape(B * H, -1, N) for t in first)
    o = _step(S.view(B * H, N, N), q0, u0, v0, w0).view(B, H, 2, N)
    if rows.readers:
        SR = S if rows.readers_in_place else S[rows.readers_index]  # (readers, H, N, N)
        RH = len(rows.readers) * H
        qs, us, vs, ws = (t[rows.later].view(-1, RH, t.shape[2], N) for t in (q, u, v4, w4))  # (T-1, RH, ., N)
        S3 = SR.view(RH, N, N)
        outs = []
        for start, end, n in rows.segments:  # steps [start, end) have the first n readers reading
            nH = n * H
            Sn = S3[:nH]
            for step in zip(*(t[start:end, :nH].unbind(0) for t in (qs, us, vs, ws))):
                outs.append(_step(Sn, *step))
        if not rows.readers_in_place:
            S[rows.readers_index] = SR
        first_out, o = o, torch.empty(M, H, 2, N, device=o.device)
        o[rows.first] = first_out
        o[rows.later_flat] = torch.cat(outs).view(-1, H, 2, N)
    sa = o[:, :, 1:]
    y = o[:, :, :1] - sa * (b4 * r4).sum(-1, keepdim=True) + v4 * (k4 * r4).sum(-1, keepdim=True)
    return y.view(M, H * N)
