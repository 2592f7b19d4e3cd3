"""RWKV-7 ("Goose") forward pass in plain PyTorch, with a batch dimension.

Written for serving: `forward_one` decodes one token for B sequences at once
(each with its own state), `forward_seq` reads a prompt chunk. Weights are
prepared once at load (transposed for `x @ W`, cast, ln0 folded into the
embedding, the three token-shift projections R/K/V stacked for one bmm).

State layout, a list of 3 x n_layer tensors, for layer i:
    [3i+0] att x_prev  (B, C)        model dtype
    [3i+1] att kv      (B, H, N, N)  float32   (value index, key index)
    [3i+2] ffn x_prev  (B, C)        model dtype
Both forwards update the state in place.
"""

import warnings

import torch
import torch.nn.functional as F

HEAD_SIZE = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Relative error ||logits - fp32|| / ||fp32|| each precision stays within,
# checked by tests/test_rwkv7.py on the tests' model (measured: bf16 about
# 0.005, int8 about 0.025). fp16 runs on CUDA only and is not measured on
# the CPU-only test machines.
PRECISION_TOLERANCE = {"fp32": 1e-5, "bf16": 0.03, "fp16": 0.03, "int8": 0.06}


class Int8Linear:
    """x @ W.T with W as int8 (one scale per output row), through fbgemm's
    dynamically quantized linear: on CPU about 5x faster than fp32 for the
    head at batch 1 (it reads a quarter of the bytes, with VNNI where present)."""

    def __init__(self, weight):
        weight = weight.float().contiguous()  # (out, in)
        out_features, in_features = weight.shape
        scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch marks quantized tensors deprecated; still the fastest int8 path
            quantized = torch.quantize_per_channel(weight, scales, torch.zeros(out_features, dtype=torch.long),
                                                   0, torch.qint8)
            self.linear = torch.ao.nn.quantized.dynamic.Linear(in_features, out_features, dtype=torch.qint8)
            self.linear.set_weight_bias(quantized, None)

    def __call__(self, x):
        return self.linear(x.float())


class Dense:
    """x @ W.T with W stored as in the checkpoint (out, in), in the model's dtype."""

    def __init__(self, weight):
        self.weight = weight.contiguous()

    def __call__(self, x):
        return F.linear(x, self.weight)


class RWKV7Model:
    def __init__(self, weights, device="cpu", precision="fp32"):
        if precision not in PRECISION_TOLERANCE:
            raise ValueError(f"unknown precision {precision!r}: use fp32, bf16, fp16 or int8")
        if precision == "fp16" and not str(device).startswith("cuda"):
            raise ValueError("fp16 needs a CUDA device: on the CPU use fp32, bf16 or int8")
        self.device = torch.device(device)
        self.precision = precision
        self.dtype = torch.float32 if precision == "int8" else DTYPES[precision]
        self.n_head, self.head_size = weights["blocks.0.att.r_k"].shape
        self.vocab_size, self.n_embd = weights["emb.weight"].shape
        self.n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        self._prepare(weights)

    def _tensor(self, t, dtype=None):
        return t.to(self.device, dtype or self.dtype).contiguous()

    def _linear(self, weight):
        """A big matrix (out, in) from the checkpoint, ready to apply."""
        if self.precision == "int8":
            if self.device.type != "cpu":
                raise ValueError("int8 weights run on the CPU: on CUDA use fp16 or bf16")
            return Int8Linear(weight)
        return Dense(self._tensor(weight))

    def _prepare(self, w):
        C = self.n_embd
        ln0 = (w["blocks.0.ln0.weight"].float(), w["blocks.0.ln0.bias"].float())
        self.emb = self._tensor(F.layer_norm(w["emb.weight"].float(), (C,), *ln0))
        self.ln_out = (self._tensor(w["ln_out.weight"]), self._tensor(w["ln_out.bias"]))
        self.head = self._linear(w["head.weight"])
        self.layers = []
        for i in range(self.n_layer):
            a, f, b = f"blocks.{i}.att.", f"blocks.{i}.ffn.", f"blocks.{i}."
            vec = lambda name: self._tensor(w[name].reshape(-1))  # noqa: E731
            mat = lambda name: self._tensor(w[name])  # noqa: E731 (small LoRA matrices: x @ W as stored)
            layer = {
                "ln1": (vec(b + "ln1.weight"), vec(b + "ln1.bias")),
                "ln2": (vec(b + "ln2.weight"), vec(b + "ln2.bias")),
                "maa": torch.stack([vec(a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]),  # (6, C)
                "w0": vec(a + "w0").float(), "w1": mat(a + "w1"), "w2": mat(a + "w2"),
                "a0": vec(a + "a0"), "a1": mat(a + "a1"), "a2": mat(a + "a2"),
                "g1": mat(a + "g1"), "g2": mat(a + "g2"),
                "k_k": vec(a + "k_k"), "k_a": vec(a + "k_a"), "r_k": vec(a + "r_k"),
                "R": self._linear(w[a + "receptance.weight"]), "K": self._linear(w[a + "key.weight"]),
                "V": self._linear(w[a + "value.weight"]), "O": self._linear(w[a + "output.weight"]),
                "ln_x": (vec(a + "ln_x.weight"), vec(a + "ln_x.bias")),
                "ffn_maa": vec(f + "x_k"),
                "ffn_K": self._linear(w[f + "key.weight"]), "ffn_V": self._linear(w[f + "value.weight"]),
            }
            if i > 0:
                layer.update(v0=vec(a + "v0"), v1=mat(a + "v1"), v2=mat(a + "v2"))
            self.layers.append(layer)

    # ---- state ------------------------------------------------------------

    def zero_state(self, batch=1):
        B, C, H, N = batch, self.n_embd, self.n_head, self.head_size
        state = []
        for _ in range(self.n_layer):
            state += [torch.zeros(B, C, dtype=self.dtype, device=self.device),
                      torch.zeros(B, H, N, N, dtype=torch.float32, device=self.device),
                      torch.zeros(B, C, dtype=self.dtype, device=self.device)]
        return state

    # ---- forward ----------------------------------------------------------

    @torch.inference_mode()
    def forward_one(self, tokens, state):
        """One decode step. tokens: LongTensor (B,). Returns float32 logits (B, vocab)."""
        x = self.emb[tokens.to(self.device)]  # (B, C)
        return self._forward(x.unsqueeze(1), state).squeeze(1)

    @torch.inference_mode()
    def forward_seq(self, tokens, state, full_output=False):
        """Read tokens (B, T). Returns float32 logits (B, vocab), or (B, T, vocab) with full_output."""
        x = self.emb[tokens.to(self.device)]  # (B, T, C)
        if not full_output:
            return self._forward(x, state, last_only=True).squeeze(1)
        return self._forward(x, state)

    def _forward(self, x, state, last_only=False):
        C = self.n_embd
        v_first = None
        for i, layer in enumerate(self.layers):
            xx = F.layer_norm(x, (C,), *layer["ln1"])
            out, v_first = self._time_mix(i, layer, xx, state, v_first)
            x = x + out
            xx = F.layer_norm(x, (C,), *layer["ln2"])
            x = x + self._channel_mix(i, layer, xx, state)
        if last_only:
            x = x[:, -1:]
        x = F.layer_norm(x, (C,), *self.ln_out)
        return self.head(x).float()

    @staticmethod
    def _shifted(x, prev):
        """The previous token's input for every position: (B, T, C)."""
        return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)

    def _time_mix(self, i, p, x, state, v_first):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        delta = self._shifted(x, state[3 * i]) - x
        state[3 * i].copy_(x[:, -1])
        mixed = x.unsqueeze(2) + delta.unsqueeze(2) * p["maa"]  # (B, T, 6, C)
        xr, xw, xk, xv, xa, xg = mixed.unbind(2)

        r, k, v = p["R"](xr), p["K"](xk), p["V"](xv)
        w = torch.tanh(xw @ p["w1"]) @ p["w2"]
        a = torch.sigmoid(p["a0"] + (xa @ p["a1"]) @ p["a2"])
        g = torch.sigmoid(xg @ p["g1"]) @ p["g2"]

        kk = F.normalize((k * p["k_k"]).view(B, T, H, N), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * p["k_a"])
        if i == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(p["v0"] + (xv @ p["v1"]) @ p["v2"])
        decay = torch.exp(-0.606531 * torch.sigmoid(p["w0"] + w.float()))  # exp(-e^-0.5 * sigmoid), in (0.545, 1)

        out = self._recurrence(state[3 * i + 1], r, decay, k, v, kk, a)  # (B, T, H, N)
        out = F.group_norm(out.reshape(B * T, C).to(x.dtype), H, *p["ln_x"], eps=64e-5).view(B, T, C)
        bonus = (r * k * p["r_k"]).view(B, T, H, N).sum(dim=-1, keepdim=True) * v.view(B, T, H, N)
        out = out + bonus.view(B, T, C)
        return p["O"](out * g), v_first

    def _recurrence(self, S, r, decay, k, v, kk, a):
        """The WKV-7 state update, token by token; S (B, H, N, N) updated in place.

        S <- S * decay + (S @ -kk) (kk * a)^T + v k^T;  out = S @ r.
        The rank-1 correction is a matrix-vector product then an outer
        product, never an N x N matrix per token.
        """
        B, T, C = r.shape
        H, N = self.n_head, self.head_size
        f32 = lambda t: t.float().view(B, T, H, N)  # noqa: E731
        r, decay, k, v, kk, a = f32(r), f32(decay), f32(k), f32(v), kk.float(), f32(a)
        kka = kk * a
        out = torch.empty(B, T, H, N, dtype=torch.float32, device=S.device)
        for t in range(T):
            correction = S @ (-kk[:, t]).unsqueeze(-1)  # (B, H, N, 1)
            S.mul_(decay[:, t].unsqueeze(-2))
            S.add_(correction @ kka[:, t].unsqueeze(-2))
            S.add_(v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2))
            out[:, t] = (S @ r[:, t].unsqueeze(-1)).squeeze(-1)
        return out

    def _channel_mix(self, i, p, x, state):
        delta = self._shifted(x, state[3 * i + 2]) - x
        state[3 * i + 2].copy_(x[:, -1])
        k = torch.relu(p["ffn_K"](x + delta * p["ffn_maa"])) ** 2
        return p["ffn_V"](k)


def state_split(state):
    """A batched state as a list of per-sequence states (batch 1 each)."""
    batch = state[0].shape[0]
    return [[t[b:b + 1].clone() for t in state] for b in range(batch)]


def state_stack(states):
    """Per-sequence states (batch 1 each) as one batched state."""
    return [torch.cat(parts, dim=0) for parts in zip(*states)]
