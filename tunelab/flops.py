"""Model FLOPs of decoder passes, for TFLOP/s and MFU figures.

Convention of PaLM (Chowdhery et al. 2022, appendix B) and Narayanan et al. 2021: a forward
pass costs 2 FLOPs per multiply-accumulate of every matmul weight plus 4*L*h*s per token for
attention scores and their weighted sum; backward costs twice the forward (the gradient of the
input and of the weight, 2 FLOPs per weight each). Recomputation under gradient checkpointing is
not counted (model FLOPs, not hardware FLOPs), so MFU stays comparable across checkpointing
choices. Norms, biases and softmax are ignored.

Two refinements over "6N per token": the LM head costs only at the positions whose logits are
computed (PPO asks for the answer's, generation for the last position's), and under LoRA the
frozen base weights cost 4 per weight (forward, and the input gradient backward needs; no weight
gradient) while the trained adapters cost 6.
"""

from __future__ import annotations

from tunelab.presets import ModelShape


def matmul_weights(shape: ModelShape, lm_head: bool) -> int:
    """Weights that take part in a matmul for every token (embedding lookups excluded)."""
    per_layer = sum(fan_in * fan_out for _, fan_in, fan_out in shape.layer_linears())
    count = shape.num_layers * per_layer
    count += sum(fan_in * fan_out for _, fan_in, fan_out in shape.extra_linears())
    if lm_head:
        count += lm_head_weights(shape)
    return count


def lm_head_weights(shape: ModelShape) -> int:
    return shape.vocab_size * shape.output_dim


def _attention(shape: ModelShape, context: int) -> int:
    """Scores and weighted sum of one token attending to `context` positions, all layers."""
    return 4 * shape.num_layers * shape.hidden_size * context


def forward_flops(shape: ModelShape, batch: int, seq_len: int, logits: int | None = None,
                  adapters: int = 0) -> float:  # fmt: skip
    """Forward pass over `batch` sequences of `seq_len` tokens: per token 2*W + 4*L*h*s, plus
    2*vocab*width at the `logits` positions of each sequence that reach the LM head (None:
    all; 0: no LM head, a value or reward model). `adapters`: LoRA weights, 2 per token too."""
    positions = seq_len if logits is None else logits
    per_token = 2 * (matmul_weights(shape, lm_head=False) + adapters) + _attention(shape, seq_len)
    return float(batch * (seq_len * per_token + positions * 2 * lm_head_weights(shape)))


def train_flops(shape: ModelShape, batch: int, seq_len: int, logits: int | None = None,
                adapters: int | None = None) -> float:  # fmt: skip
    """Forward + backward; recomputation not counted. `logits` as in forward_flops.

    Full fine-tuning (`adapters` None): 3x the forward, 6 per weight. LoRA (`adapters` = the
    trained weights: adapters, and a value head): the frozen base costs 4 per weight (forward
    and input gradient), the adapters 6, attention 3x its forward (both its operands are
    activations, whose gradients backward needs)."""
    if adapters is None:
        return 3.0 * forward_flops(shape, batch, seq_len, logits)
    positions = seq_len if logits is None else logits
    per_token = (
        4 * matmul_weights(shape, lm_head=False) + 6 * adapters + 3 * _attention(shape, seq_len)
    )
    return float(batch * (seq_len * per_token + positions * 4 * lm_head_weights(shape)))


def generation_flops(shape: ModelShape, batch: int, prompt_len: int, answer_len: int,
                     adapters: int = 0) -> float:  # fmt: skip
    """Prefill of the prompt plus one cached forward per new token (its context grows by one).
    Logits are computed for one position per forward (transformers' generate passes
    logits_to_keep=1), so the LM head counts once per new token, not per prompt token."""
    body = 2 * (matmul_weights(shape, lm_head=False) + adapters)
    head = 2 * lm_head_weights(shape)
    prefill = prompt_len * (body + _attention(shape, prompt_len))
    # The prefill's logits give answer token 0; answer token t >= 1 comes from a forward of
    # token t-1, which attends to the prompt and tokens 0..t-1. The last token is never fed.
    decode = sum(body + _attention(shape, prompt_len + t) for t in range(1, answer_len))
    return float(batch * (prefill + decode + answer_len * head))
