"""A batched RWKV-7 ("Goose") forward pass in PyTorch, compiled with TorchScript. No Django here.

Same maths as `RWKV_x070` in the `rwkv` package (which stays the reference the
tests compare against), organised for serving:

* `forward` advances B independent sequences, each by its own tokens (one for
  a decode step, a chunk for a prompt), in one pass: everything that does not
  depend on the recurrent state (token shift, linear layers, LoRAs, norms,
  channel mix) runs for all tokens of all sequences at once, so the weights
  are read once per pass (decoding a small model on a CPU is bound by memory
  bandwidth, not arithmetic). Only the small per-head state update loops over
  token positions. `forward_one` (one token each) and `forward_seq` (a
  B x T block) are the two common shapes; `forward_snapshots` also hands
  back states part-way through sequences' tokens, copied out as the pass
  goes by (a reply keeps its state before its last prompt token).
* The layers are TorchScript (`jit=True`, the default): a whole pass runs in
  C++ without Python's GIL, so the server's other threads (HTTP, database,
  storage) never hold up a decode step, and each step skips Python's
  per-operation overhead. `jit=False` runs the same modules eagerly.
* On the CPU, where inference/kernels is built: each token's state update is
  one C++ pass per head, and a prompt's tokens are one call; a layer's
  products that read one input are one call (R, K, V; the LoRA halves); its
  elementwise work is three passes over each row (`_shift_mix`, `_prepare`,
  `_finish`). Elsewhere, PyTorch operations (the `_ops` functions).
* Precisions: "fp32"; "bf16" (big matrices stored and multiplied in bfloat16,
  everything else in float32); "fp16" (CUDA only); "int8" (CPU only: big
  matrices as per-output-channel int8 weights, each row of activations
  quantised on its own, multiplied by our kernel (inference/kernels
  int8_linear.cpp) or else fbgemm's; everything else in float32). The
  recurrent state is float32 in every precision, so states are
  interchangeable between them.

The package: .model (the model, to read first), .ops (the layer's operations
and the choice of kernels), .linear (the products), .layout (how a pass's
tokens are laid out).
"""

# What the rest of rpserver imports. (`inference.rwkv7.layout` is the function; its module is
# reached as `from inference.rwkv7.layout import ...`.)
from .layout import Layout, layout
from .model import DEFAULT_SEQ_CHUNK, PRECISION_TOLERANCE, PRECISIONS, RWKV7Config, RWKV7Model

__all__ = ["DEFAULT_SEQ_CHUNK", "PRECISIONS", "PRECISION_TOLERANCE", "Layout", "RWKV7Config", "RWKV7Model", "layout"]
