"""Models of the four RLHF roles: tokenizer, decoders, value heads, LoRA (peft), engines.

Presets are built from their shape with random weights and a tokenizer trained locally with the
`tokenizers` library on the run's own texts, so nothing is downloaded. A Hugging Face
directory or hub name loads weights and tokenizer through transformers.
"""

from __future__ import annotations

import contextlib
import logging

import deepspeed
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import WordPieceTrainer
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from tunelab.config import EngineConfig
from tunelab.presets import ModelSource

log = logging.getLogger("tunelab")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer trained on `texts`; every sequence starts with <s>.

    WordPiece with a whitespace pre-tokenizer decodes back to space-joined words, which the
    synthetic task's gold reward reads.
    """
    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_tokenizer(source: ModelSource, texts: list[str]) -> PreTrainedTokenizerBase:
    """The actor's tokenizer (the critic shares it, as in DeepSpeed-Chat)."""
    if source.hf_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(source.hf_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return train_tokenizer(texts, vocab_size=min(source.shape.vocab_size, 8192))


def _preset_config(source: ModelSource, tokenizer: PreTrainedTokenizerBase):
    if len(tokenizer) > source.shape.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, model {source.name} "
            f"only {source.shape.vocab_size}"
        )
    kwargs = source.shape.hf_config()
    kwargs.update(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build_causal_lm(source: ModelSource, tokenizer, state_dict=None) -> nn.Module:
    """A decoder with an LM head: random weights for presets, loaded ones for HF paths."""
    if source.hf_path is not None:
        model = AutoModelForCausalLM.from_pretrained(source.hf_path, torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(_preset_config(source, tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


class ValueModel(nn.Module):
    """Decoder backbone + scalar head, as DeepSpeed-Chat's RewardModel (reward and critic).

    forward returns values [batch, seq]: one scalar per position.
    """

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.v_head = nn.Linear(width, 1, bias=False)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.v_head(hidden).squeeze(-1)


def build_value_model(source: ModelSource, tokenizer, state_dict=None) -> ValueModel:
    if source.hf_path is not None:
        backbone = AutoModel.from_pretrained(source.hf_path, torch_dtype=torch.float32)
    else:
        backbone = AutoModel.from_config(_preset_config(source, tokenizer))
    config = backbone.config
    width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
    model = ValueModel(backbone, width)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def prepare_for_training(model: nn.Module, engine: EngineConfig) -> nn.Module:
    """Gradient checkpointing, then LoRA through peft (base frozen, adapters trained)."""
    target = model.backbone if isinstance(model, ValueModel) else model
    if engine.gradient_checkpointing:
        target.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if engine.lora_rank > 0:
        lora = LoraConfig(
            r=engine.lora_rank,
            lora_alpha=engine.lora_scaling * engine.lora_rank,
            target_modules=list(engine.lora_modules)
            if engine.lora_modules != ("all-linear",)
            else "all-linear",
            lora_dropout=0.0,
            bias="none",
        )
        if isinstance(model, ValueModel):
            model.backbone = get_peft_model(model.backbone, lora)  # v_head stays trainable
        else:
            model = get_peft_model(model, lora)
    return model


def train_engine(model: nn.Module, ds_config: dict):
    """deepspeed.initialize with an optimizer over the trainable parameters."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameters, config=ds_config)
    return engine


def frozen_engine(model: nn.Module, ds_config: dict):
    """A frozen reference or reward model: DeepSpeed engine without optimizer."""
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


@contextlib.contextmanager
def gathered(engine):
    """All of a ZeRO-3 engine's parameters, whole on every rank (for generation, export)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=is_zero3(engine)):
        yield


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """Whole weights of an engine's model on the CPU, LoRA adapters merged into the base.

    Keys are those of the model before peft wrapped it, so the next stage's fresh model loads
    them. The adapters' delta comes from peft's own get_delta_weight; nothing is modified.
    """
    module = engine.module
    lora_layers = {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}
    state = {}
    with gathered(engine), torch.no_grad():
        # state_dict (not named_parameters) keeps tied keys such as lm_head.weight.
        for name, param in module.state_dict(keep_vars=True).items():
            if ".lora_" in name:
                continue
            value = param.detach()
            owner, _, leaf = name.rpartition(".base_layer.")
            if owner in lora_layers and leaf == "weight":
                layer = lora_layers[owner]
                value = value + layer.get_delta_weight(layer.active_adapters[0]).to(value.dtype)
            key = name.replace("base_model.model.", "").replace(".base_layer.", ".")
            state[key] = value.to("cpu", copy=True)
    return state
