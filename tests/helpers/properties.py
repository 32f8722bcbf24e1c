"""Generated inputs and the properties they must keep, shared by tests/test_properties.py (a
few hundred examples in CI) and benchmarks/fuzz.py (over ten thousand).

Inputs are what a hostile new user writes: the shipped trial config and smoke spec with keys
set to odd values (huge, negative, NaN, wrong types, typos, nested junk), keys deleted or
added, the text edited, re-encoded (Latin-1) or replaced by bytes; data files with odd rows;
command lines built from those. The property: each gives a valid object (or exit code) or
tunelab's own InputError (exit code 2 with a `tunelab: error:` line), never another exception.
Command lines never launch anything: the launch points raise `Launched` instead.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import os
import string
from pathlib import Path
from typing import Any
from unittest import mock

import optuna
import pandas as pd
import yaml
from hypothesis import strategies as st

from tunelab.cli import main
from tunelab.config import TrialConfig, check_inputs, config_from_dict, load_config
from tunelab.data import load_preference_file
from tunelab.errors import InputError
from tunelab.metrics import COMMON, PROGRESS_METRICS, RUNNING
from tunelab.records import TrialAttr
from tunelab.spec import PRUNER_CLASSES, SAMPLER_CLASSES, load_spec, trial_config
from tunelab.study import build_pruner, build_sampler, suggest_params

ROOT = Path(__file__).resolve().parents[2]
TINY_TEXT = (ROOT / "studies" / "trials" / "tiny.yaml").read_text()
SMOKE_TEXT = (ROOT / "studies" / "smoke.yaml").read_text()
TINY = yaml.safe_load(TINY_TEXT)
SMOKE = yaml.safe_load(SMOKE_TEXT)
EXPORT = ROOT / "exports" / "smoke-trial8"

optuna.logging.set_verbosity(optuna.logging.ERROR)


def _config_keys(mapping: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        keys += _config_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else []
        keys.append(f"{prefix}{key}")
    return keys


CONFIG_KEYS = _config_keys(TrialConfig().to_dict())
OPTUNA_OPTIONS = sorted({
    name
    for module, classes in ((optuna.samplers, SAMPLER_CLASSES), (optuna.pruners, PRUNER_CLASSES))
    for cls in classes.values()
    for name in inspect.signature(getattr(module, cls)).parameters
})  # fmt: skip
SPEC_KEYS = ["name", "base", "objectives", "budget", "base_overrides", "space", "constraints",
             "sampler", "pruner", "baselines", "resources", "memory_budget", "choices", "low",
             "high", "step", "log", "same_as", "when", "metric", "direction", "max", "min",
             "type", "seed", "options", "margin", "trials", "minutes", "params", "overrides",
             "launcher", "trial_timeout_s", "gpus_per_trial", "device_gib",
             "host_gib", "stop_margin", "measure", "confirm", "top_k",
             "repeats"]  # fmt: skip
WORDS = sorted({*CONFIG_KEYS, *(k.rsplit(".", 1)[-1] for k in CONFIG_KEYS), *SPEC_KEYS,
                *OPTUNA_OPTIONS, *COMMON, *PROGRESS_METRICS, *RUNNING.values(), "tpe", "nsga2",
                "random", "grid", "qmc", "median", "percentile", "hyperband",
                "successive_halving", "dominance", "none", "cpu",
                "cuda", "auto", "fp16", "bf16", "fp32", "tiny", "tiny-llama", "opt-350m",
                "synthetic", "maximize", "minimize", "torchrun", "deepspeed", "all-linear",
                "q_proj,v_proj", "1e-5", "nan", "inf", "", " ", "trials/tiny.yaml",
                "ppo.kl_coeff", "actor.zero_stagee", "n_startup_trial"})  # fmt: skip

_INTS = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**32, 2**63, -(2**63), 10**30]),
                  st.integers())  # fmt: skip
_LEAVES = st.one_of(
    st.none(), st.booleans(), _INTS, st.floats(), st.sampled_from(WORDS),
    st.text(string.printable, max_size=12), st.text(max_size=6),
)  # fmt: skip
# Values a key may well take, so that many mutated inputs stay valid and reach what follows.
_PLAUSIBLE = st.sampled_from(
    [
        0,
        1,
        2,
        3,
        4,
        8,
        16,
        0.05,
        0.1,
        0.5,
        1.0,
        True,
        False,
        "cpu",
        "none",
        "bf16",
        "fp32",
        "fp16",
        "tiny",
        "random",
        "tpe",
        "grid",
        "median",
        "dominance",
        "maximize",
        "minimize",
        "ppo/gold_gain",
        "perf/ppo_e2e_tokens_per_s",
        "actor.zero_stage",
        "precision",
    ]
)
VALUES = st.one_of(
    _PLAUSIBLE,
    st.lists(_PLAUSIBLE, min_size=1, max_size=3),
    st.recursive(
        _LEAVES,
        lambda children: st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(WORDS) | st.text(max_size=6), children, max_size=3),
        max_leaves=6,
    ),
)  # fmt: skip


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a nested mapping/list (dict keys and list indices)."""
    places = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            places += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            places += _paths(value, (*prefix, index))
    return places


def _set(data: dict, path: tuple, value: Any, delete: bool = False) -> None:
    """Set (or delete) `path` in `data`, making mappings on the way; silently stops where the
    path runs into a scalar or past a list's end."""
    node: Any = data
    for part in path[:-1]:
        if isinstance(node, dict):
            if not isinstance(node.get(part), dict | list):
                node[part] = {}
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        if delete:
            node.pop(last)
        else:
            node[last] = value


# Places worth reaching in a spec beyond those the smoke spec already has.
_SPEC_PLACES = [
    ("space", "{config}", "{spec}"), ("space", "{knob}", "when", "{config}"),
    ("space", "{knob}", "same_as"), ("sampler", "options", "{option}"),
    ("pruner", "options", "{option}"), ("baselines", 0, "params", "{knob}"),
    ("baselines", 0, "overrides", "{config}"), ("base_overrides", "{config}"),
    ("constraints", 0, "{spec}"), ("objectives", 0, "metric"), ("sampler", "type"),
    ("pruner", "type"), ("memory_budget", "device_gib"), ("resources", "trial_timeout_s"),
    ("constraints", 0, "stop_margin"), ("pruner", "metric"), ("measure",), ("confirm", "{spec}"),
]  # fmt: skip


@st.composite
def mutated(draw, base: dict, kind: str) -> dict:
    """`base` with a few keys set to generated values, deleted, or added."""
    data = copy.deepcopy(base)
    knobs = list(SMOKE["space"])
    for _ in range(draw(st.integers(0, 3))):
        if kind == "spec" and draw(st.booleans()):
            template = draw(st.sampled_from(_SPEC_PLACES))
            fill = {"{config}": st.sampled_from(CONFIG_KEYS), "{knob}": st.sampled_from(knobs),
                    "{spec}": st.sampled_from(SPEC_KEYS),
                    "{option}": st.sampled_from(OPTUNA_OPTIONS)}  # fmt: skip
            path = tuple(draw(fill[p]) if p in fill else p for p in template)
        elif kind == "config" and draw(st.booleans()):
            path = tuple(draw(st.sampled_from(CONFIG_KEYS)).split("."))
        else:
            places = _paths(data)
            path = draw(st.sampled_from(places)) if places else ("seed",)
            if draw(st.integers(0, 4)) == 0:  # a new key under an existing place
                path = (*path, draw(st.sampled_from(WORDS) | st.text(max_size=5)))
        _set(data, path, draw(VALUES), delete=draw(st.integers(0, 5)) == 0)
    return data


@st.composite
def documents(draw, base: dict, kind: str) -> tuple[bytes, str]:
    """(file content, suffix): a mutated mapping as YAML or JSON, its text edited or re-encoded,
    or bytes."""
    data = draw(mutated(base, kind))
    suffix = draw(st.sampled_from([".yaml", ".yaml", ".json", ".yml"]))
    form = draw(st.sampled_from(["plain", "plain", "plain", "edited", "latin-1", "bytes"]))
    if form == "bytes":
        return draw(st.binary(max_size=200)), suffix
    text = (
        json.dumps(data)
        if suffix == ".json"
        else yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    )
    if form == "edited":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(text)))
            cut = draw(st.integers(0, 8))
            text = text[:at] + draw(st.text(max_size=8)) + text[at + cut:]  # fmt: skip
    if form == "latin-1":
        accents = draw(st.text("éèàüß°", min_size=1, max_size=3))
        return (text + accents).encode("latin-1", errors="replace"), suffix
    return text.encode("utf-8", errors="surrogatepass"), suffix


OVERRIDES = st.lists(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(CONFIG_KEYS) | st.text(max_size=8),
              st.sampled_from(["0", "-1", "3", "nan", "inf", "1e999", "[1, 2]", "{a: 1}",
                               "null", "true", "cpu", "fp16", "'x'", "[[[[[[", "2**70",
                               "99999999999999999999999"]) | st.text(max_size=10))
    | st.text(max_size=10),
    max_size=3,
)  # fmt: skip


def _row() -> st.SearchStrategy:
    words = st.text(string.ascii_letters + " ", min_size=1, max_size=8)
    good = st.fixed_dictionaries({"prompt": words, "chosen": words, "rejected": words})
    odd = st.fixed_dictionaries({"prompt": st.text(max_size=8) | VALUES, "chosen": words},
                                optional={"rejected": VALUES})  # fmt: skip
    return st.one_of(good, good, good, odd, VALUES)


@st.composite
def data_files(draw) -> tuple[bytes, str]:
    """A JSONL or Parquet preference file (or bytes under either name)."""
    suffix = draw(st.sampled_from([".jsonl", ".jsonl", ".parquet", ".parquet", ".json"]))
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=300)), suffix
    rows = draw(st.lists(_row(), min_size=draw(st.sampled_from([0, 2])), max_size=6))
    if suffix == ".parquet":
        fields = ["prompt", "chosen", "rejected"]
        columns = fields if draw(st.booleans()) else draw(
            st.lists(st.sampled_from([*fields, "x"]), unique=True, max_size=4))  # fmt: skip
        words = st.text(string.ascii_letters + " ", min_size=1, max_size=6)
        cells = words if draw(st.booleans()) else words | st.none() | st.integers(-5, 5)
        frame = pd.DataFrame({c: draw(st.lists(cells, min_size=len(rows), max_size=len(rows)))
                              for c in columns})  # fmt: skip
        buffer = io.BytesIO()
        try:
            frame.to_parquet(buffer)
        except Exception:  # mixed column types pyarrow cannot write: the file is bytes then
            return draw(st.binary(max_size=300)), suffix
        return buffer.getvalue(), suffix
    lines = [json.dumps(row) if draw(st.integers(0, 12)) else draw(st.text(max_size=10))
             for row in rows]  # fmt: skip
    text = "\n".join(lines)
    if draw(st.integers(0, 5)) == 0:
        return text.encode("latin-1", errors="replace") + b"\xe9\n", suffix
    return text.encode("utf-8", errors="surrogatepass"), suffix


# -- the properties -------------------------------------------------------------------------


def check_config(folder: Path, document: tuple[bytes, str], overrides: list[str]) -> str:
    """A trial config file with overrides is a TrialConfig that round-trips, or InputError."""
    content, suffix = document
    path = folder / f"trial{suffix}"
    path.write_bytes(content)
    try:
        config = load_config(path, overrides)
        check_inputs(config)
    except InputError:
        return "InputError"
    assert config_from_dict(config.to_dict()) == config
    return "valid"


def check_spec(folder: Path, spec: tuple[bytes, str], base: tuple[bytes, str] | None) -> str:
    """A study spec (and its base config) loads or is InputError; one that loads runs: Optuna
    builds its sampler and pruner, enqueues its baselines, and every point sampled from its
    space (baselines first) is a TrialConfig or an `invalid` trial's InputError."""
    content, suffix = spec
    path = folder / f"spec{suffix}"
    path.write_bytes(content)
    (folder / "trials").mkdir(exist_ok=True)
    (folder / "trials" / "tiny.yaml").write_bytes(base[0] if base else TINY_TEXT.encode())
    try:
        loaded = load_spec(path)
    except InputError:
        return "InputError"
    spec_ = loaded.spec
    study = optuna.create_study(directions=[o.direction for o in spec_.objectives],
                                sampler=build_sampler(spec_, spec_.sampler.seed),
                                pruner=build_pruner(spec_))  # fmt: skip
    for baseline in spec_.baselines:
        study.enqueue_trial(baseline.params, user_attrs={TrialAttr.FIXED: baseline.overrides})
    for _ in range(len(spec_.baselines) + 2):
        trial = study.ask()
        fixed = trial.user_attrs.get(TrialAttr.FIXED)
        params = suggest_params(trial, loaded, fixed)
        with contextlib.suppress(InputError):
            trial_config(loaded, params, fixed)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return "valid"


def check_data(folder: Path, document: tuple[bytes, str]) -> str:
    content, suffix = document
    path = folder / f"pairs{suffix}"
    path.write_bytes(content)
    try:
        examples = load_preference_file(path)
    except InputError:
        return "InputError"
    assert len(examples) >= 2 and all(e.prompt.strip() for e in examples)
    return "valid"


class Launched(Exception):
    """Raised where the command would start a trial or a study's trials."""


def _launched(*args, **kwargs):
    raise Launched


@contextlib.contextmanager
def no_launch():
    """The CLI as is, except that it never starts a trial, a study loop or a compiler, and
    read-only commands stop before drawing (their inputs are what is under test)."""
    patches = [
        mock.patch("tunelab.launcher.launch_trial", _launched),
        mock.patch("tunelab.study.Orchestrator.run", _launched),
        mock.patch("tunelab.ops.build_ops", lambda *a, **k: True),
        mock.patch("tunelab.cli._stop_on_sigterm", lambda: None),
        mock.patch("tunelab.report.write_report", _launched),
        mock.patch("tunelab.report.write_comparison", _launched),
        mock.patch("tunelab.export.write_export", _launched),
    ]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def check_cli(folder: Path, argv: list[str]) -> str:
    """`tunelab.cli.main(argv)` returns an exit code (2 with one `tunelab: error:` line, or a
    first line counting the errors), shows help, or reaches a launch point; nothing else."""
    out, err = io.StringIO(), io.StringIO()
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        with no_launch(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    except Launched:
        return "launched"
    except SystemExit as exc:  # --help
        assert exc.code == 0 and "usage:" in out.getvalue()
        return "help"
    finally:
        os.chdir(cwd)
    message = err.getvalue()
    assert "Traceback" not in message
    if code == 2:  # the error ends stderr: one line, or "N errors" and N indented lines
        lines = message.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("tunelab: error: ")]
        assert len(starts) == 1, message
        block = lines[starts[0] :]
        if len(block) > 1:
            assert block[0].endswith(f": {len(block) - 1} errors"), message
            assert all(line.startswith("  ") for line in block[1:]), message
        return "InputError"
    assert code == 0, (code, message)
    return "ok"


@st.composite
def command_lines(draw, folder: Path, study_dir: Path) -> list[str]:
    """argv for every subcommand, its files written into `folder`."""
    command = draw(st.sampled_from(["trial", "estimate", "run", "worker", "report", "export",
                                    "compare", "reproduce", "junk"]))  # fmt: skip
    junk = st.lists(st.sampled_from(["--out", "--help", "--bogus", "-x", "k=v", "--storage",
                                     "--ranks", "nan", "inf", "0", "-1", "", "=", "a=b=c"])
                    | st.text(max_size=6), max_size=2)  # fmt: skip
    number = st.sampled_from(["1", "2", "0", "-1", "nan", "inf", "1e999", "two", "80", "0.5"])
    out = ["--out", str(folder / "out")] if draw(st.integers(0, 5)) else []
    if command in ("trial", "estimate"):
        content, suffix = draw(documents(TINY, "config"))
        (folder / f"config{suffix}").write_bytes(content)
        argv = [command, f"config{suffix}", *draw(OVERRIDES)]
        if command == "trial":
            argv += out or ["--out", "o"]
            argv += ["--timeout", draw(number)] if draw(st.booleans()) else []
        else:
            argv += ["--gpu-mem", draw(number)] if draw(st.booleans()) else []
            argv += ["--ranks", draw(number)] if draw(st.booleans()) else []
    elif command == "run":
        content, suffix = draw(documents(SMOKE, "spec"))
        (folder / "trials").mkdir(exist_ok=True)
        (folder / "trials" / "tiny.yaml").write_text(TINY_TEXT)
        (folder / f"spec{suffix}").write_bytes(content)
        argv = ["run", f"spec{suffix}", *out]
        argv += ["--workers", draw(number)] if draw(st.booleans()) else []
        argv += ["--storage", draw(st.sampled_from(["x.log", "sqlite:///s/x.db", "nope",
                                                    "oracle://h/db"]))] if draw(st.booleans()) \
            else []  # fmt: skip
    elif command == "worker":
        argv = ["worker", "--storage", draw(st.sampled_from([f"sqlite:///{study_dir}/study.db",
                                                            "sqlite:///absent.db", "x.log"])),
                "--study", draw(st.sampled_from(["smoke", "other", ""])), *out]  # fmt: skip
    elif command in ("report", "export", "compare"):
        target = draw(st.sampled_from([str(study_dir), "absent", ".", "--storage=x.log"]))
        argv = [command, target, *([target] if command == "compare" else []), *out]
        if command == "export":
            argv += draw(st.sampled_from([[], ["--trial", "1"], ["--trial", "99"],
                                          ["--objective", "ppo/gold_gain"],
                                          ["--objective", "nope"]]))  # fmt: skip
    elif command == "reproduce":
        export = folder / "export"
        if not export.exists():
            export.mkdir()
            for file in EXPORT.iterdir():
                (export / file.name).write_bytes(file.read_bytes())
        if draw(st.booleans()):
            content, _ = draw(documents(TINY, "config"))
            (export / "trial.yaml").write_bytes(content)
        argv = ["reproduce", "export", "--repeats", draw(number), *out]
    else:
        argv = draw(junk)
    return argv + draw(junk) if draw(st.integers(0, 4)) == 0 else argv
