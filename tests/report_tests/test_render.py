"""Numbers in words, headline sentences, and the Markdown / HTML renderers."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from tests.report_tests.studies import cpu_study
from tunelab.records import TrialRecord, from_frozen_trial
from tunelab.repeats import Verdict
from tunelab.report import data
from tunelab.report.build import gain_text, headline_sentence
from tunelab.report.render import (
    HALF_WIDTH,
    Image,
    Section,
    Table,
    display,
    format_metric,
    markdown_table,
    to_html,
    to_markdown,
)
from tunelab.spec import Objective

MIB, GIB = 1024**2, 1024**3


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("perf/ppo_e2e_tokens_per_s", 5213.4, "5213 tokens/s"),
        ("perf/sft_samples_per_s", np.float64(31.5), "31.5 samples/s"),
        ("perf/ppo_train_tflops_per_rank", 0.0119573, "0.01196 TFLOP/s per rank"),
        ("time/ppo_train_s", 0.62063, "0.6206 s"),
        ("mem/peak_host_rss_bytes", 560_779_264, "535 MiB"),
        ("mem/actor/measured_model_states_bytes", 2_390_024, "2.28 MiB"),
        ("mem/peak_device_allocated_bytes", 80 * GIB, "80.00 GiB"),
        ("rm/eval_accuracy", 0.921875, "0.9219"),
        ("number", np.int64(12), "12"),
        ("trials", (3, 8), "3, 8"),
        ("reason", "oom", "oom"),
        ("ratio", math.nan, ""),
        ("baseline", None, ""),
        ("trial", pd.NA, ""),
        ("feasible", True, "True"),
    ],
)
def test_format_metric_by_name(name, value, text):
    assert format_metric(name, value) == text


def test_display_formats_every_cell_by_its_column():
    frame = pd.DataFrame({"number": [1, 2], "time/sft_s": [0.5, math.nan]})
    assert display(frame).to_dict("list") == {"number": ["1", "2"], "time/sft_s": ["0.5 s", ""]}


def test_a_half_width_column_is_in_its_metrics_unit():
    frame = pd.DataFrame({"mem/peak_host_rss_bytes": [512 * MIB],
                          "mem/peak_host_rss_bytes" + HALF_WIDTH: [844432.0]})  # fmt: skip
    assert display(frame).iloc[0].tolist() == ["512 MiB", "0.805 MiB"]


def headline_rows():
    study = cpu_study()
    records = [from_frozen_trial(t) for t in study.trials]
    objectives = data.objectives_from(study.user_attrs, ["maximize", "minimize"])
    return [row for _, row in data.headline(records, objectives).iterrows()]


def test_headline_sentences_in_plain_words_and_numbers():
    throughput, memory = headline_rows()
    assert headline_sentence(throughput) == (
        "Best perf/ppo_e2e_tokens_per_s: 5213 tokens/s (trial #4: actor.zero_stage=2, "
        "actor.offload_optimizer=none, actor.lora_rank=8, batch.train_micro=8), "
        "1.84x the baseline 'dschat-single-gpu' (2831 tokens/s); single runs, noise not "
        "measured."
    )
    assert headline_sentence(memory) == (
        "Best mem/peak_host_rss_bytes: 480 MiB (trial #5: actor.zero_stage=3, "
        "actor.offload_optimizer=cpu, actor.lora_rank=8, batch.train_micro=8), "
        "20% less than the baseline 'dschat-single-gpu' (600 MiB); single runs, noise not "
        "measured."
    )


def headline_row(direction: str, value: float, baseline_value: float) -> pd.Series:
    """A headline row as `data.headline` makes it, for the cases the studies do not have."""
    objective = Objective("time/trial_s", direction)
    records = [
        TrialRecord(0, "COMPLETE", "ok", "", {"x": 0}, (baseline_value,), baseline="b"),
        TrialRecord(1, "COMPLETE", "ok", "", {"x": 1}, (value,)),
    ]
    return data.headline(records, [objective]).iloc[0]


@pytest.mark.parametrize(
    ("direction", "value", "baseline_value", "text"),
    [
        ("maximize", 30.0, 10.0, "3.00x the baseline"),
        ("minimize", 6.2, 10.0, "38% less than the baseline"),
        ("minimize", 10.0, 10.0, "the same as the baseline"),
        ("maximize", 0.3, -0.1, "+0.4 vs the baseline"),
    ],
)
def test_gain_text(direction, value, baseline_value, text):
    assert gain_text(headline_row(direction, value, baseline_value)) == text


def repeated_row(best: list[float], baseline: list[float]) -> pd.Series:
    """A headline row of a baseline and one configuration, each run len(...) times."""
    objective = Objective("ppo/gold_gain", "maximize")
    records = [TrialRecord(0, "COMPLETE", "ok", "", {"x": 0}, (baseline[0],), baseline="b"),
               TrialRecord(1, "COMPLETE", "ok", "", {"x": 1}, (best[0],))]  # fmt: skip
    for original, values in ((0, baseline), (1, best)):
        records += [TrialRecord(len(records), "COMPLETE", "ok", "", {"x": original}, (value,),
                                repeat_of=original) for value in values[1:]]  # fmt: skip
    return data.headline(records, [objective]).iloc[0]


def test_a_gain_inside_the_baselines_interval_is_within_noise_never_a_multiple():
    # The case: gold gain 0.176-0.282 over repeats of one configuration.
    row = repeated_row(best=[0.35, 0.21, 0.28], baseline=[0.19, 0.28, 0.24])
    assert row["verdict"] == Verdict.WITHIN and row["runs"] == row["baseline_runs"] == 3
    assert gain_text(row) == "within noise of the baseline"
    sentence = headline_sentence(row)
    assert "x the baseline" not in sentence
    assert sentence == (
        "Best ppo/gold_gain: 0.28 ± 0.1739 (mean of 3 runs, 95% interval) (trial #1: x=1), "
        "within noise of the baseline 'b' (0.2367 ± 0.112 (mean of 3 runs, 95% interval))."
    )


def test_a_gain_outside_both_intervals_is_a_multiple_outside_noise():
    row = repeated_row(best=[0.50, 0.52, 0.51], baseline=[0.19, 0.20, 0.21])
    assert row["verdict"] == Verdict.OUTSIDE
    assert headline_sentence(row).endswith(
        "2.55x the baseline 'b' (0.2 ± 0.02484 (mean of 3 runs, 95% interval)); outside noise."
    )


def test_headline_sentence_without_baseline_or_best_or_when_the_baseline_is_best():
    objective = Objective("time/trial_s", "minimize")
    records = [TrialRecord(0, "COMPLETE", "ok", "", {"x": 0}, (9.5,))]
    row = data.headline(records, [objective]).iloc[0]
    assert headline_sentence(row) == (
        "Best time/trial_s: 9.5 s (trial #0: x=0); this study has no baseline trial."
    )
    baseline = [TrialRecord(0, "COMPLETE", "ok", "", {"x": 0}, (9.5,), baseline="b")]
    row = data.headline(baseline, [objective]).iloc[0]
    assert (
        headline_sentence(row)
        == "Best time/trial_s: 9.5 s (trial #0: x=0): the baseline 'b' itself."
    )
    failed = [TrialRecord(0, "FAIL", "oom", "", {"x": 0}, None, baseline="b")]
    row = data.headline(failed, [objective]).iloc[0]
    assert headline_sentence(row) == "No complete, feasible trial for time/trial_s yet."
    failed.append(TrialRecord(1, "COMPLETE", "ok", "", {"x": 1}, (8.0,)))
    row = data.headline(failed, [objective]).iloc[0]
    assert headline_sentence(row) == (
        "Best time/trial_s: 8 s (trial #1: x=1); the baseline 'b' (trial #0) has no value "
        "(status oom)."
    )


def test_markdown_table_escapes_pipes_and_newlines():
    frame = pd.DataFrame({"a|b": ["x|y"], "c": ["two\nlines"]})
    assert markdown_table(frame) == "| a\\|b | c |\n|---|---|\n| x\\|y | two lines |"


SECTIONS = [
    Section("Plain", ["<b>not bold</b>"]),
    Section(
        "Figure",
        [],
        Image("fig.png", b"\x89PNG fake"),
        [Table("Cap:", pd.DataFrame({"k": ["v"]}))],
    ),
]


def test_markdown_references_the_png_file():
    text = to_markdown("Title", SECTIONS)
    assert text.startswith("# Title\n\n## Plain\n\n<b>not bold</b>\n\n## Figure\n\n")
    assert "![Figure](fig.png)\n\nCap:\n\n| k |\n|---|\n| v |\n" in text


def test_html_embeds_images_and_escapes_text():
    page = to_html("Title <1>", SECTIONS)
    assert "<title>Title &lt;1&gt;</title>" in page
    assert "&lt;b&gt;not bold&lt;/b&gt;" in page
    assert 'src="data:image/png;base64,iVBORyBmYWtl"' in page
    # Nothing outside the page: every link is a data URI.
    assert re.findall(r'(?:src|href)="([a-z]+):', page) == ["data", "data"]
