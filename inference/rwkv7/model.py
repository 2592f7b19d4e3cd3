"""The RWKV-7 model: its shape (RWKV7Config), one layer (_Block), the compiled
network (_Network) and RWKV7Model, which serves it. The operations it calls,
and whether our kernels run them, are in .ops; the products in .linear.

State layout (a plain list of 3 * n_layer tensors, all float32, on the
model's device; B = number of sequences in the batch, C = n_embd,
H = n_head, N = head_size):

    state[3*i + 0]  layer i time-mix x_prev      (B, C)     layer-normed input of the previous token
    state[3*i + 1]  layer i time-mix kv state    (B, H, N, N)  rows index value dims, columns key dims
    state[3*i + 2]  layer i channel-mix x_prev   (B, C)

The forward passes update the state tensors IN PLACE (the list and its
tensors stay the same objects) and return only the logits.
"""

import dataclasses
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import Layout, layout
from .ops import _finish, _make_linear, _make_lora, _prepare, _recurrence, _shift_mix

# Relative error ||logits - logits_fp32|| / ||logits_fp32|| that each reduced
# precision is allowed (and tested) to stay within, on one decode step after a
# short prompt. Measured on random demo models: bf16 about 0.3-0.5 %, int8
# about 2-4 %; the bounds leave headroom for other weights and sizes.
PRECISION_TOLERANCE = {"fp32": 1e-4, "bf16": 0.02, "int8": 0.06, "fp16": 0.02}

PRECISIONS = ("fp32", "bf16", "fp16", "int8")

# Decay: w = exp(-exp(-0.5) * sigmoid(w0 + lora(x))), as in the reference.
_DECAY_SCALE = -math.exp(-0.5)
_GROUP_NORM_EPS = 64e-5
_LAYER_NORM_EPS = 1e-5

# forward_seq processes a long prompt in pieces of this many tokens: the
# activations stay small and cache friendly, the result is the same.
DEFAULT_SEQ_CHUNK = 256



@dataclasses.dataclass(frozen=True)
class RWKV7Config:
    n_layer: int
    n_embd: int  # C
    n_head: int  # H
    head_size: int  # N; n_head * head_size == n_embd
    vocab_size: int

    @classmethod
    def from_weights(cls, weights):
        """The shape of a checkpoint's dict of tensors (official key names)."""
        n_head, head_size = weights["blocks.0.att.r_k"].shape
        vocab_size, n_embd = weights["emb.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        return cls(n_layer=n_layer, n_embd=n_embd, n_head=n_head, head_size=head_size, vocab_size=vocab_size)


class _Block(nn.Module):
    """Layer i's weights, prepared once, and its forward over a Layout."""

    def __init__(self, weights, i, precision, device, config: RWKV7Config):
        super().__init__()
        b, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."

        def vec(key):
            return weights[key].to(device=device, dtype=torch.float32).reshape(-1).contiguous()

        def linear(key):
            return _make_linear([weights[key + ".weight"]], precision, device)

        C = config.n_embd
        self.H, self.N = config.n_head, config.head_size
        self.ln_eps, self.gn_eps, self.decay_scale = _LAYER_NORM_EPS, _GROUP_NORM_EPS, _DECAY_SCALE
        self.ln1_w, self.ln1_b = vec(b + "ln1.weight"), vec(b + "ln1.bias")
        self.ln2_w, self.ln2_b = vec(b + "ln2.weight"), vec(b + "ln2.bias")
        # The six token-shift mixes side by side, one op making all six inputs (M, 6C): R's, K's and
        # V's first (one product call reads those three), then the w, a and g LoRAs'.
        self.maa = torch.stack([vec(a + n) for n in ("x_r", "x_k", "x_v", "x_w", "x_a", "x_g")])
        self.RKV = _make_linear([weights[a + n + ".weight"] for n in ("receptance", "key", "value")], precision,
                                device, (0, C, 2 * C))
        # Layer 0 takes its value as v_first for the others; it has no v LoRA.
        self.first_layer = i == 0
        loras = ("w", "a", "g") if i == 0 else ("w", "a", "g", "v")  # v's reads V's input
        # The LoRAs' first halves in one call, their second halves in another, reading the first's outputs.
        downs = [weights[a + n + "1"] for n in loras]
        self.lora_down = _make_lora(downs, device, (3 * C, 4 * C, 5 * C, 2 * C)[:len(loras)])
        widths = [down.shape[1] for down in downs]
        self.lora_up = _make_lora([weights[a + n + "2"] for n in loras], device,
                                  [sum(widths[:j]) for j in range(len(loras))])
        self.w_width, self.g_from, self.g_to = widths[0], widths[0] + widths[1], sum(widths[:3])
        self.wa0 = torch.cat([vec(a + "w0"), vec(a + "a0")])
        self.v0 = torch.zeros(1, device=device) if i == 0 else vec(a + "v0")
        self.k_k, self.k_a, self.r_k = (vec(a + n) for n in ("k_k", "k_a", "r_k"))
        self.lnx_w, self.lnx_b = vec(a + "ln_x.weight"), vec(a + "ln_x.bias")
        self.O = linear(a + "output")
        self.fx_k = vec(f + "x_k").unsqueeze(0)
        self.FK, self.FV = linear(f + "key"), linear(f + "value")

    def forward(self, x: Tensor, v_first: Tensor, att_prev: Tensor, S: Tensor, ffn_prev: Tensor, rows: Layout,
                snap_att: Tensor, snap_S: Tensor, snap_ffn: Tensor):
        """The layer over the layout's tokens: the state (att_prev, S, ffn_prev) is advanced in
        place, and the layout's snapshots of it are copied into snap_att, snap_S, snap_ffn."""
        H, N = self.H, self.N
        C = x.shape[1]
        snapping = rows.snap_pos.shape[0] > 0

        # ---- time mix
        xx, mixed = _shift_mix(x, self.ln1_w, self.ln1_b, self.ln_eps, att_prev, self.maa, rows)
        if snapping:  # a token shift's state after position p is p's input
            snap_att.copy_(xx[rows.snap_pos])
        low = self.lora_down(mixed)
        low[:, :self.w_width].tanh_()
        low[:, self.g_from:self.g_to].sigmoid_()
        up = self.lora_up(low)  # w's, a's, g's and v's LoRA outputs
        q, u, v, w, coef = _prepare(self.RKV(mixed), up, v_first, self.wa0, self.v0, self.k_k, self.k_a, self.r_k,
                                    self.decay_scale, H, self.first_layer)
        if self.first_layer:
            v_first = v
        o = _recurrence(S, q, u, v, w, rows, H, N, snap_S)
        x = x + self.O(_finish(o, coef, v, up[:, 2 * C:3 * C], self.lnx_w, self.lnx_b, self.gn_eps))

        # ---- channel mix
        xx, kx = _shift_mix(x, self.ln2_w, self.ln2_b, self.ln_eps, ffn_prev, self.fx_k, rows)
        if snapping:
            snap_ffn.copy_(xx[rows.snap_pos])
        kx = torch.relu(self.FK(kx)).square_()
        return x + self.FV(kx), v_first


class _Network(nn.Module):
    """Embedding, blocks and head: what gets compiled."""

    def __init__(self, weights, precision, device, config: RWKV7Config):
        super().__init__()
        n_embd = config.n_embd
        # ln0 folded into the embedding (the table is only ever looked up).
        emb = F.layer_norm(weights["emb.weight"].float(), (n_embd,), weights["blocks.0.ln0.weight"].float(),
                           weights["blocks.0.ln0.bias"].float(), eps=_LAYER_NORM_EPS)
        self.emb = emb.to(device=device, dtype=torch.float32 if precision == "fp32" else torch.bfloat16)
        self.blocks = nn.ModuleList(_Block(weights, i, precision, device, config) for i in range(config.n_layer))
        self.ln_out_w = weights["ln_out.weight"].to(device=device, dtype=torch.float32).contiguous()
        self.ln_out_b = weights["ln_out.bias"].to(device=device, dtype=torch.float32).contiguous()
        self.head_linear = _make_linear([weights["head.weight"]], precision, device)
        self.ln_eps = _LAYER_NORM_EPS

    def forward(self, tokens: Tensor, state: List[Tensor], rows: Layout, snaps: List[Tensor]) -> Tensor:
        """Hidden states [M, C] after the last block, for the flat tokens [M]; the layout's
        snapshots go into `snaps` (laid out as a state of batch J; [] when there are none)."""
        x = self.emb[tokens].float()
        v_first = x
        none = x[:0]
        for i, block in enumerate(self.blocks):
            snap_att, snap_S, snap_ffn = none, none, none
            if len(snaps) > 0:
                snap_att, snap_S, snap_ffn = snaps[3 * i], snaps[3 * i + 1], snaps[3 * i + 2]
            x, v_first = block(x, v_first, state[3 * i], state[3 * i + 1], state[3 * i + 2], rows,
                               snap_att, snap_S, snap_ffn)
        return x

    @torch.jit.export
    def head(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, [x.shape[1]], self.ln_out_w, self.ln_out_b, self.ln_eps)
        return self.head_linear(x)

    @torch.jit.export
    def logits(self, tokens: Tensor, state: List[Tensor], rows: Layout, snaps: List[Tensor]) -> Tensor:
        """Logits [B, vocab] after each sequence's last token."""
        x = self.forward(tokens, state, rows, snaps)
        return self.head(x if rows.single else x[rows.last])


class RWKV7Model:
    """RWKV-7 weights prepared once for fast batched inference.

    `weights` is the checkpoint's dict of tensors (official key names, e.g.
    from `inference.checkpoint.load_weights`). Inference runs under
    `torch.inference_mode`; the thread count is left to the caller.
    """

    def __init__(self, weights, device="cpu", precision="fp32", jit=True):
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
        self.config = RWKV7Config.from_weights(weights)
        self.n_layer, self.n_embd, self.n_head, self.head_size, self.vocab_size = (
            self.config.n_layer, self.config.n_embd, self.config.n_head, self.config.head_size,
            self.config.vocab_size)
        with torch.inference_mode():
            network = _Network(weights, precision, device, self.config).eval()
        self._network = torch.jit.script(network) if jit else network
        if jit:
            # TorchScript profiles the first call and optimises at the second
            # (about 0.3 + 0.5 s for a 0.1B model): pay that here, not on a
            # user's first reply.
            for _ in range(2):
                self.forward_snapshots([[0, 0, 0], [0]], self.zero_state(2), [2, 0])

    def zero_state(self, batch=1):
        B, C, H, N = batch, self.n_embd, self.n_head, self.head_size
        state = []
        for _ in range(self.n_layer):
            state.append(torch.zeros(B, C, device=self.device))
            state.append(torch.zeros(B, H, N, N, device=self.device))
            state.append(torch.zeros(B, C, device=self.device))
        return state

    def forward(self, token_lists, state):
        """Advance B sequences by their own tokens, all in one pass.

        token_lists: B lists of token ids, each at least one long and of any
        length (a decode step gives one token per sequence, a prompt chunk
        many); `state` (batch B, row b for token_lists[b]) is updated in
        place. Returns float32 logits [B, vocab] after each list's last
        token. The caller keeps the total number of tokens reasonable (the
        engine reads prompts in chunks).
        """
        return self.forward_snapshots(token_lists, state, None)[0]

    def forward_snapshots(self, token_lists, state, snapshot_after):
        """forward(), also taking snapshots inside the pass: `snapshot_after` gives
        for each sequence 0 (none) or n, 0 < n < its length, for its state after
        its first n tokens. Returns (logits, {b: state of batch 1})."""
        rows = layout([len(tokens) for tokens in token_lists], self.device, snapshot_after)
        flat = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.long, device=self.device)
        J = rows.snap_seq.shape[0]
        snaps = self.zero_state(J) if J else []
        with torch.inference_mode():
            logits = self._network.logits(flat, state, rows, snaps)
        # Each its own tensors (not views of one batch that would keep the others alive).
        taken = {b: [t[j:j + 1] if J == 1 else t[j:j + 1].clone() for t in snaps]
                 for j, b in enumerate(rows.snap_seq.tolist())}
        return logits, taken

    def forward_one(self, tokens, state):
        """One decode step for B sequences: tokens LongTensor [B] -> logits float32 [B, vocab].

        `state` (batch B) is updated in place.
        """
        tokens = torch.as_tensor(tokens).reshape(-1).to(self.device)
        with torch.inference_mode():
            return self._network.logits(tokens, state, layout([1] * tokens.shape[0], self.device), [])

    def forward_seq(self, tokens, state, chunk=DEFAULT_SEQ_CHUNK):
        """Read T tokens for B sequences: tokens LongTensor [B, T] (or [T] for B=1).

        Returns float32 logits [B, vocab] after the last token. `state` is
        updated in place. Long inputs are processed `chunk` tokens at a time.
        """
        tokens = torch.as_tensor(tokens).to(self.device)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        B, T = tokens.shape
        if T == 0:
            raise ValueError("forward_seq needs at least one token")
        with torch.inference_mode():
            for start in range(0, T, chunk):
                part = tokens[:, start : start + chunk]
                logits = self._network.logits(part.reshape(-1), state, layout([part.shape[1]] * B, self.device), [])
        return logits
