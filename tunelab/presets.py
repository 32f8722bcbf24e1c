"""Model shapes: presets of real models (random weights) and shapes read from local configs.

Pure Python (no torch), so the memory model and the orchestrator can use the shapes. The
pipeline turns a shape into a transformers config (`ModelShape.hf_config`).
Hyperparameters are the published ones (facebook/opt-*, meta-llama/Llama-2-7b-hf config.json).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import InputError

Family = Literal["opt", "llama"]


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that set a decoder's parameter count, FLOPs and memory."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int
    word_embed_proj_dim: int | None = None  # OPT-350m projects embeddings 512 <-> 1024
    num_kv_heads: int | None = None  # Llama grouped-query attention; None = num_heads
    tie_embeddings: bool = True

    @property
    def output_dim(self) -> int:
        """Width of the backbone's last hidden state (what a value head reads)."""
        return self.word_embed_proj_dim or self.hidden_size

    @property
    def kv_dim(self) -> int:
        return self.hidden_size * (self.num_kv_heads or self.num_heads) // self.num_heads

    def layer_linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of each linear layer in one decoder block."""
        h, f, kv = self.hidden_size, self.ffn_dim, self.kv_dim
        if self.family == "opt":
            names = ("q_proj", "k_proj", "v_proj", "out_proj")
            return [*((n, h, h) for n in names), ("fc1", h, f), ("fc2", f, h)]
        return [
            ("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h),
            ("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h),
        ]  # fmt: skip

    def extra_linears(self) -> list[tuple[str, int, int]]:
        """Linear layers outside the blocks other than the LM head (OPT-350m's projections)."""
        if self.word_embed_proj_dim:
            p, h = self.word_embed_proj_dim, self.hidden_size
            return [("project_in", p, h), ("project_out", h, p)]
        return []

    def param_tensors(self, lm_head: bool = True) -> list[int]:
        """Element count of every parameter tensor, as transformers builds OPT and Llama.

        `lm_head=False` for the backbone under a value head. ZeRO-3 treats tensors below its
        persistence threshold differently, hence the per-tensor view.
        """
        h = self.hidden_size
        opt = self.family == "opt"
        tensors = [self.vocab_size * self.output_dim]
        if opt:
            tensors.append((self.max_positions + 2) * h)  # OPT's learned positions, offset 2
        tensors += [i * o for _, i, o in self.extra_linears()]
        for _ in range(self.num_layers):
            for _, fan_in, fan_out in self.layer_linears():
                tensors.append(fan_in * fan_out)
                if opt:
                    tensors.append(fan_out)  # bias
            tensors += [h, h, h, h] if opt else [h, h]  # two LayerNorms (weight, bias) / RMSNorms
        if opt and not self.word_embed_proj_dim:
            tensors += [h, h]  # final LayerNorm; OPT-350m (post-LN) has none
        if not opt:
            tensors.append(h)  # final RMSNorm
            if lm_head and not self.tie_embeddings:
                tensors.append(self.vocab_size * h)
        return tensors

    def num_params(self, lm_head: bool = True) -> int:
        """Total parameters; `lm_head=False` for the backbone under a value head."""
        return sum(self.param_tensors(lm_head))

    def hf_config(self) -> dict[str, Any]:
        """Keyword arguments for transformers' AutoConfig.for_model. Dropout is the published
        model's (OPT: 0.1); the trial's `dropout` knobs set it per engine."""
        if self.family == "opt":
            return {
                "model_type": "opt",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "ffn_dim": self.ffn_dim,
                "max_position_embeddings": self.max_positions,
                "word_embed_proj_dim": self.word_embed_proj_dim or self.hidden_size,
                # OPT-350m is the one post-layer-norm OPT.
                "do_layer_norm_before": self.word_embed_proj_dim is None,
                "pad_token_id": 1,
                "bos_token_id": 2,
                "eos_token_id": 2,
            }
        return {
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads or self.num_heads,
            "intermediate_size": self.ffn_dim,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


PRESETS: dict[str, ModelShape] = {
    # CPU-sized decoders for tests and the smoke study.
    "tiny": ModelShape("opt", 512, 64, 2, 4, 256, 256),
    "tiny-llama": ModelShape("llama", 512, 64, 2, 4, 192, 256),
    "opt-125m": ModelShape("opt", 50272, 768, 12, 12, 3072, 2048),
    "opt-350m": ModelShape("opt", 50272, 1024, 24, 16, 4096, 2048, word_embed_proj_dim=512),
    "opt-1.3b": ModelShape("opt", 50272, 2048, 24, 32, 8192, 2048),
    "llama-2-7b": ModelShape("llama", 32000, 4096, 32, 32, 11008, 4096, tie_embeddings=False),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a role's model comes from: a preset shape, or a Hugging Face path/hub name."""

    name: str
    shape: ModelShape | None  # None only for a hub name not available locally
    hf_path: str | None  # None for presets (random weights, locally built tokenizer)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": asdict(self.shape) if self.shape else None}


def shape_from_hf_config(config: dict[str, Any], where: str) -> ModelShape:
    """Read a ModelShape from a Hugging Face config.json mapping (OPT or Llama families)."""
    model_type = config.get("model_type")
    try:
        if model_type == "opt":
            proj = config.get("word_embed_proj_dim", config["hidden_size"])
            return ModelShape(
                "opt",
                config["vocab_size"],
                config["hidden_size"],
                config["num_hidden_layers"],
                config["num_attention_heads"],
                config["ffn_dim"],
                config["max_position_embeddings"],
                word_embed_proj_dim=proj if proj != config["hidden_size"] else None,
            )
        if model_type in ("llama", "mistral", "qwen2"):
            return ModelShape(
                "llama",
                config["vocab_size"],
                config["hidden_size"],
                config["num_hidden_layers"],
                config["num_attention_heads"],
                config["intermediate_size"],
                config["max_position_embeddings"],
                num_kv_heads=config.get("num_key_value_heads"),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
    except KeyError as exc:
        raise InputError(f"{where}: config.json lacks {exc.args[0]}") from None
    raise InputError(f"{where}: model_type {model_type!r} is not supported (opt or llama family)")


def hub_cache_problem(name: str) -> str | None:
    """Why hub model `name` cannot be loaded as README promises (from the local Hugging Face
    cache: trials never download), or None when the cache holds its config.json."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        return f"{name!r} is neither a local directory nor a hub name"
    if isinstance(cached, str):
        return None
    return (f"{name!r} is not a local directory, nor a model in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); download it first (`huggingface-cli download {name}`) "
            "or correct the path")  # fmt: skip


def resolve_model(name: str) -> ModelSource:
    """A preset name, a local directory holding config.json, or a hub name (resolved later)."""
    if name in PRESETS:
        return ModelSource(name, PRESETS[name], None)
    path = Path(name).expanduser()
    if path.exists():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise InputError(f"{name}: a model directory needs config.json")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{config_file}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        return ModelSource(name, shape_from_hf_config(config, str(config_file)), str(path))
    if "/" in name and not name.startswith((".", "/")):
        return ModelSource(name, None, name)  # hub name: the pipeline loads it from the cache
    presets = ", ".join(PRESETS)
    raise InputError(f"model {name!r}: not a preset ({presets}), a local directory or a hub name")
