"""PPO's generation: transformers' decoding loop without its per-token bookkeeping.

`generate` rebuilds its logits processors and stopping criteria, re-slices its inputs and
checks its stop conditions at every token; on a small model that is a fifth of a token's time,
and DeepSpeed-Chat-sized PPO batches decode token by token. `decode` gives the model the inputs
`generate` builds for it (the 2-D attention mask, position ids from it, a DynamicCache, logits
of the last position only), chooses tokens from the same distribution (fp32 logits,
end-of-sequence suppressed before min_new tokens, temperature; see choose_tokens for the draw)
and stops as it does: greedy answers are `generate`'s token for token
(tests/pipeline/test_decoding.py, over OPT, Llama, Mistral with a sliding window, Qwen2, GPT-2
and a LoRA-wrapped model). It runs under inference mode where no weights can change in a
forward, and checks for finished rows only once they may have finished.

A model for which that would not hold decodes through `generate` itself
(Decoding.through_generate; `generate_only_reasons` says why): a generation config that asks
for more (a repetition penalty, beams, banned words, ...), a model class with its own input
preparation (Phi-3's long RoPE resets the cache), or a forward that takes no cache.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import DynamicCache, GenerationMixin

from tunelab.pipeline.batching import position_ids

# Generation-config settings that `Decoding` sets for every call or that do not change what
# `generate` computes (any other one does, so a model that sets it decodes through `generate`).
DECODE_SETTINGS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample",
    "temperature", "top_k", "top_p", "max_length", "max_new_tokens", "min_new_tokens",
    "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "_from_model_config", "transformers_version",
})  # fmt: skip


def generate_only_reasons(model) -> list[str]:
    """Why `model` (a transformers causal LM, or peft's wrapper of one) must decode through
    `generate`; empty when `decode`'s loop gives what `generate` gives."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    name = type(base).__name__
    extra = sorted(set(base.generation_config.to_diff_dict()) - DECODE_SETTINGS)
    reasons = [f"its generation config sets {', '.join(extra)}"] if extra else []
    own_inputs = type(base).prepare_inputs_for_generation
    if own_inputs is not GenerationMixin.prepare_inputs_for_generation:
        reasons.append(f"{name} prepares its own generation inputs")
    if "cache" not in inspect.signature(base.forward).parameters:
        reasons.append(f"{name}.forward takes no cache")
    return reasons


@dataclass(frozen=True)
class Decoding:
    """How PPO decodes: up to max_new tokens, at least min_new (end-of-sequence suppressed
    before), by sampling at `temperature` or greedily (temperature None, DeepSpeed-Chat's
    default). `synced`: ZeRO-3 per-layer gathers; every rank steps until all are done, and the
    loop runs under no_grad, not inference mode: DeepSpeed keeps small parameters gathered
    after a forward, and gathered there they would be inference tensors, which training cannot
    save for backward."""

    max_new: int
    min_new: int
    eos_id: int
    pad_id: int
    temperature: float | None
    synced: bool = False
    through_generate: bool = False  # see generate_only_reasons

    def generate_kwargs(self) -> dict:
        """The same decoding as `generate` keyword arguments."""
        sampling = {"do_sample": False}
        if self.temperature is not None:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_k": 0,
                        "top_p": 1.0}  # fmt: skip
        return {"max_new_tokens": self.max_new, "min_new_tokens": self.min_new, **sampling,
                "pad_token_id": self.pad_id, "eos_token_id": self.eos_id,
                "synced_gpus": self.synced, "return_dict_in_generate": False}  # fmt: skip


def choose_tokens(logits: torch.Tensor, produced: int, decoding: Decoding) -> torch.Tensor:
    """Next tokens [B] from last-position logits [B, V] after `produced` new tokens: fp32
    scores, eos at -inf while produced < min_new (as `generate` does), then argmax when greedy,
    or one draw from softmax(scores / temperature).

    The draw inverts the distribution's cumulative sum at one uniform number per row, where
    torch.multinomial (generate's) draws an exponential number per vocabulary entry: the same
    distribution, 56 us a call instead of 201 us for 4 rows of 2,000 entries on the CPU
    (benchmarks/token_draw.py)."""
    scores = logits.to(torch.float32, copy=True)
    if produced < decoding.min_new:
        scores[:, decoding.eos_id] = -float("inf")
    if decoding.temperature is None:
        return scores.argmax(dim=-1)
    # Summed in float64: in float32 the intervals of a long tail after a likely token round to
    # zero or one step (6e-8), so a 150,000-entry vocabulary would lose or double their mass.
    cumulative = torch.softmax(scores / decoding.temperature, dim=-1).double().cumsum(dim=-1)
    # Scaled by each row's total (1 up to rounding), an entry of probability 0 has an empty
    # interval and is never drawn. A NaN row (diverged weights) gives the last id instead of
    # an error; PPO's loss check then ends the trial as diverged.
    uniform = torch.rand_like(cumulative[:, -1:]) * cumulative[:, -1:]
    drawn = torch.searchsorted(cumulative, uniform, right=True).squeeze(1)
    return drawn.clamp(max=scores.shape[-1] - 1)


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, decoding: Decoding):
    """[B, P + n] the left-padded prompts [B, P] and n <= max_new answer tokens (pad after a
    row's eos; n < max_new only when every row ended early), as `model.generate` returns."""
    if decoding.through_generate:
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                              **decoding.generate_kwargs())  # fmt: skip
    with torch.no_grad() if decoding.synced else torch.inference_mode():
        answer = _decode(model, prompt_ids, prompt_mask, decoding)
    # Inference tensors cannot be saved for backward; the training forward reads these ids.
    return torch.cat([prompt_ids, answer.clone()], dim=1)


def _decode(model, prompt_ids, prompt_mask, decoding: Decoding) -> torch.Tensor:
    """[B, n] answer tokens; see decode."""
    batch, device = prompt_ids.shape[0], prompt_ids.device
    cache = DynamicCache(config=model.config)
    mask, positions = prompt_mask, position_ids(prompt_mask)  # generate's, for left padding
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    step_ids, done = prompt_ids, False
    while True:
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                       cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # fmt: skip
        if not done:  # a rank that is done only steps along with the others (synced)
            chosen = choose_tokens(logits, len(tokens), decoding)
            chosen = torch.where(unfinished, chosen, decoding.pad_id)
            tokens.append(chosen)
            unfinished &= chosen != decoding.eos_id
            # Before min_new tokens no row can have ended: no need to ask (a device sync).
            done = len(tokens) >= decoding.max_new or (
                len(tokens) >= decoding.min_new and not bool(unfinished.any())
            )
        if not _any_rank_running(done, decoding.synced, device):
            return torch.stack(tokens, dim=1)
        step_ids = tokens[-1][:, None]
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        positions = positions[:, -1:] + 1


def _any_rank_running(done: bool, synced: bool, device: torch.device) -> bool:
    """Whether another forward is due: this rank's own answer, or under `synced` any rank's
    (generate's synced_gpus: an all-reduce per token, so per-layer gathers stay in step)."""
    if not synced:
        return not done
    running = torch.tensor(0.0 if done else 1.0, device=device)
    dist.all_reduce(running)
    return running.item() > 0
