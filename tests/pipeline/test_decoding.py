"""PPO's decoding loop: greedy answers are transformers' `generate`'s token for token, sampled
ones come from the same distribution and end the same way."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OpenAIGPTConfig,
    OpenAIGPTLMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tunelab.pipeline.decoding import Decoding, choose_tokens, decode, generate_only_reasons

EOS, PAD = 2, 1


def tiny_opt(vocab: int, dtype: torch.dtype) -> OPTForCausalLM:
    config = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                       num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                       pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS)  # fmt: skip
    torch.manual_seed(0)
    return OPTForCausalLM(config).to(dtype).eval()


def tiny(model_class, config_class, **shape):
    """A random 2-layer model of `model_class`, 500 tokens, eos 2, pad 1."""
    config = config_class(vocab_size=500, pad_token_id=PAD, bos_token_id=EOS, eos_token_id=EOS,
                          **shape)  # fmt: skip
    torch.manual_seed(0)
    return model_class(config).eval()


LLAMA_SHAPE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
ARCHITECTURES = {
    "llama": lambda: tiny(LlamaForCausalLM, LlamaConfig, **LLAMA_SHAPE),
    # A window shorter than the prompts: the cache and mask must drop the oldest tokens.
    "mistral-window-4": lambda: tiny(MistralForCausalLM, MistralConfig, sliding_window=4,
                                     **LLAMA_SHAPE),
    "qwen2": lambda: tiny(Qwen2ForCausalLM, Qwen2Config, **LLAMA_SHAPE),
    "gpt2": lambda: tiny(GPT2LMHeadModel, GPT2Config, n_embd=32, n_layer=2, n_head=4),
    "opt-lora": lambda: get_peft_model(
        tiny_opt(500, torch.float32), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    ).eval(),
}  # fmt: skip


def lean_to_eos(model: OPTForCausalLM, strength: float) -> OPTForCausalLM:
    """Make eos likelier as `strength` grows (0.5: some rows end early, 5: all at once): its
    output row becomes a constant vector and the final layer norm's bias positive."""
    with torch.no_grad():
        head = model.lm_head.weight
        head[EOS] = strength * head.std()
        model.model.decoder.final_layer_norm.bias.fill_(1.0)
    return model


def left_padded_prompts(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """[4, 6] prompts of 6, 4, 2 and 5 tokens, padded on the left as PPO's are."""
    torch.manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 6))
    mask = torch.ones_like(ids)
    for row, pads in enumerate((0, 2, 4, 1)):
        ids[row, :pads], mask[row, :pads] = PAD, 0
    return ids, mask


def both(model, ids, mask, decoding: Decoding, seed: int):
    """(decode's output, generate's output), each from the same random state."""
    torch.manual_seed(seed)
    ours = decode(model, ids, mask, decoding)
    torch.manual_seed(seed)
    with torch.no_grad():
        theirs = model.generate(input_ids=ids, attention_mask=mask, **decoding.generate_kwargs())
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fixed_length_answers_match_generate(dtype):
    model = tiny_opt(500, dtype)
    ids, mask = left_padded_prompts(500)
    decoding = Decoding(max_new=12, min_new=12, eos_id=EOS, pad_id=PAD, temperature=None)
    ours, theirs = both(model, ids, mask, decoding, seed=5)
    assert ours.shape == (4, 18)
    assert torch.equal(ours, theirs)
    assert not (ours[:, 6:] == EOS).any()  # suppressed before min_new


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_other_architectures_match_generate(name):
    model = ARCHITECTURES[name]()
    assert generate_only_reasons(model) == []
    ids, mask = left_padded_prompts(500)
    ours, theirs = both(model, ids, mask, Decoding(10, 10, EOS, PAD, None), seed=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("temperature", [None, 1.0, 0.7])
def test_answers_ending_early(temperature):
    """Rows end at different lengths with pad after their eos, never before min_new tokens;
    greedy ones as generate's, sampled ones the same again for the same seed."""
    model = lean_to_eos(tiny_opt(6, torch.float32), 0.5)
    decoding = Decoding(max_new=6, min_new=3, eos_id=EOS, pad_id=PAD, temperature=temperature)
    ended = kept_on = 0
    for seed in range(6):
        ids, mask = left_padded_prompts(6, seed)
        ours, theirs = both(model, ids, mask, decoding, seed)
        if temperature is None:
            assert torch.equal(ours, theirs)
        else:
            torch.manual_seed(seed)
            assert torch.equal(ours, decode(model, ids, mask, decoding))
        answers = ours[:, 6:]
        assert not (answers[:, :3] == EOS).any()
        for row in answers.tolist():
            if EOS in row:
                ended += 1
                assert set(row[row.index(EOS) + 1 :]) <= {PAD}
            else:
                kept_on += 1
    assert ended > 0 and kept_on > 0  # both cases were exercised


def test_all_rows_ending_early_stop_the_loop():
    """When every row has its eos the loop stops, as generate does: fewer than max_new."""
    model = lean_to_eos(tiny_opt(6, torch.float32), 5.0)
    ids, mask = left_padded_prompts(6)
    decoding = Decoding(max_new=20, min_new=2, eos_id=EOS, pad_id=PAD, temperature=None)
    ours, theirs = both(model, ids, mask, decoding, seed=0)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] < 6 + 20
    assert (ours[:, 6:] == EOS).any(dim=1).all()


def test_decoded_ids_can_train():
    """The ids come out of inference mode as ordinary tensors: a training forward on them
    can run backward (an inference tensor cannot be saved for it)."""
    model = tiny_opt(50, torch.float32).train()
    ids, mask = left_padded_prompts(50)
    seq = decode(model, ids, mask, Decoding(4, 4, EOS, PAD, None))
    assert not seq.is_inference()
    model(input_ids=seq).logits.sum().backward()
    assert model.model.decoder.embed_tokens.weight.grad is not None


def test_a_generation_config_that_asks_for_more_decodes_through_generate():
    model = tiny_opt(50, torch.float32)
    assert generate_only_reasons(model) == []
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.no_repeat_ngram_size = 2
    assert generate_only_reasons(model) == [
        "its generation config sets no_repeat_ngram_size, repetition_penalty"
    ]
    ids, mask = left_padded_prompts(50)
    plain = Decoding(10, 10, EOS, PAD, None)
    through_generate = Decoding(10, 10, EOS, PAD, None, through_generate=True)
    ours, theirs = both(model, ids, mask, through_generate, 0)
    assert torch.equal(ours, theirs)  # the penalty applied
    lean, _ = both(model, ids, mask, plain, 0)
    assert not torch.equal(lean, theirs)  # which the loop alone would not have done


def test_models_with_their_own_generation_inputs_or_no_cache_decode_through_generate():
    """Phi-3 prepares its own inputs (its long RoPE drops the cache past the original length);
    GPT-1 takes no cache."""
    phi3 = tiny(Phi3ForCausalLM, Phi3Config, **LLAMA_SHAPE)
    gpt1 = tiny(OpenAIGPTLMHeadModel, OpenAIGPTConfig, n_embd=32, n_layer=2, n_head=4)
    assert generate_only_reasons(phi3) == ["Phi3ForCausalLM prepares its own generation inputs"]
    assert generate_only_reasons(gpt1) == [
        "OpenAIGPTLMHeadModel prepares its own generation inputs",
        "OpenAIGPTLMHeadModel.forward takes no cache",
    ]


def test_choose_tokens_suppresses_eos_before_min_new():
    logits = torch.zeros(3, 5)
    logits[:, EOS] = 10.0
    decoding = Decoding(8, 2, EOS, PAD, None)
    assert (choose_tokens(logits, 1, decoding) != EOS).all()
    assert (choose_tokens(logits, 2, decoding) == EOS).all()
    assert logits[0, EOS] == 10.0  # the caller's logits are left as they were


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_tokens_follow_the_tempered_distribution(temperature):
    """100,000 draws (one call, one row each): every token's frequency within 4.5 standard
    errors of softmax(logits / temperature); eos, suppressed, never drawn."""
    logits = torch.tensor([[1.0, -0.5, 3.0, 0.0, 2.0, -2.0]])
    draws = 100_000
    decoding = Decoding(8, 2, EOS, PAD, temperature)
    torch.manual_seed(0)
    tokens = choose_tokens(logits.expand(draws, -1), 0, decoding)
    suppressed = logits.clone()
    suppressed[0, EOS] = -float("inf")
    expected = torch.softmax(suppressed / temperature, dim=-1)[0]
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[EOS] == 0
    stderr = (expected * (1 - expected) / draws).sqrt()
    assert ((counts / draws - expected).abs() <= 4.5 * stderr + 1e-12).all()
