"""Models of the four RLHF roles: tokenizer, decoders, value heads, LoRA (peft), engines.

Presets are built from their shape with random weights and a tokenizer trained locally with the
`tokenizers` library on the run's own texts, so nothing is downloaded. A Hugging Face
directory or hub name loads weights and tokenizer through transformers.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero import unwrap_model_for_generation
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from tunelab.config import EngineConfig
from tunelab.errors import TrialFailure
from tunelab.pipeline.checkpoints import (
    backbone_state,
    checkpoint_keys,
    read_state,
    read_tensor,
    strays,
    value_layout,
)
from tunelab.presets import ModelSource

log = logging.getLogger("tunelab")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def tokenizer_vocabulary(texts: list[str], vocab_size: int) -> dict[str, int]:
    """WordPiece vocabulary of `texts`, the same in every process: the special tokens, every
    character alone and as a continuation piece (so any word can be spelt), then whole words
    by falling count, ties by spelling. (tokenizers' WordPieceTrainer orders equal counts by
    a hash map's iteration order, which changes from process to process: a trial's ids would
    not mean the words of another's, nor of a cached stage's weights.)"""
    normalizer, splitter = normalizers.NFKC(), pre_tokenizers.WhitespaceSplit()
    counts = Counter(
        word for text in texts
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))
    )  # fmt: skip
    chars = sorted({char for word in counts for char in word})
    vocab = list(dict.fromkeys([*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]))
    known = set(vocab)
    words = [w for w in sorted(counts, key=lambda w: (-counts[w], w)) if w not in known]
    vocab += words[: max(vocab_size - len(vocab), 0)]
    return {token: index for index, token in enumerate(vocab)}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A WordPiece tokenizer (the `tokenizers` library) over `texts`' vocabulary; every
    sequence starts with <s>.

    WordPiece with a whitespace pre-tokenizer decodes back to space-joined words, which the
    synthetic task's gold reward reads.
    """
    vocab = tokenizer_vocabulary(texts, vocab_size)
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
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


# The config keys DeepSpeed-Chat's configure_dropout sets (dschat/utils/model/model_utils.py).
_DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout")


def engine_dtype(ds_config: dict) -> torch.dtype:
    """The dtype a DeepSpeed engine keeps its module in."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def is_zero3_config(ds_config: dict) -> bool:
    return ds_config["zero_optimization"]["stage"] == 3


@contextlib.contextmanager
def _partitioned(ds_config: dict) -> Iterator[None]:
    """transformers builds (and loads) models under deepspeed.zero.Init while an
    HfDeepSpeedConfig of a ZeRO-3 config is alive, as DeepSpeed-Chat's create_hf_model has it;
    it keeps only a weak reference, hence the local variable."""
    hf_config = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del hf_config
        unset_hf_deepspeed_config()


def _model_config(source: ModelSource, tokenizer, dropout: float | None):
    if source.hf_path is not None:
        config = AutoConfig.from_pretrained(source.hf_path)
    else:
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
        config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    if dropout is not None:
        for key in _DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(config, key, dropout)
    return config


def _build(auto_class, source: ModelSource, tokenizer, ds_config: dict, dropout: float | None,
           with_weights: bool, state_dict: dict | None = None,
           ignored: tuple[str, ...] = ()) -> nn.Module:  # fmt: skip
    """A model in the engine's dtype: a preset's random weights, or a checkpoint's weights
    (`state_dict` stands for the folder's files when its names need mapping first; `ignored`
    names checkpoint tensors the model leaves out on purpose).
    `with_weights=False` builds an HF model from its config alone, for weights loaded next.

    Under ZeRO-3 it is partitioned from the start: without that every rank would build the
    whole model and DeepSpeed would move it to the device whole before partitioning it (the
    load-time OOM DeepSpeed-Chat users meet most). Otherwise it is built (or loaded) straight
    on this rank's device, where DeepSpeed would move it anyway: no copy in host memory, and
    random init runs on the GPU. A checkpoint tensor the model lacks, or a model tensor the
    checkpoint lacks, is an error naming them (transformers would initialise it silently).
    """
    config = _model_config(source, tokenizer, dropout)
    dtype = engine_dtype(ds_config)
    zero3 = is_zero3_config(ds_config)
    device = None if zero3 else torch.device(get_accelerator().current_device_name())
    if source.hf_path is None or not with_weights:
        with _partitioned(ds_config) if zero3 else device:
            return auto_class.from_config(config, dtype=dtype)
    kwargs = {"config": config, "dtype": dtype, "output_loading_info": True}
    if device is not None:
        kwargs["device_map"] = {"": device}
    with _partitioned(ds_config) if zero3 else contextlib.nullcontext():
        if state_dict is not None:  # loaded by the concrete class: no folder to read
            loader = MODEL_MAPPING[type(config)]
            model, info = loader.from_pretrained(None, state_dict=state_dict, **kwargs)
        else:
            model, info = auto_class.from_pretrained(source.hf_path, **kwargs)
    info["unexpected_keys"] = set(info["unexpected_keys"]) - set(ignored)
    _check_loaded(source.hf_path, info)
    log.info("loaded %s from %s", type(model).__name__, source.hf_path)
    return model


def _check_loaded(folder: str, info: dict) -> None:
    problems = [
        f"{what} {len(keys)} tensors ({_some(sorted(map(str, keys)))})"
        for what, keys in (("missing", info["missing_keys"]),
                           ("unexpected", info["unexpected_keys"]),
                           ("shape-mismatched", info["mismatched_keys"]))
        if keys
    ]  # fmt: skip
    if problems:
        raise TrialFailure(f"{folder}: {'; '.join(problems)}")


def build_causal_lm(
    source: ModelSource,
    tokenizer,
    ds_config: dict,
    dropout: float | None = None,
    with_weights: bool = True,
) -> nn.Module:
    """A decoder with an LM head, built for the engine `ds_config` configures."""
    model = _build(AutoModelForCausalLM, source, tokenizer, ds_config, dropout, with_weights)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


class ValueModel(nn.Module):
    """Decoder backbone + scalar head, as DeepSpeed-Chat's RewardModel (reward and critic).

    forward returns values [batch, seq]: one scalar per position.
    """

    def __init__(self, backbone: nn.Module, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.backbone = backbone
        self.v_head = nn.Linear(width, 1, bias=False, dtype=dtype)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        return self.v_head(hidden).squeeze(-1)


def build_value_model(source: ModelSource, tokenizer, ds_config: dict,
                      dropout: float | None = None, with_weights: bool = True,
                      fresh_head: bool = False) -> ValueModel:  # fmt: skip
    """Backbone + value head, built for the engine `ds_config` configures.

    From a checkpoint folder (see tunelab.pipeline.checkpoints for the layouts) the backbone
    and the head are loaded; a checkpoint without a value head is refused unless `fresh_head`
    (a reward model to train, or a study that accepts a random head).
    """
    layout = state = None
    if source.hf_path is not None and with_weights:
        folder = Path(source.hf_path)
        layout = value_layout(checkpoint_keys(folder))
        if layout.prefix is not None:
            full = read_state(folder)
            stray = strays(list(full), layout)
            if stray:
                raise TrialFailure(f"{folder}: unexpected {len(stray)} tensors ({_some(stray)})")
            state = backbone_state(full, layout)
        if layout.head is None and not fresh_head:
            raise TrialFailure(
                f"{folder}: a {layout.name}, no value head (v_head.weight or score.weight); "
                "set models.fresh_value_head: true to accept a freshly initialised one"
            )
    # The head is read below; a causal LM's output layer has no use in a value model.
    ignored = ("lm_head.weight", *([layout.head] if layout and layout.head else []))
    backbone = _build(AutoModel, source, tokenizer, ds_config, dropout, with_weights, state,
                      ignored)  # fmt: skip
    config = backbone.config
    width = getattr(config, "word_embed_proj_dim", None) or config.hidden_size
    if is_zero3_config(ds_config):
        placed = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:
        placed = torch.device(get_accelerator().current_device_name())
    with placed:
        model = ValueModel(backbone, width, engine_dtype(ds_config))
    if layout is not None and layout.head is not None:
        head = read_tensor(Path(source.hf_path), layout.head)
        if head.shape != (1, width):
            raise TrialFailure(
                f"{source.hf_path}: {layout.head} has shape {tuple(head.shape)}, a value head "
                f"is (1, {width})"
            )
        with (
            deepspeed.zero.GatheredParameters(
                [model.v_head.weight], modifier_rank=0, enabled=is_zero3_config(ds_config)
            ),
            torch.no_grad(),
        ):
            model.v_head.weight.copy_(head)
    elif source.hf_path is not None and with_weights:
        log.warning("%s: value head freshly initialised (no head in the checkpoint)",
                    source.hf_path)  # fmt: skip
    return model


def load_weights(model: nn.Module, state: dict[str, torch.Tensor] | None, where: str) -> None:
    """Load rank 0's `state` into `model` on every rank; missing or unexpected keys are an error
    naming them, raised on every rank together.

    Only rank 0 holds the weights. Under ZeRO-3 each module's parameters are gathered and
    rank 0's copy is broadcast on exit (modifier_rank=0); otherwise DeepSpeed broadcasts rank
    0's module when the engine is built (DeepSpeedEngine._broadcast_model).
    """
    rank = dist.get_rank()
    problems = []
    if rank == 0:
        expected = set(model.state_dict())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing:
            problems.append(f"missing {len(missing)} tensors ({_some(missing)})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} tensors ({_some(unexpected)})")
    verdict = [problems]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise TrialFailure(f"{where}: {'; '.join(verdict[0])}")
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    errors: list[str] = []
    for prefix, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=0, enabled=zero3 and own):
            if rank == 0:
                module._load_from_state_dict(
                    state, f"{prefix}." if prefix else "", {}, True, [], [], errors
                )
    if errors:  # shapes that differ: only rank 0 sees them, after the others stopped waiting
        raise TrialFailure(f"{where}: {errors[0].splitlines()[0]}")


def _some(keys: list[str], count: int = 4) -> str:
    return ", ".join(keys[:count]) + (", ..." if len(keys) > count else "")


def prepare_for_training(model: nn.Module, engine: EngineConfig) -> nn.Module:
    """Gradient checkpointing, then LoRA through peft (base frozen, adapters trained).

    LoRA's output is scaled by lora_scaling / lora_rank, as DeepSpeed-Chat's LinearLayer_LoRA
    (peft's scale is lora_alpha / r).
    """
    target = model.backbone if isinstance(model, ValueModel) else model
    if engine.gradient_checkpointing:
        target.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if engine.lora_rank > 0:
        lora = LoraConfig(
            r=engine.lora_rank,
            lora_alpha=engine.lora_scaling,
            target_modules=list(engine.lora_modules)
            if engine.lora_modules != ("all-linear",)
            else "all-linear",
            lora_dropout=0.0,
            bias="none",
        )
        # Adapters in the base layers' dtype (peft would upcast them to fp32): a ZeRO-3 engine
        # takes its partitioned model as built, and needs one dtype for all trained tensors.
        if isinstance(model, ValueModel):  # v_head stays trainable
            model.backbone = get_peft_model(model.backbone, lora, autocast_adapter_dtype=False)
        else:
            model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    return model


def optimizer_groups(model: nn.Module, engine: EngineConfig) -> list[dict]:
    """Trainable parameters; LoRA adapters at lora_learning_rate (DeepSpeed-Chat's
    get_optimizer_grouped_parameters), the rest at the DeepSpeed config's learning rate."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    adapters = [p for name, p in trainable if ".lora_" in name]
    others = [p for name, p in trainable if ".lora_" not in name]
    groups = [{"params": others}] if others else []
    if adapters:
        groups.append({"params": adapters, "lr": engine.lora_learning_rate})
    return groups


def train_engine(model: nn.Module, ds_config: dict, engine: EngineConfig):
    """deepspeed.initialize with an optimizer over the trainable parameters."""
    groups = optimizer_groups(model, engine)
    trained, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return trained


def frozen_engine(model: nn.Module, ds_config: dict):
    """A frozen reference or reward model: DeepSpeed engine without optimizer."""
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


# Up to this many tokens per row, torch's CPU math attention trains (forward and backward) in
# bf16 in 0.18-0.98 of the time of its CPU flash attention (0.20-0.64 from 32 tokens), whose
# backward has a fixed cost per block of queries; from 192 tokens on it takes 0.76-2.30 of it,
# and in fp32 flash is faster at every length (benchmarks/cpu_attention.py: with the mask of a
# padded batch and with is_causal). GPUs keep transformers' default (not measured).
MATH_ATTENTION_MAX_TOKENS = 128


def math_attention(device: torch.device, dtype: torch.dtype, tokens: int) -> bool:
    """Whether a training forward of `tokens` per row runs attention with torch's math
    kernel (see MATH_ATTENTION_MAX_TOKENS)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and tokens <= MATH_ATTENTION_MAX_TOKENS


def training_attention(engine, tokens: int) -> contextlib.AbstractContextManager:
    """Context for a forward of `engine` whose backward follows, and for that backward (which
    runs the forward's kernel, and recomputes a checkpointed forward): the scaled-dot-product
    attention kernel that trains fastest there. PPO scores experience under it too, no-grad,
    so its first training forward gives the experience's figures bit for bit."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    if math_attention(engine.device, dtype, tokens):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def is_zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


@contextlib.contextmanager
def gathered(engine) -> Iterator[None]:
    """All of a ZeRO-3 engine's parameters, whole on every rank (for tests and checks)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=is_zero3(engine)):
        yield


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Whole weights of an engine's model in host memory on rank 0 (None elsewhere), LoRA
    adapters merged into the base, in the engine's dtype.

    Keys are those of the model before peft wrapped it, so the next stage's fresh model loads
    them. Under ZeRO-3 one module (one LoRA layer with its adapters) is gathered at a time, so
    the device never holds the whole model. The adapters' delta is peft's get_delta_weight.
    """
    module, rank = engine.module, dist.get_rank()
    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    copies: dict[int, torch.Tensor] = {}  # tied weights are stored once

    def keep(name: str, tensor: torch.Tensor) -> None:
        if state is not None:
            if id(tensor) not in copies:
                copies[id(tensor)] = tensor.detach().to("cpu", copy=True)
            state[name.replace("base_model.model.", "")] = copies[id(tensor)]

    lora_prefixes: list[str] = []
    zero3 = is_zero3(engine)
    for prefix, sub in module.named_modules():
        if any(prefix.startswith(lora) for lora in lora_prefixes):
            continue  # base layer and adapters of a LoRA layer, merged below
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, LoraLayer):
            lora_prefixes.append(dot)
            base = sub.get_base_layer()
            with deepspeed.zero.GatheredParameters(list(sub.parameters()), enabled=zero3):
                if state is not None:
                    with torch.no_grad():
                        delta = sub.get_delta_weight(sub.active_adapters[0])
                        merged = base.weight.detach() + delta.to(base.weight.dtype)
                    state[f"{dot}weight".replace("base_model.model.", "")] = merged.cpu()
                    if base.bias is not None:
                        keep(f"{dot}bias", base.bias)
            continue
        own = list(sub.named_parameters(recurse=False))
        buffers = [
            (name, b) for name, b in sub.named_buffers(recurse=False)
            if name not in sub._non_persistent_buffers_set
        ]  # fmt: skip
        with deepspeed.zero.GatheredParameters([p for _, p in own], enabled=zero3 and own):
            for name, tensor in own + buffers:
                keep(f"{dot}{name}", tensor)
    return state


@contextlib.contextmanager
def generation_weights(engine, mode: str) -> Iterator[None]:
    """The actor's weights for one generate call.

    ZeRO-3 `gather_once`: every parameter is gathered once and DeepSpeed's partitioning hooks
    are lifted for the call (deepspeed.runtime.zero.unwrap_model_for_generation), so decoding
    runs without collectives and ranks may finish at different lengths. `per_layer`:
    DeepSpeed-Chat's way, the hooks gather each layer for every token, and generate must be
    called with synced_gpus=True so ranks keep stepping together. Other stages: nothing to do.
    """
    if is_zero3(engine) and mode == "gather_once":
        with unwrap_model_for_generation(engine):
            yield
    else:
        yield


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters of a model, whole sizes also when ZeRO-3 partitioned it."""
    total = trainable = 0
    for param in model.parameters():
        count = getattr(param, "ds_numel", param.numel())
        total += count
        trainable += count if param.requires_grad else 0
    return total, trainable
