"""Model shapes: analytic parameter counts equal transformers' own, FLOPs formulas."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from tunelab.errors import InputError
from tunelab.flops import forward_flops, generation_flops, train_flops
from tunelab.presets import PRESETS, resolve_model

# Published counts (REFERENCE.md: transformers configs, tied embeddings counted once).
PUBLISHED = {
    "opt-125m": 125_239_296,
    "opt-350m": 331_196_416,
    "opt-1.3b": 1_315_758_080,
    "llama-2-7b": 6_738_415_616,
}


def _meta_model(shape, cls):
    kwargs = shape.hf_config()
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with torch.device("meta"):
        return cls.from_config(config)


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_match_transformers(name):
    shape = PRESETS[name]
    lm = _meta_model(shape, AutoModelForCausalLM)
    assert shape.num_params() == sum(p.numel() for p in lm.parameters())
    backbone = _meta_model(shape, AutoModel)
    assert shape.num_params(lm_head=False) == sum(p.numel() for p in backbone.parameters())
    if name in PUBLISHED:
        assert shape.num_params() == PUBLISHED[name]


def test_local_directory_shape(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "opt",
                **{k: v for k, v in PRESETS["opt-350m"].hf_config().items() if k != "model_type"},
            }
        )
    )
    source = resolve_model(str(tmp_path))
    assert source.shape == PRESETS["opt-350m"]
    assert source.hf_path == str(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InputError, match="not supported"):
        resolve_model(str(tmp_path))


def test_flops_follow_6n_rule():
    shape = PRESETS["opt-1.3b"]
    # Training FLOPs per token ~ 6 x parameters (PaLM appendix B), attention term aside.
    per_token = train_flops(shape, batch=1, seq_len=1)
    assert per_token == pytest.approx(6 * shape.num_params(), rel=0.1)
    assert train_flops(shape, 4, 512) == 3 * forward_flops(shape, 4, 512)
    # Generation = prefill + one-token steps; never less than a forward over the prompt.
    assert generation_flops(shape, 2, 256, 256) > forward_flops(shape, 2, 256)
    # Logits only where a token is chosen: none without answer tokens, the last position for one.
    assert generation_flops(shape, 2, 256, 0) == forward_flops(shape, 2, 256, logits=0)
    assert generation_flops(shape, 2, 256, 1) == forward_flops(shape, 2, 256, logits=1)
