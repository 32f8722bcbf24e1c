"""A user's checkpoints as actor, critic and reward model: DeepSpeed-Chat's step-1 and step-2
outputs (plain and ZeRO-3 forms), sequence-classification models, and refusals naming tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from tunelab.config import load_config
from tunelab.dsconfig import eval_ds_config
from tunelab.errors import TrialFailure
from tunelab.pipeline.models import build_causal_lm, build_value_model, train_tokenizer
from tunelab.presets import resolve_model

from ..conftest import TINY
from ..helpers.dschat_checkpoints import tiny_config, write_step1, write_step2

IDS = torch.tensor([[1, 5, 9, 12, 7, 30], [1, 8, 8, 40, 41, 2]])


@pytest.fixture(scope="module")
def setup(in_process_trials):
    from tunelab.pipeline.runtime import start_runtime

    config = load_config(TINY, ["precision=fp32"])  # exact comparisons
    start_runtime(config)
    tokenizer = train_tokenizer(["review of the film : good bad fine"] * 4, vocab_size=128)
    return config, tokenizer


def _value_scores(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))[:, -1]


@pytest.mark.parametrize("zero3_form", [False, True])
@pytest.mark.parametrize("stage", [0, 3])
def test_dschat_step2_output_scores_as_saved(setup, tmp_path, zero3_form, stage):
    config, tokenizer = setup
    saved = write_step2(tmp_path / "step2", tokenizer, zero3_form)
    ds_config = eval_ds_config(config, zero_stage=stage, offload=False)
    model = build_value_model(resolve_model(str(tmp_path / "step2")), tokenizer, ds_config)
    if stage == 3:
        from tunelab.pipeline.models import frozen_engine

        model = frozen_engine(model, ds_config)
    with torch.no_grad():
        expected = saved.scores(IDS)
    assert torch.allclose(_value_scores(model), expected, atol=1e-5)


@pytest.mark.parametrize("zero3_form", [False, True])
def test_dschat_step1_output_loads_as_the_actor(setup, tmp_path, zero3_form):
    config, tokenizer = setup
    saved = write_step1(tmp_path / "step1", tokenizer, zero3_form)
    model = build_causal_lm(resolve_model(str(tmp_path / "step1")), tokenizer,
                            eval_ds_config(config, zero_stage=0, offload=False))  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, saved(input_ids=IDS).logits)


def test_sequence_classification_checkpoint_gives_its_score_head(setup, tmp_path):
    config, tokenizer = setup
    hf_config = tiny_config(tokenizer)
    hf_config.num_labels = 1
    saved = AutoModelForSequenceClassification.from_config(hf_config).eval()
    saved.save_pretrained(tmp_path / "cls")
    model = build_value_model(resolve_model(str(tmp_path / "cls")), tokenizer,
                              eval_ds_config(config, zero_stage=0, offload=False))  # fmt: skip
    with torch.no_grad():
        expected = saved(input_ids=IDS).logits.squeeze(-1)  # OPT scores the last token
    assert torch.allclose(_value_scores(model), expected, atol=1e-5)


def test_mismatched_keys_are_refused_with_their_names(setup, tmp_path):
    config, tokenizer = setup
    folder = tmp_path / "bad"
    write_step2(folder, tokenizer)
    state = torch.load(folder / "pytorch_model.bin")
    state["rwtransformer.decoder.extra.weight"] = state.pop(
        "rwtransformer.decoder.final_layer_norm.weight"
    )
    state["classifier.weight"] = torch.zeros(1)
    torch.save(state, folder / "pytorch_model.bin")
    ds_config = eval_ds_config(config, zero_stage=0, offload=False)
    with pytest.raises(TrialFailure, match=r"unexpected 1 tensors \(classifier.weight\)"):
        build_value_model(resolve_model(str(folder)), tokenizer, ds_config)
    del state["classifier.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(
        TrialFailure,
        match=r"missing 1 tensors \(decoder.final_layer_norm.weight\)"
        r"; unexpected 1 tensors \(decoder.extra.weight\)",
    ):
        build_value_model(resolve_model(str(folder)), tokenizer, ds_config)


def test_a_language_model_is_no_reward_model_unless_a_fresh_head_is_accepted(setup, tmp_path):
    config, tokenizer = setup
    write_step1(tmp_path / "lm", tokenizer)
    source = resolve_model(str(tmp_path / "lm"))
    ds_config = eval_ds_config(config, zero_stage=0, offload=False)
    with pytest.raises(TrialFailure, match="language model without a value head"):
        build_value_model(source, tokenizer, ds_config)
    model = build_value_model(source, tokenizer, ds_config, fresh_head=True)
    assert model.v_head.weight.shape == (1, 64)
