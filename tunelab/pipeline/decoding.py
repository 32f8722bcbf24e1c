"""PPO's generation: transformers' decoding loop without its per-token bookkeeping.

`generate` rebuilds its logits processors and stopping criteria, re-slices its inputs and
checks its stop conditions at every token; on a small model that is a fifth of a token's time,
and DeepSpeed-Chat-sized PPO batches decode token by token. `decode` calls the model exactly as
`generate` does (2-D attention mask, position ids from it, a DynamicCache, logits of the last
position only), chooses tokens from the same distribution (fp32 logits, end-of-sequence
suppressed before min_new tokens, temperature; see choose_tokens for the draw), and stops as it
does: greedy answers are `generate`'s token for token (tests/pipeline/test_decoding.py). It
runs under inference mode and checks for finished rows only once they may have finished.

A model whose generation config asks for more (a repetition penalty, beams, banned words...)
decodes through `generate` itself (Decoding.through_generate): `transformers_only_settings`
says which settings need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import DynamicCache, GenerationConfig

from tunelab.pipeline.batching import position_ids

# Generation-config settings `decode` honours or that `Decoding` sets for every call (the others
# change what `generate` computes, so a model that sets one decodes through `generate`).
DECODE_SETTINGS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample",
    "temperature", "top_k", "top_p", "max_length", "max_new_tokens", "min_new_tokens",
    "use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
    "return_dict_in_generate", "_from_model_config", "transformers_version",
})  # fmt: skip


def transformers_only_settings(generation_config: GenerationConfig) -> list[str]:
    """The settings of a model's generation config (those differing from transformers'
    defaults) that only `generate` applies."""
    return sorted(set(generation_config.to_diff_dict()) - DECODE_SETTINGS)


@dataclass(frozen=True)
class Decoding:
    """How PPO decodes: up to max_new tokens, at least min_new (end-of-sequence suppressed
    before), by sampling at `temperature` or greedily (temperature None, DeepSpeed-Chat's
    default). `synced`: ZeRO-3 per-layer gathers, every rank steps until all are done."""

    max_new: int
    min_new: int
    eos_id: int
    pad_id: int
    temperature: float | None
    synced: bool = False
    through_generate: bool = False  # the model's generation config needs `generate`

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
    distribution, at 19 us instead of 180 us for 4 rows of 2,000 entries on the CPU."""
    scores = logits.to(torch.float32, copy=True)
    if produced < decoding.min_new:
        scores[:, decoding.eos_id] = -float("inf")
    if decoding.temperature is None:
        return scores.argmax(dim=-1)
    cumulative = torch.softmax(scores / decoding.temperature, dim=-1).cumsum(dim=-1)
    # Scaled by each row's total (1 up to rounding); an entry of probability 0 has an empty
    # interval and is never drawn. A NaN distribution (diverged weights) still gives valid ids:
    # the finiteness check on the losses reports the divergence.
    uniform = torch.rand_like(cumulative[:, -1:]) * cumulative[:, -1:]
    drawn = torch.searchsorted(cumulative, uniform, right=True).squeeze(1)
    return drawn.clamp(max=scores.shape[-1] - 1)


def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, decoding: Decoding):
    """[B, P + n] the left-padded prompts [B, P] and n <= max_new answer tokens (pad after a
    row's eos; n < max_new only when every row ended early), as `model.generate` returns."""
    if decoding.through_generate:
        return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask,
                              **decoding.generate_kwargs())  # fmt: skip
    with torch.inference_mode():
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
