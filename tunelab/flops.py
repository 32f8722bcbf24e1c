"""Model FLOPs of decoder passes, for TFLOP/s and MFU figures.

Convention of PaLM (Chowdhery et al. 2022, appendix B) and Narayanan et al. 2021: a forward
pass costs 2 FLOPs per multiply-accumulate of every matmul weight plus 4*L*h*s per token for
attention scores and their weighted sum; backward costs twice the forward. Recomputation under
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs), so MFU stays
comparable across checkpointing choices. Norms, biases and softmax are ignored.
"""

from __future__ import annotations

from tunelab.presets import ModelShape


def matmul_weights(shape: ModelShape, lm_head: bool) -> int:
    """Weights that take part in a matmul for every token (embedding lookups excluded)."""
    per_layer = sum(fan_in * fan_out for _, fan_in, fan_out in shape.layer_linears())
    count = shape.num_layers * per_layer
    count += sum(fan_in * fan_out for _, fan_in, fan_out in shape.extra_linears())
    if lm_head:
        count += shape.vocab_size * shape.output_dim
    return count


def forward_flops(shape: ModelShape, batch: int, seq_len: int, lm_head: bool = True) -> float:
    """Forward pass over `batch` sequences of `seq_len` tokens: 2*W + 4*L*h*s per token."""
    tokens = batch * seq_len
    attention = 4 * shape.num_layers * shape.hidden_size * seq_len
    return float(tokens * (2 * matmul_weights(shape, lm_head) + attention))


def train_flops(shape: ModelShape, batch: int, seq_len: int, lm_head: bool = True) -> float:
    """Forward + backward (3x forward); recomputation not counted."""
    return 3.0 * forward_flops(shape, batch, seq_len, lm_head)


def generation_flops(shape: ModelShape, batch: int, prompt_len: int, answer_len: int) -> float:
    """Prefill of the prompt plus one cached forward per new token (its context grows by one)."""
    weights = 2 * matmul_weights(shape, lm_head=True)
    per_context = 4 * shape.num_layers * shape.hidden_size
    prefill = prompt_len * (weights + per_context * prompt_len)
    # Token t (0-based) attends to prompt_len + t + 1 positions.
    decode = sum(weights + per_context * (prompt_len + t + 1) for t in range(answer_len))
    return float(batch * (prefill + decode))
