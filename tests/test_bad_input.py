"""Issue 12's bad inputs, each through the real CLI entry (`tunelab.cli.main`, in this process):
exit code 2, one actionable line, nothing created or launched. Plus a spec with several
mistakes, reported all at once."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from tunelab.cli import main
from tunelab.errors import InputError

from .conftest import ROOT, TINY

DSCHAT = ROOT / "studies" / "trials" / "opt-1.3b-opt-350m.yaml"
LATIN1 = "seed: 1\nprecision: bf16  # r\xe9sum\xe9\n".encode("latin-1")
GARBAGE = bytes(range(256)) * 4


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("tunelab: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/) land here, never in the repo


def spec(tmp_path, body: str, name: str = "spec.yaml"):
    (tmp_path / "trials").mkdir(exist_ok=True)
    (tmp_path / "trials" / "tiny.yaml").write_text(TINY.read_text())
    path = tmp_path / name
    path.write_text(
        "name: t\nbase: trials/tiny.yaml\nbudget: {trials: 2}\n"
        "objectives: [{metric: perf/ppo_e2e_tokens_per_s, direction: maximize}]\n"
        + textwrap.dedent(body)
    )
    return path


@pytest.mark.parametrize("content", [LATIN1, GARBAGE], ids=["latin-1", "binary"])
@pytest.mark.parametrize("command", ["trial", "estimate", "run"])
def test_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys, command, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    extra = ["--out", tmp_path / "out"] if command != "estimate" else []
    code, _, err = cli(capsys, command, path, *extra)
    one_line_error(code, err, f"{path}: not UTF-8 text (byte 0x", "save it as UTF-8")
    assert not (tmp_path / "out").exists()


def test_a_latin1_data_file_is_one_line(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    row = '{"prompt": "a", "chosen": "tr\xe8s bien", "rejected": "c"}\n'
    data.write_bytes(row.encode("latin-1"))
    code, _, err = cli(capsys, "trial", TINY, "--out", tmp_path / "out", f"data.source={data}")
    one_line_error(code, err, f"{data}: not UTF-8 text (byte 0xe8")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: " + "[" * 3000 + "]" * 3000, "nested deeper than 32 levels"),
        ("seed: &x [1, *x]\n", "alias *x refers to the node it is in (a cycle)"),
        ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
         + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                   for p, c in zip("abcdefg", "bcdefgh", strict=True)),
         "holds more than 100,000 values (aliases expanded)"),
        ("seed: 1\nseed: 2\n", "key 'seed' appears twice"),
    ],
    ids=["deep", "alias-cycle", "alias-bomb", "duplicate-key"],
)  # fmt: skip
def test_nesting_aliases_and_repeated_keys_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, _, err = cli(capsys, "estimate", path)
    one_line_error(code, err, str(path), message)


def test_deep_json_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text('{"seed": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, _, err = cli(capsys, "estimate", path)
    one_line_error(code, err, f"{path}: nested deeper than 32 levels")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sampler: {type: tpe, options: {n_startup_trial: 5}}",
         "sampler.options.n_startup_trial: not an option of TPESampler "
         "(did you mean 'n_startup_trials'?)"),
        ("pruner: {type: median, options: {n_warmup_step: 2}}",
         "pruner.options.n_warmup_step: not an option of MedianPruner "
         "(did you mean 'n_warmup_steps'?)"),
        ("pruner: {type: median, options: {n_warmup_steps: two}}",
         "pruner.options.n_warmup_steps: expected int, got 'two'"),
        ("sampler: {type: nsga2, options: {population_size: 1}}",
         "sampler.options: NSGAIISampler refuses them: "),
        ("pruner: {type: percentile}", "pruner.options.percentile: required by PercentilePruner"),
        ("sampler: {type: tpe, options: {gamma: 0.5}}",
         "sampler.options.gamma: takes a Python object"),
        ("space: {actor.zero_stage: {choices: [0, 1]}}\n"
         "baselines: [{name: b, params: {actor.zero_stage: 3}}]",
         "baselines[0].params.actor.zero_stage: 3 is not among the choices of the knob"),
        ("space: {ppo.kl_coef: {low: .nan, high: 0.3}}",
         "space.ppo.kl_coef.low: expected a finite number, got nan"),
        ("space: {ppo.kl_coef: {low: 0.1, high: .inf}}",
         "space.ppo.kl_coef.high: expected a finite number, got inf"),
        ("space: {actor.zero_stage: {choices: [0, 1]},\n"
         "        actor.offload_optimizer: {choices: [none, cpu], when: {actor.zero_stage: [3]}}}",
         "space.actor.offload_optimizer.when.actor.zero_stage: 3 is not a value of that knob"),
        ("space: {critic.zero_stage: {same_as: actor.zero_stage},\n"
         "        actor.zero_stage: {choices: [0]}}",
         "space.critic.zero_stage: refers to actor.zero_stage, which is not an earlier knob"),
        ("sampler: {type: random, seed: -1}", "sampler.seed: must lie in [0, 2**32), got -1"),
        # A pruner on a metric no running trial reports would never stop one
        ("pruner: {type: median, metric: ppo/gold_gain}",
         "pruner.metric: 'ppo/gold_gain' is not reported while a trial runs (did you mean "
         "'ppo/gold_recent'?); a pruner reads one of perf/ppo_e2e_tokens_per_s, "
         "ppo/score_recent, ppo/gold_recent"),
        ("pruner: {type: dominance, metric: ppo/gold_recent}",
         "pruner.metric: dominance compares ppo/gold_recent with finished trials' objectives "
         "and it is not one of them, so it plays no part"),
        # What a trial reports while it runs is not in its final metrics
        ("constraints: [{metric: ppo/gold_recent, min: 0.5}]",
         "constraints[0].metric: unknown metric 'ppo/gold_recent' (did you mean "
         "'ppo/gold_gain'?)"),
        # Only the synthetic task has a gold reward
        ("base_overrides: {data.source: pairs.jsonl}\n"
         "pruner: {type: median, metric: ppo/gold_recent}",
         "pruner.metric: the base's data (pairs.jsonl) has no gold reward; only the synthetic "
         "task has one (use ppo/score_* for the reward model's score)"),
        ("constraints: [{metric: ppo/gold_gain, min: 0.1, stop_margin: 0.2}]",
         "constraints[0].stop_margin: a running trial does not report ppo/gold_gain; only "
         "ppo/kl_final, mem/peak_host_rss_bytes, mem/peak_device_allocated_bytes, "
         "mem/peak_device_reserved_bytes can stop one early"),
        ("constraints: [{metric: ppo/kl_final, min: 0.1, stop_margin: 0.2}]",
         "constraints[0].stop_margin: stops a trial above max, and this constraint has none"),
        ("constraints: [{metric: ppo/kl_final, max: 8, stop_margin: -0.2}]",
         "constraints[0].stop_margin: must be >= 0, got -0.2"),
    ],
    ids=["sampler-typo", "pruner-typo", "option-type", "option-value", "option-required",
         "option-object", "baseline-choice", "range-nan", "range-inf", "when-value",
         "same-as-later", "seed", "pruner-metric", "dominance-metric", "recent-as-constraint",
         "gold-without-synthetic", "stop-margin-metric", "stop-margin-min", "stop-margin-sign"],
)  # fmt: skip
def test_spec_mistakes_are_one_line_before_any_study_exists(tmp_path, capsys, body, message):
    path = spec(tmp_path, body)
    code, _, err = cli(capsys, "run", path)
    one_line_error(code, err, f"{path}: {message}")
    assert not (tmp_path / "runs").exists()  # no study folder, no storage


def test_a_pruner_against_the_objectives_direction_is_one_line(tmp_path, capsys):
    # Optuna's pruner reads intermediate values in the study's direction: throughput under a
    # minimised objective would stop the fastest trials.
    path = spec(tmp_path, "pruner: {type: hyperband}")
    path.write_text(path.read_text().replace(
        "{metric: perf/ppo_e2e_tokens_per_s, direction: maximize}",
        "{metric: time/ppo_step_s, direction: minimize}"))  # fmt: skip
    code, _, err = cli(capsys, "run", path)
    one_line_error(code, err, f"{path}: pruner.metric: perf/ppo_e2e_tokens_per_s is better "
                   "higher, but Optuna's pruner reads it in the objective's direction "
                   "(minimize) and would stop the best trials; use one of "
                   "ppo/kl_recent")  # fmt: skip


@pytest.mark.parametrize(("body", "where", "metric"), [
    ("constraints: [{metric: mem/peak_device_allocated_bytes, max: 4.0e+10}]",
     "constraints[0].metric", "mem/peak_device_allocated_bytes"),
    ("constraints: [{metric: mem/ppo_train/peak_device_reserved_bytes, max: 4.0e+10}]",
     "constraints[0].metric", "mem/ppo_train/peak_device_reserved_bytes"),
    ("constraints: [{metric: gpu/util_mean_pct, min: 50}]", "constraints[0].metric",
     "gpu/util_mean_pct"),
    ("constraints: [{metric: perf/ppo_e2e_mfu, min: 0.1}]", "constraints[0].metric",
     "perf/ppo_e2e_mfu"),
])  # fmt: skip
def test_a_gpu_only_metric_on_a_cpu_node_is_one_line(tmp_path, capsys, monkeypatch, body,
                                                    where, metric):  # fmt: skip
    """Each trial would run in full, then be recorded as an error for the missing metric."""
    import tunelab.devices
    import tunelab.study

    monkeypatch.setattr(tunelab.devices, "gpu_inventory", lambda: [])  # a CPU node, anywhere
    monkeypatch.setattr(tunelab.study, "cuda_device_files", lambda: False)
    path = spec(tmp_path, body)
    code, _, err = cli(capsys, "run", path)
    one_line_error(code, err, f"{path}: {where}: {metric} is measured on a GPU, and this "
                   "node has no GPU (NVML finds none, and there is no /dev/nvidia*)")  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_gpu_only_metrics_are_refused_only_where_trials_surely_run_on_the_cpu(
    tmp_path, monkeypatch
):
    import tunelab.study
    from tunelab.devices import Gpu
    from tunelab.spec import load_spec
    from tunelab.study import check_cpu_metrics

    monkeypatch.setattr(tunelab.study, "cuda_device_files", lambda: False)
    gpu = Gpu(0, "NVIDIA H200", 141 * 2**30, (9, 0), "GPU-x", "0000:01:00.0")
    device = "constraints: [{metric: mem/peak_device_allocated_bytes, max: 4.0e+10}]\n"
    check_cpu_metrics(load_spec(spec(tmp_path, device)), [gpu])  # NVML finds a GPU
    # device: cuda without NVML (a container without libnvidia-ml): CUDA decides, not NVML
    check_cpu_metrics(load_spec(spec(tmp_path, device + "base_overrides: {device: cuda}")), [])
    monkeypatch.setattr(tunelab.study, "cuda_device_files", lambda: True)
    check_cpu_metrics(load_spec(spec(tmp_path, device)), [])  # /dev/nvidia0 without NVML
    with pytest.raises(InputError, match="device: cpu"):
        check_cpu_metrics(load_spec(spec(tmp_path, device + "base_overrides: {device: cpu}")),
                          [gpu])  # fmt: skip
    mfu = "constraints: [{metric: perf/ppo_e2e_mfu, min: 0.1}]\n"
    check_cpu_metrics(load_spec(spec(tmp_path, mfu + "base_overrides: {device: cpu, "
                                               "peak_tflops: 2.0}")), [])  # fmt: skip


def test_several_mistakes_are_reported_at_once(tmp_path, capsys):
    path = spec(
        tmp_path,
        """
        space:
          actor.zero_stagee: {choices: [0, 1]}
          ppo.kl_coef: {low: .nan, high: 0.3}
        sampler: {type: tpe, options: {n_startup_trial: 5}}
        resources: {trial_timeout_s: -1}
        """,
    )
    code, _, err = cli(capsys, "run", path)
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == f"tunelab: error: {path}: 4 errors"
    assert sorted(lines[1:]) == sorted([
        f"  {path}: space.actor.zero_stagee: not a trial config key "
        "(did you mean 'actor.zero_stage'?)",
        f"  {path}: space.ppo.kl_coef.low: expected a finite number, got nan",
        f"  {path}: sampler.options.n_startup_trial: not an option of TPESampler "
        "(did you mean 'n_startup_trials'?)",
        f"  {path}: resources.trial_timeout_s: must be > 0, got -1.0",
    ])  # fmt: skip


@pytest.mark.parametrize("command", ["trial", "run"])
def test_a_model_neither_local_nor_in_the_hub_cache_is_one_line(tmp_path, capsys, command):
    """A mistyped checkpoint path looks like a hub name; a trial would fail after ~50 s."""
    if command == "trial":
        code, _, err = cli(capsys, "trial", TINY, "--out", tmp_path / "t",
                           "models.actor=output/step1_actr")  # fmt: skip
    else:
        critic = spec(tmp_path, "base_overrides: {models.critic: output/step2_critic}")
        code, _, err = cli(capsys, "run", critic)
    role, name = ("actor", "step1_actr") if command == "trial" else ("critic", "step2_critic")
    one_line_error(code, err, f"models.{role}: 'output/{name}' is not a local directory, nor a "
                   "model in the Hugging Face cache (", "huggingface-cli download")  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_a_hub_model_in_the_cache_passes_the_input_check(tmp_path, monkeypatch, tiny_config):
    from huggingface_hub import constants

    from tunelab.config import check_inputs
    from tunelab.launcher import TRIAL_ENV

    snapshot = tmp_path / "models--org--lm" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--org--lm" / "refs").mkdir()
    (tmp_path / "models--org--lm" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    check_inputs(tiny_config("models.actor=org/lm"))
    assert TRIAL_ENV["HF_HUB_OFFLINE"] == "1"  # and the trial loads it from there, offline
    with pytest.raises(InputError, match="'org/other' is not a local directory"):
        check_inputs(tiny_config("models.actor=org/other"))


def test_config_mistakes_are_reported_at_once(capsys):
    # Every section's own rules run; a section's cross-field rules need its fields valid.
    code, _, err = cli(capsys, "estimate", TINY, "actor.zero_stage=7", "ppo.gamma=2",
                       "batch.train_micro=0", "precision=fp8")  # fmt: skip
    assert code == 2
    assert err.splitlines() == [
        f"tunelab: error: {TINY}: 4 errors",
        f"  {TINY}: precision: expected one of 'fp32' | 'bf16' | 'fp16', got 'fp8'",
        f"  {TINY}: batch.train_micro: must be >= 1, got 0",
        f"  {TINY}: actor.zero_stage: must be 0-3, got 7",
        f"  {TINY}: ppo.gamma: must lie in [0, 1], got 2.0",
    ]


@pytest.mark.parametrize("value", ["inf", "nan", "-3", "0", "lots"])
def test_estimate_gpu_memory_must_be_a_finite_positive_number(capsys, value):
    code, _, err = cli(capsys, "estimate", TINY, "--gpu-mem", value)
    one_line_error(code, err, "argument --gpu-mem: expected ")


def test_estimate_of_a_config_whose_what_if_setting_is_refused(capsys):
    # The config is valid (ZeRO-0, no LoRA, hybrid engine); the ZeRO-2 + offload row of the
    # micro-batch table is what DeepSpeed-Chat refuses: that row says so, the rest prints.
    code, out, err = cli(capsys, "estimate", DSCHAT, "actor.lora_rank=0", "hybrid_engine=true")
    assert code == 0 and err == ""
    assert "ZeRO-2 + optimizer offload: not allowed with this config (hybrid_engine: with " in out
    assert "ZeRO-3 + optimizer and param offload" in out


@pytest.mark.parametrize("command", ["trial", "run", "reproduce"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, command):
    target = {"trial": TINY, "run": ROOT / "studies" / "smoke.yaml", "reproduce": None}[command]
    if command == "reproduce":
        target = ROOT / "exports" / "smoke-trial8"
    code, _, err = cli(capsys, command, target, "--out", "/dev/null/x")
    one_line_error(code, err, "--out /dev/null/x: cannot write there (Not a directory)")


@pytest.mark.parametrize("command", ["trial", "reproduce"])
def test_an_output_folder_of_an_earlier_run_is_refused_and_kept(tmp_path, capsys, command):
    target, mark = TINY, tmp_path / "out" / "trial.log"
    if command == "reproduce":
        target, mark = ROOT / "exports" / "smoke-trial8", tmp_path / "out" / "repeat0"
    mark.parent.mkdir()
    mark.write_text("an earlier run")
    code, _, err = cli(capsys, command, target, "--out", tmp_path / "out")
    one_line_error(code, err, f"--out {tmp_path / 'out'}: holds an earlier run ({mark})")
    assert mark.read_text() == "an earlier run"
    assert sorted(p.name for p in mark.parent.iterdir()) == [mark.name]


def test_reproduce_without_out_takes_a_new_folder_per_call(tmp_path):
    from tunelab.cli import REPRODUCE_MARKS, claim_unused

    default, mark = tmp_path / "reproduce-x", REPRODUCE_MARKS[0]
    assert claim_unused(default, mark) == default
    assert (default / mark).is_dir()  # claimed: the next call goes on
    assert claim_unused(default, mark) == tmp_path / "reproduce-x-2"
    (tmp_path / "reproduce-x-3").mkdir()  # made, never used: taken
    assert claim_unused(default, mark) == tmp_path / "reproduce-x-3"


def test_a_folder_claimed_between_check_and_use_goes_to_the_other_call(tmp_path, monkeypatch):
    """Another process claims the folder after this call found it unused (the review's race:
    both saw no earlier run, both wrote to one folder): without --out this call takes the next
    folder, with --out it is refused; one line, nothing of the other's touched."""
    from tunelab import cli

    checked = cli.writable_folder

    def claimed_meanwhile(folder, option="--out"):
        checked(folder, option)
        if folder.name in ("reproduce-x", "out"):
            (folder / "repeat0").mkdir(exist_ok=True)  # the other call, just now
        return folder

    monkeypatch.setattr(cli, "writable_folder", claimed_meanwhile)
    assert cli.claim_unused(tmp_path / "reproduce-x", "repeat0") == tmp_path / "reproduce-x-2"
    out = tmp_path / "out"
    refused = f"--out {out}: holds an earlier run ({out / 'repeat0'})"
    with pytest.raises(InputError, match=re.escape(refused)):
        cli.unused_folder(out, cli.REPRODUCE_MARKS, claim=True)
    assert [p.name for p in out.iterdir()] == ["repeat0"]
    monkeypatch.setattr(cli, "writable_folder", checked)
    assert cli.unused_folder(tmp_path / "free", cli.REPRODUCE_MARKS, claim=True).is_dir()
    assert (tmp_path / "free" / "repeat0").is_dir()


def test_running_out_of_memory_is_one_line(tmp_path):
    """Under an address-space limit just above what the command has loaded, reading a 64 MiB
    config raises MemoryError inside the command: one line, exit 2."""
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1\n# " + "x" * 64 * 2**20 + "\n")
    driver = textwrap.dedent(f"""
        import resource, sys
        import tunelab.cli, tunelab.config, tunelab.estimate
        import psutil
        limit = psutil.Process().memory_info().vms + 32 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.exit(tunelab.cli.main(["estimate", {str(big)!r}]))
    """)
    run = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr == (
        "tunelab: error: out of memory (MemoryError); free memory or raise the limit (ulimit -v)\n"
    )


def test_unknown_subcommand_and_bad_counts_are_one_line(capsys):
    for args in (["nonsense"], ["run", "x.yaml", "--workers", "0"], ["reproduce", "x", "--repeats",
                 "-1"], ["trial", TINY, "--out", "o", "--timeout", "inf"]):  # fmt: skip
        code, _, err = cli(capsys, *args)
        one_line_error(code, err)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:secret@127.0.0.1:1/db", "storage mysql://u:***@127.0.0.1:1/db: its database "
         "driver (MySQLdb) is not installed; tunelab uses PyMySQL: write mysql+pymysql://…"),
        ("foo://bar", "storage 'foo://bar': tunelab does not take the URL scheme 'foo'; give "
         "sqlite:///PATH, postgresql://…, mysql+pymysql://…, or a journal file (PATH.log"),
        ("sqlite://", "SQLite needs a file path after sqlite:///"),
        ("sqlite:///:memory:", "SQLite needs a file path after sqlite:/// (an in-memory"),
        ("sqlite:///", "SQLite needs a file path after sqlite:///"),
        ("study.db", "not a URL, nor a journal file (a SQLite file is sqlite:///study.db)"),
    ],
    ids=["mysql-without-driver", "unknown-scheme", "sqlite-in-memory", "sqlite-memory-path",
         "sqlite-empty-path", "bare-path"],
)  # fmt: skip
def test_a_storage_url_tunelab_cannot_open_says_what_to_write(capsys, url, message):
    code, _, err = cli(capsys, "report", "--storage", url, "--study", "s")
    one_line_error(code, err, message)
    assert "secret" not in err


def test_a_storage_of_several_studies_says_how_to_name_one(tmp_path, capsys):
    from .report_tests.studies import cpu_study

    url = f"sqlite:///{tmp_path / 'two.db'}"
    cpu_study("smoke", url), cpu_study("smoke2", url)
    capsys.readouterr()  # Optuna's "A new study created" lines
    code, _, err = cli(capsys, "report", "--storage", url)
    one_line_error(code, err, "holds 2 studies (smoke, smoke2); name one with --study NAME")


@pytest.mark.parametrize(
    ("command", "path", "message"),
    [
        ("trial", ROOT / "studies" / "smoke.yaml", "smoke.yaml: this is a study spec (it has "
         "name, base, base_overrides, objectives, ...); `tunelab trial` takes a trial config "
         "such as studies/trials/tiny.yaml"),
        ("estimate", ROOT / "studies" / "smoke.yaml", "`tunelab estimate` takes a trial config"),
        ("run", TINY, "tiny.yaml: this is a trial config (it has seed, device, precision, "
         "models, ...); `tunelab run` takes a study spec such as studies/smoke.yaml"),
    ],
)  # fmt: skip
def test_the_wrong_kind_of_file_is_named_in_one_line(tmp_path, capsys, command, path, message):
    extra = ["--out", tmp_path / "out"] if command != "estimate" else []
    code, _, err = cli(capsys, command, path, *extra)
    one_line_error(code, err, message)
    assert not (tmp_path / "out").exists()


def test_a_config_with_a_stray_spec_key_still_lists_its_mistakes(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("seed: 1\nobjectives: []\n")  # a config after all: the loader says why
    code, _, err = cli(capsys, "estimate", path)
    one_line_error(code, err, f"{path}: objectives: unknown key")
