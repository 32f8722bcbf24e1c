"""Export: DeepSpeed JSON per engine that builds real engines and runs a PPO step; DeepSpeed-Chat
flags; the reproduce table."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from tunelab.config import load_config
from tunelab.dschat import step3_command, step3_parser
from tunelab.errors import InputError
from tunelab.export import (
    choose_trial,
    export_files,
    reproduce_table,
    reproduce_text,
    rerun_seeds,
    write_export,
)
from tunelab.records import ENGINES, OBJECTIVES_ATTR, from_frozen_trial

from .conftest import TINY

OBJECTIVES = [{"metric": "perf/ppo_e2e_tokens_per_s", "direction": "maximize"}]


def _study_with(config, value=1000.0, repeats=(), repeat_of=0):
    """A study of one trial of `config` and confirmation runs of trial `repeat_of` measuring
    `repeats`."""
    study = optuna.create_study(directions=["maximize"])
    study.set_user_attr(OBJECTIVES_ATTR, OBJECTIVES)
    for measured, link in ((value, {}), *((v, {"repeat_of": repeat_of}) for v in repeats)):
        study.add_trial(
            optuna.trial.create_trial(
                value=measured, params={}, distributions={},
                user_attrs={"status": "ok", "config": config.to_dict(),
                            "perf/ppo_e2e_tokens_per_s": measured, **link},
            )
        )  # fmt: skip
    return study


def test_export_figures_are_the_means_the_report_states(tmp_path):
    study = _study_with(load_config(TINY), 1000.0, repeats=(900.0, 1100.0))
    chosen = choose_trial(study)
    assert chosen.number == 0 and choose_trial(study, number=2).number == 0  # a repeat's
    files = export_files("s", chosen, OBJECTIVES)
    figures = json.loads(files["study.json"])
    assert figures["values"] == [1000.0] and figures["runs"] == [3]
    assert figures["sd"] == [100.0] and figures["trials"] == [0, 1, 2]
    assert figures["ci95_half_width"][0] == pytest.approx(4.303 * 100 / 3**0.5)
    assert ("perf/ppo_e2e_tokens_per_s = 1000 ± 248 (mean ± 95% interval of 3 runs)"
            in files["README.md"])  # fmt: skip


def test_dschat_flags_follow_the_trial():
    config = load_config(TINY, [
        "ranks=2", "batch.train_micro=8", "batch.generation_micro=8", "actor.zero_stage=3",
        "critic.zero_stage=2", "actor.lora_rank=64", "actor.offload_params=cpu",
        "offload_reference=true", "hybrid_engine=true", "ppo.kl_coef=0.05", "precision=fp16",
        "critic.dropout=0.1",
    ])  # fmt: skip
    argv, notes = step3_command(config)
    assert argv[:4] == ["deepspeed", "--num_gpus", "2", "main.py"]
    # DeepSpeed-Chat's own flag set (strict parse_args: an unknown flag ends its run).
    args = step3_parser().parse_args(argv[4:])
    assert (args.actor_zero_stage, args.critic_zero_stage) == (3, 2)
    assert args.per_device_training_batch_size == 8 and args.dtype == "fp16"
    assert args.actor_lora_dim == 64 and args.actor_lora_learning_rate == 2e-2
    assert args.only_optimize_lora and args.offload and args.offload_reference_model
    assert args.enable_hybrid_engine and not args.offload_reward_model
    assert (args.actor_dropout, args.critic_dropout) == (0.0, 0.1)
    assert args.critic_lora_dim == 0
    assert any("kl_ctl=0.05" in note for note in notes)  # hard-coded in DeepSpeed-Chat
    assert any("gathered it once per generate call" in note for note in notes)


@pytest.mark.parametrize("overrides", [[], ["actor.lora_rank=8", "critic.lora_rank=8",
                                            "actor.lora_modules=q_proj,v_proj", "precision=fp32",
                                            "actor.offload_optimizer=cpu"]])  # fmt: skip
def test_every_exported_command_parses_with_dschat_flags(overrides):
    argv, _ = step3_command(load_config(TINY, overrides))
    step3_parser().parse_args(argv[4:])  # raises on any flag DeepSpeed-Chat does not define


def test_dschat_parser_refuses_unknown_flags():
    models = ["--actor_model_name_or_path", "a", "--critic_model_name_or_path", "c"]
    with pytest.raises(InputError, match="unrecognized arguments: --disable_actor_dropout"):
        step3_parser().parse_args([*models, "--disable_actor_dropout"])


def test_llama_lora_scope_is_dschat_scripts():
    config = load_config(TINY, ["models.actor=llama-2-7b", "actor.lora_rank=8"])
    args = step3_parser().parse_args(step3_command(config)[0][4:])
    assert args.actor_lora_module_name == "layers."  # run_llama2_7b_lora.sh


def test_export_files_are_complete_and_round_trip(tmp_path):
    config = load_config(TINY, ["actor.zero_stage=1"])
    study = _study_with(config)
    record = choose_trial(study)
    files = export_files("s", record, OBJECTIVES)
    assert set(files) == {f"ds_config_{r}.json" for r in ENGINES} | {
        "trial.yaml", "study.json", "README.md"}  # fmt: skip
    written = write_export(study, record, tmp_path)
    assert load_config(written / "trial.yaml") == config
    assert json.loads((written / "study.json").read_text())["values"] == [1000.0]
    readme = (written / "README.md").read_text()
    assert "tunelab trial trial.yaml" in readme
    assert "Stages: SFT trained (40 steps), reward model trained (40 steps)" in readme


def test_choose_trial_errors_are_one_line():
    from tunelab.errors import InputError

    study = _study_with(load_config(TINY))
    with pytest.raises(InputError, match="no trial 7"):
        choose_trial(study, number=7)
    with pytest.raises(InputError, match="the study's objectives are perf/ppo_e2e_tokens_per_s"):
        choose_trial(study, objective="ppo/gold_gain")


def test_reproduce_table_puts_reruns_next_to_the_study():
    figures = {"objectives": OBJECTIVES, "values": [100.0], "runs": [3], "sd": [5.0],
               "ci95_half_width": [12.4]}  # fmt: skip
    table = reproduce_table(figures, [{"perf/ppo_e2e_tokens_per_s": 90.0},
                                      {"perf/ppo_e2e_tokens_per_s": 110.0}])  # fmt: skip
    row = table.iloc[0]
    assert (row["study"], row["study ± 95%"], row["study runs"]) == (100.0, 12.4, 3)
    assert row["reruns"] == 100.0 and row["reruns / study"] == 1.0 and row["runs ok"] == 2
    assert row["reruns ± 95%"] == pytest.approx(12.706 * 200**0.5 / 2**0.5)
    assert row["95% intervals"] == "overlap"
    far = reproduce_table(figures, [{"perf/ppo_e2e_tokens_per_s": v} for v in (200.0, 201.0)])
    assert far.iloc[0]["95% intervals"] == "disjoint"
    once = reproduce_table({**figures, "runs": [1], "sd": [None], "ci95_half_width": [None]},
                           [{"perf/ppo_e2e_tokens_per_s": 90.0}, {}])  # fmt: skip
    assert once.iloc[0]["95% intervals"] == "a side ran once" and once.iloc[0]["runs ok"] == 1
    failed = reproduce_table(figures, [{}, {}])  # every rerun failed
    assert failed.iloc[0]["95% intervals"] == "no rerun ok" and failed.iloc[0]["runs ok"] == 0


def test_reproduce_text_prints_bytes_in_mib():
    figures = {"objectives": [{"metric": "mem/peak_host_rss_bytes", "direction": "minimize"}],
               "values": [537692842.7], "runs": [3], "sd": [180704.3],
               "ci95_half_width": [448930.7]}  # fmt: skip
    runs = [{"mem/peak_host_rss_bytes": v} for v in (5.377e8, 5.378e8)]
    text = reproduce_text(reproduce_table(figures, runs))
    assert "513 MiB" in text and "0.428 MiB" in text and "e+08" not in text


def test_reproduce_reruns_the_studys_seeds_and_says_which(tmp_path, monkeypatch, capsys):
    """Each repeat runs its own seed, the trial's then the ones its confirmation runs took
    (not the export's one seed three times, whose spread is 0)."""
    import tunelab.cli
    import tunelab.launcher
    from tunelab.launcher import TrialOutcome
    from tunelab.records import Status

    config = load_config(TINY, ["seed=1234"])
    study = _study_with(config, 1000.0, repeats=(900.0, 1100.0))
    export = write_export(study, choose_trial(study), tmp_path / "export")
    seeds = []

    def launch(config, out_dir, **options):
        seeds.append(config.seed)
        metrics = {"perf/ppo_e2e_tokens_per_s": 950.0 + 50 * len(seeds)}
        return TrialOutcome(Status.OK, "", metrics, {}, 1.0, 0, out_dir)

    monkeypatch.setattr(tunelab.launcher, "launch_trial", launch)
    monkeypatch.setattr(tunelab.cli, "_build_ops_for", lambda config, out: None)
    code = tunelab.cli.main(["reproduce", str(export), "--out", str(tmp_path / "reruns")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert seeds == [1234, 1235, 1236] == rerun_seeds(1234, 3)
    assert "repeat 1 (seed 1235): ok" in err
    header, columns, row = out.splitlines()
    assert header.startswith(f"study {study.study_name}, trial 0, 3 repeats, seeds 1234, 1235, "
                             "1236 (")  # fmt: skip
    assert columns.split()[:7] == ["objective", "direction", "study", "study", "±", "95%", "study"]
    assert row.split()[:9] == ["perf/ppo_e2e_tokens_per_s", "maximize", "1000", "tokens/s",
                               "248", "tokens/s", "3", "1050", "tokens/s"]  # fmt: skip
    assert row.endswith("overlap")


def test_engines_from_exported_json_run_a_ppo_step(in_process_trials, tmp_path):
    from tunelab.pipeline.models import build_causal_lm, build_value_model, gathered
    from tunelab.pipeline.ppo import PPOTrainer
    from tunelab.pipeline.run import build_context
    from tunelab.pipeline.runtime import start_runtime
    from tunelab.pipeline.telemetry import MemoryTracker

    config = load_config(TINY, [
        "actor.zero_stage=3", "critic.zero_stage=2", "actor.lora_rank=4",
        "offload_reference=true", "critic.offload_optimizer=cpu",
    ])  # fmt: skip
    study = _study_with(config)
    export = write_export(study, choose_trial(study), tmp_path / "export")
    ds_configs = {
        r: json.loads((export / f"ds_config_{r}.json").read_text()) for r in ENGINES
    }
    runtime = start_runtime(config)
    memory = MemoryTracker(runtime.device)
    ctx = build_context(config, runtime, memory, ds_configs=ds_configs)
    whole = ds_configs["reward"]  # ZeRO-0: the hand-off weights are whole tensors
    sft = build_causal_lm(ctx.actor_source, ctx.tokenizer, whole).state_dict()
    rm = build_value_model(ctx.critic_source, ctx.tokenizer, whole).state_dict()
    trainer = PPOTrainer(ctx, sft, rm)
    try:
        assert trainer.actor.zero_optimization_stage() == 3
        assert trainer.critic.zero_optimization_stage() == 2
        assert trainer.reference.zero_optimization_stage() == 3  # follows the actor, offloaded
        assert trainer.reward.zero_optimization_stage() == 0
        rows = list(range(config.batch.generation_micro))
        seq, mask, answer_mask, _ = trainer.generate(*ctx.data.prompts.rows(rows, runtime.device))
        experience = trainer.make_experience(seq, mask, answer_mask)
        with gathered(trainer.actor):
            before = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()
                      if "lora_B" in n}  # fmt: skip
        stats = trainer.train(experience, step=0)
        with gathered(trainer.actor):
            after = {n: p.detach().clone() for n, p in trainer.actor.module.named_parameters()
                     if "lora_B" in n}  # fmt: skip
    finally:
        trainer.close()
        memory.close()
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the actor learned
    assert from_frozen_trial(study.trials[0]).config["actor"]["zero_stage"] == 3


def test_export_prints_no_deepspeed_accelerator_warning(tmp_path):
    """Export imports DeepSpeed to validate the configs; on a machine without a GPU its import
    warned "Setting accelerator to CPU", noise for an export (a fresh process: DeepSpeed not
    loaded yet)."""
    import subprocess
    import sys

    from tunelab.storage import default_url

    folder = tmp_path / "study"
    folder.mkdir()
    study = _study_with(load_config(TINY))
    copy = optuna.create_study(storage=default_url(folder), study_name="s",
                               directions=["maximize"])  # fmt: skip
    copy.set_user_attr(OBJECTIVES_ATTR, OBJECTIVES)
    copy.add_trials(study.trials)
    run = subprocess.run([sys.executable, "-m", "tunelab", "export", str(folder)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("exported trial 0 of s to ") and run.stderr == ""
