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

    def layer_params(self) -> int:
        """Parameters of one decoder layer (as transformers builds OPT and Llama)."""
        h, f = self.hidden_size, self.ffn_dim
        if self.family == "opt":
            # q, k, v, out projections with biases; fc1, fc2 with biases; two LayerNorms.
            return 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
        # q, o: h x h; k, v: h x kv_dim; gate, up, down: h x f; two RMSNorms; no biases.
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * f + 2 * h

    def embedding_params(self) -> int:
        """Token (and OPT's learned position) embeddings, projections and the final norm."""
        h, p = self.hidden_size, self.output_dim
        if self.family == "opt":
            # OPT's position table has 2 extra rows; OPT-350m (post-LN) has no final LayerNorm.
            count = self.vocab_size * p + (self.max_positions + 2) * h
            if self.word_embed_proj_dim:
                count += 2 * h * p
            else:
                count += 2 * h
            return count
        return self.vocab_size * h + h

    def num_params(self, lm_head: bool = True) -> int:
        """Total parameters; `lm_head=False` for the backbone under a value head."""
        count = self.embedding_params() + self.num_layers * self.layer_params()
        if lm_head and not self.tie_embeddings:
            count += self.vocab_size * self.output_dim
        return count

    def hf_config(self) -> dict[str, Any]:
        """Keyword arguments for transformers' AutoConfig.for_model (dropout off, as PPO needs)."""
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
                "dropout": 0.0,
                "attention_dropout": 0.0,
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
