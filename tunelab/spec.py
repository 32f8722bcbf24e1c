"""Study specs: a base trial config, a search space, objectives, constraints, sampler, budget.

YAML files under studies/, validated in one pass that reports every error at once, each on
one line naming the key: types and ranges (each dataclass's `checks()`), the base trial config,
knob names and values against the trial config, `when`/`same_as` against the space, baselines
against the knobs' choices and ranges, and sampler/pruner options against the Optuna class's
constructor. A point of the space (Optuna params by dotted knob name) becomes a TrialConfig
through `trial_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_type_hints

from tunelab._typed import (
    INVALID,
    Problem,
    Problems,
    at_least,
    construct,
    convert,
    convert_fields,
    enforce,
    field_annotation,
    from_mapping,
    positive,
    read_mapping,
    to_mapping,
    with_dotted,
)
from tunelab.config import SEED_LIMIT, TrialConfig, config_from_dict
from tunelab.errors import InputError
from tunelab.metrics import PROGRESS_METRICS, RUNNING, check_metric_name, metric_stage
from tunelab.records import STAGES

SamplerType = Literal["tpe", "nsga2", "random", "grid", "qmc", "gp"]
PrunerType = Literal[
    "none", "median", "percentile", "hyperband", "successive_halving", "dominance"
]
LauncherType = Literal["torchrun", "deepspeed"]
StageName = Literal["sft", "rm", "ppo"]

# Optuna classes behind the spec's names (optuna.samplers.*, optuna.pruners.*).
SAMPLER_CLASSES = {"tpe": "TPESampler", "nsga2": "NSGAIISampler", "random": "RandomSampler",
                   "grid": "GridSampler", "qmc": "QMCSampler", "gp": "GPSampler"}  # fmt: skip
PRUNER_CLASSES = {"median": "MedianPruner", "percentile": "PercentilePruner",
                  "hyperband": "HyperbandPruner",
                  "successive_halving": "SuccessiveHalvingPruner"}  # fmt: skip


@dataclass(frozen=True)
class Knob:
    """One searched key: `choices`, or a numeric range `low`..`high` (int when both bounds and
    the step are ints) with optional `step` and `log`; or `same_as` another knob. `when` makes
    it conditional: active only when each named key (a knob or a base-config key) has one of the
    listed values; inactive knobs keep the base config's value."""

    choices: tuple[Any, ...] | None = None
    low: int | float | None = None
    high: int | float | None = None
    step: int | float | None = None
    log: bool = False
    same_as: str | None = None
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        kinds = [self.choices is not None, self.low is not None or self.high is not None,
                 self.same_as is not None]  # fmt: skip
        if sum(kinds) != 1:
            yield "", "give exactly one of choices, low/high, same_as"
            return
        if self.choices is not None:
            if not self.choices:
                yield "choices", "must not be empty"
            for index, choice in enumerate(self.choices):
                if not isinstance(choice, bool | int | float | str):
                    yield (
                        f"choices[{index}]",
                        f"choices must be scalars (write lists as 'a,b'), got {choice!r}",
                    )
                elif self.choices.index(choice) < index:
                    yield f"choices[{index}]", f"repeats {choice!r}"
        if self.same_as is not None and self.when:
            yield "when", "a same_as knob copies its source, active or not; put when there"
        if not kinds[1]:
            for name in ("step", "log"):
                if getattr(self, name) not in (None, False):
                    yield name, "applies to low/high ranges only"
            return
        if self.low is None or self.high is None or self.low > self.high:
            yield "", "a range needs low <= high"
        if self.step is not None and not self.step > 0:
            yield "step", f"must be > 0, got {self.step}"
        if self.log and ((self.low is not None and self.low <= 0) or self.step is not None):
            yield "log", "log ranges need low > 0 and no step"

    @property
    def is_int(self) -> bool:
        bounds = (self.low, self.high, self.step if self.step is not None else 1)
        return all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when.items())

    def allows(self, value: Any) -> bool:
        """Whether `value` is one this knob can take (a choice, or a point of its range)."""
        if self.choices is not None:
            return value in self.choices
        if self.low is None or isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.is_int and not isinstance(value, int):
            return False
        if not self.low <= value <= self.high:
            return False
        return self.step is None or abs((value - self.low) / self.step % 1) < 1e-9


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Constraint:
    """A soft constraint on a trial metric: feasible when min <= value <= max.

    `stop_margin`: stop (prune) a running trial once the running value of the metric
    (metrics.RUNNING) is above max by more than this fraction of it; None: never."""

    metric: str
    max: float | None = None
    min: float | None = None
    stop_margin: float | None = None

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        if self.max is None and self.min is None:
            yield "", "a constraint needs max or min"
        elif self.max is not None and self.min is not None and self.min > self.max:
            yield "min", f"{self.min:g} is above max {self.max:g}: no trial could be feasible"
        if self.stop_margin is not None:
            yield from at_least(0, self, "stop_margin")
            if self.metric not in RUNNING:
                yield "stop_margin", (f"a running trial does not report {self.metric}; only "
                                      f"{', '.join(RUNNING)} can stop one early")  # fmt: skip
            elif self.max is None:
                yield "stop_margin", "stops a trial above max, and this constraint has none"

    def stop_line(self) -> float | None:
        """The running value above which a trial stops (None: never)."""
        if self.stop_margin is None or self.max is None:
            return None
        return self.max + abs(self.max) * self.stop_margin

    @property
    def name(self) -> str:
        bound = f"le_{self.max:g}" if self.max is not None else f"ge_{self.min:g}"
        return f"{self.metric}:{bound}"

    def violation(self, value: float) -> float:
        """Optuna's convention: <= 0 is feasible."""
        over = value - self.max if self.max is not None else float("-inf")
        under = self.min - value if self.min is not None else float("-inf")
        return max(over, under)


@dataclass(frozen=True)
class SamplerSpec:
    type: SamplerType = "tpe"
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the sampler

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            yield "seed", f"must lie in [0, 2**32), got {self.seed}"


@dataclass(frozen=True)
class PrunerSpec:
    """Stopping trials early from what they report after each PPO step (PPO steps are the
    fidelity): throughput after warm-up, or the recent reward-model score or gold reward
    (metrics.PROGRESS_METRICS).

    Optuna's pruners (median, percentile, hyperband, successive_halving) serve single-objective
    studies; `dominance` (for several objectives) stops a trial only when a finished
    trial beats it beyond `margin` on every objective that can be judged early.
    """

    type: PrunerType = "none"
    metric: str = "perf/ppo_e2e_tokens_per_s"  # the intermediate value the trial reports
    margin: float = 0.2  # dominance: relative slack against measurement noise
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from at_least(0, self, "margin")
        if self.options and self.type not in PRUNER_CLASSES:
            yield "options", f"the {self.type} pruner takes no options"


@dataclass(frozen=True)
class Budget:
    trials: int
    minutes: float | None = None

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from at_least(1, self, "trials")
        if self.minutes is not None:
            yield from positive(self, "minutes")


@dataclass(frozen=True)
class Confirm:
    """Confirmation runs once the trial budget is used (tunelab.repeats): the `top_k` best
    configurations per objective (by their single run) and the baseline run again, each
    repeat with its own seed, until each has `repeats` runs; reports and export then use their
    means and 95% intervals. They do not count against `budget.trials`. top_k 0: off."""

    top_k: int = 0
    repeats: int = 3  # runs per confirmed configuration, the first included

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from at_least(0, self, "top_k")
        yield from at_least(2, self, "repeats")


@dataclass(frozen=True)
class Baseline:
    """A trial enqueued before any sampled one (e.g. DeepSpeed-Chat's published settings).
    `params` are knob values, among their choices or in their range; `overrides` fix config
    keys for this trial only, knobs included (then not sampled), with any valid value (e.g. a
    precision the space leaves out, to show what the device refuses)."""

    name: str
    params: dict[str, Any]
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resources:
    launcher: LauncherType = "torchrun"
    trial_timeout_s: float = 1800.0
    gpus_per_trial: int | None = None  # None: the base config's ranks on a GPU node, 0 on CPU
    # One-rank trials fork from a process that has imported torch & co. (tunelab.zygote).
    preload: bool = True

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from positive(self, "trial_timeout_s")
        if self.gpus_per_trial is not None:
            yield from at_least(0, self, "gpus_per_trial")


@dataclass(frozen=True)
class MemoryBudget:
    """Trials predicted above these are pruned without launching."""

    device_gib: float | None = None
    host_gib: float | None = None

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        yield from positive(self, *(name for name in ("device_gib", "host_gib")
                                    if getattr(self, name) is not None))  # fmt: skip


@dataclass(frozen=True)
class StudySpec:
    name: str
    base: str  # trial config file, relative to the spec file
    objectives: tuple[Objective, ...]
    budget: Budget
    base_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys
    space: dict[str, Knob] = field(default_factory=dict)
    constraints: tuple[Constraint, ...] = ()
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    pruner: PrunerSpec = field(default_factory=PrunerSpec)
    baselines: tuple[Baseline, ...] = ()
    resources: Resources = field(default_factory=Resources)
    memory_budget: MemoryBudget = field(default_factory=MemoryBudget)
    # The stages whose figures the study compares; SFT and RM left out are trained once per
    # distinct setting and reused from the study's stage cache (tunelab.stagecache).
    measure: tuple[StageName, ...] = STAGES
    confirm: Confirm = field(default_factory=Confirm)

    def __post_init__(self) -> None:
        enforce(self)

    def checks(self) -> Iterator[Problem]:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            yield "name", f"{self.name!r}: letters, digits, '_', '.', '-' only"
        if not self.objectives:
            yield "objectives", "give at least one"
        metrics = [o.metric for o in self.objectives]
        for index, metric in enumerate(metrics):
            if metrics.index(metric) < index:
                yield f"objectives[{index}].metric", f"{metric} is already an objective"
        if "ppo" not in self.measure:
            yield "measure", f"{list(self.measure)}: must include ppo (every trial runs PPO)"
        for index, metric in enumerate(metrics):
            stage = metric_stage(metric)
            if stage is not None and stage not in self.measure:
                yield (f"objectives[{index}].metric", f"{metric} belongs to {stage}, which "
                       f"the study does not measure (measure: {list(self.measure)})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return to_mapping(self)

    def search_hash(self) -> str:
        """Identity of what is searched (budget, resources and baselines may change on resume)."""
        keys = ("base", "base_overrides", "space", "objectives", "constraints")
        blob = json.dumps({k: self.to_dict()[k] for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadedSpec:
    """A validated spec with its base trial config resolved."""

    spec: StudySpec
    base_config: dict[str, Any]  # the base trial config mapping, overrides applied
    source: str  # where it came from, for messages


_MISSING = object()


def _lookup(mapping: dict[str, Any], dotted: str):
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _config_keys(prefix: str = "", cls: type = TrialConfig) -> list[str]:
    keys = []
    for name, annotation in get_type_hints(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys += _config_keys(f"{prefix}{name}.", annotation)
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _config_annotation(key: str, where: str, problems: Problems) -> Any:
    """The trial config annotation of a dotted key; INVALID (reported) when there is none."""
    try:
        annotation = field_annotation(TrialConfig, key)
    except KeyError:
        close = difflib.get_close_matches(key, _config_keys(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.add(where, f"not a trial config key{hint}")
        return INVALID
    if dataclasses.is_dataclass(annotation):
        problems.add(where, f"{key} is a section; name one of its keys")
        return INVALID
    return annotation


def is_active(knob: Knob, values: Mapping[str, Any], base: Mapping[str, Any]) -> bool:
    """Whether a conditional knob is active, given the knobs chosen so far and the full base
    config (its keys and TrialConfig defaults)."""
    context = {}
    for key in knob.when:
        value = values[key] if key in values else _lookup(dict(base), key)
        context[key] = None if value is _MISSING else value
    return knob.active(context)


def _valid_knobs(data: Mapping) -> tuple[dict[str, Knob], list[str]]:
    """The knobs of a spec's raw `space` that are valid on their own (the others are reported
    by the type pass), and every declared knob name in order."""
    raw = data.get("space")
    if not isinstance(raw, Mapping):
        return {}, []
    space = {}
    for name, knob in raw.items():
        if isinstance(name, str) and isinstance(knob, Mapping):
            valid = from_mapping(Knob, knob, "", Problems())
            if valid is not INVALID:
                space[name] = valid
    return space, [str(name) for name in raw]


def _check_knobs(
    space: dict[str, Knob], names: list[str], base: dict | None, where: str, problems: Problems
) -> None:
    """Knob names, values, `when` and `same_as` against the trial config and the space
    (`space`: the valid knobs, `names`: every declared one, in order)."""
    for name, knob in space.items():
        position = names.index(name)
        at = f"{where} space.{name}"
        annotation = _config_annotation(name, at, problems)
        if annotation is not INVALID:
            for index, choice in enumerate(knob.choices or ()):
                convert(annotation, choice, f"{at}.choices[{index}]", problems)
            for bound in ("low", "high"):
                if getattr(knob, bound) is not None:
                    convert(annotation, getattr(knob, bound), f"{at}.{bound}", problems)
            if annotation is int and knob.step is not None and not isinstance(knob.step, int):
                problems.add(f"{at}.step", f"an int key needs an int step, got {knob.step!r}")
        for key in [*knob.when, *([knob.same_as] if knob.same_as else [])]:
            if key in names and names.index(key) >= position:
                problems.add(at, f"refers to {key}, which is not an earlier knob")
        for key, allowed in knob.when.items():
            if key in space:
                for value in allowed:
                    if not space[key].allows(value) and space[key].same_as is None:
                        problems.add(f"{at}.when.{key}", f"{value!r} is not a value of that knob")
            elif key not in names and base is not None and _lookup(base, key) is _MISSING:
                problems.add(f"{at}.when", f"unknown key {key!r}")
        if knob.same_as and knob.same_as not in names:
            problems.add(f"{at}.same_as", f"{knob.same_as!r} is not a knob")
        elif knob.same_as in space and annotation is not INVALID:
            source = space[knob.same_as]
            for value in [*(source.choices or ()), source.low, source.high]:
                if value is not None:
                    convert(annotation, value, f"{at}.same_as ({knob.same_as}={value!r})",
                            problems)  # fmt: skip


def _check_baselines(
    baselines: tuple[Baseline, ...], space: dict[str, Knob], names: list[str],
    bases: tuple[dict | None, dict | None], where: str, problems: Problems,
) -> None:  # fmt: skip
    """Baselines name knobs (values among their choices or in range) and other config keys
    (`overrides`); with every active knob given, the baseline must be a valid trial config
    (`bases`: the base mapping and the full base config; None when the base is invalid)."""
    base, full = bases
    if len(space) < len(names):
        full = None  # an invalid knob: which knobs are active cannot be told
    for index, baseline in enumerate(baselines):
        at = f"{where} baselines[{index}]"
        before = len(problems.lines)
        values, missing = {}, []
        for key in baseline.params:
            if key not in names:
                problems.add(
                    f"{at}.params.{key}",
                    "not a knob of the space "
                    "(fixed values belong in base_overrides or the baseline's overrides)",
                )
            elif key in baseline.overrides:
                problems.add(f"{at}.params.{key}", "also given under overrides")
            elif key in space and space[key].same_as:
                source = space[key].same_as
                problems.add(f"{at}.params.{key}", f"follows {source} (same_as); give that knob")
        for name, knob in space.items():
            if knob.same_as:
                continue
            if name in baseline.overrides:
                values[name] = baseline.overrides[name]
                continue
            active = full is None or is_active(knob, values, full)
            if name not in baseline.params:
                if active:
                    missing.append(name)
                continue
            value = baseline.params[name]
            if not active:
                problems.add(f"{at}.params.{name}", "inactive for this baseline (see its when)")
            elif not knob.allows(value):
                kind = "among the choices" if knob.choices is not None else "in the range"
                problems.add(f"{at}.params.{name}", f"{value!r} is not {kind} of the knob")
            else:
                values[name] = value
        for key, value in baseline.overrides.items():
            place = f"{at}.overrides.{key}"
            if key in space and space[key].same_as:
                problems.add(place, f"follows {space[key].same_as} (same_as); give that knob")
            elif (annotation := _config_annotation(key, place, problems)) is not INVALID:
                convert(annotation, value, place, problems)
        if base is None or full is None or missing or len(problems.lines) > before:
            continue  # sampled knobs complete it at run time
        overrides = {**_same_as_copies(space, values), **baseline.overrides}
        config_from_dict(with_dotted(base, overrides), f"{at} ({baseline.name}):", problems)


def _optuna_class(kind: str, classes: dict[str, str], module: str):
    import optuna

    return getattr(getattr(optuna, module), classes[kind])


_SPEC_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _spec_type(annotation: Any) -> Any:
    """The type a spec can give for a constructor parameter annotated `annotation` (Optuna's
    annotations are strings or classes), or None when it takes a Python object."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = [part.strip() for part in text.split("|")]
    if not all(part in _SPEC_TYPES for part in parts):
        return None
    types_ = tuple(_SPEC_TYPES[part] for part in parts)
    return types_[0] if len(types_) == 1 else Union[types_]  # noqa: UP007


def _check_options(cls, options: dict, given: tuple[str, ...], at: str, problems: Problems):
    """Options against `cls`'s constructor: names (with "did you mean"), types a spec can give,
    required parameters; then `cls` itself is built to run its own checks."""
    parameters = inspect.signature(cls).parameters
    before = len(problems.lines)
    for name, value in options.items():
        place = f"{at}.options.{name}"
        if name in given:
            problems.add(place, f"set by the spec itself (give {at}.{name})")
        elif name not in parameters:
            close = difflib.get_close_matches(name, [p for p in parameters if p not in given], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.add(place, f"not an option of {cls.__name__}{hint}")
        elif (spec_type := _spec_type(parameters[name].annotation)) is None:
            problems.add(place, f"takes a Python object ({parameters[name].annotation}), "
                         "which a spec cannot give")  # fmt: skip
        else:
            convert(spec_type, value, place, problems)
    for name, parameter in parameters.items():
        required = parameter.default is inspect.Parameter.empty and name not in given
        if required and parameter.kind is parameter.POSITIONAL_OR_KEYWORD and name not in options:
            problems.add(f"{at}.options.{name}", f"required by {cls.__name__}")
    if len(problems.lines) > before or cls.__name__ in ("GridSampler", "GPSampler"):
        return  # the grid needs the space; GP imports torch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(**options)
    except (TypeError, ValueError) as exc:
        problems.add(f"{at}.options", f"{cls.__name__} refuses them: {exc}")


def _check_search(parts: dict, space: dict[str, Knob], full: dict | None, where: str,
                  problems: Problems) -> None:  # fmt: skip
    """Metrics, sampler and pruner against the objectives, Optuna's classes, the space and the
    base config (`full`, None when invalid)."""
    objectives = parts.get("objectives", ())
    no_gold = _without_gold_reward(full, space)
    for section in ("objectives", "constraints"):
        for index, item in enumerate(parts.get(section, ())):
            try:
                check_metric_name(item.metric)
            except InputError as exc:
                problems.add(f"{where} {section}[{index}].metric", str(exc))
            if no_gold and item.metric.startswith("ppo/gold_"):
                problems.add(f"{where} {section}[{index}].metric", no_gold)
    sampler, pruner = parts.get("sampler", SamplerSpec()), parts.get("pruner", PrunerSpec())
    cls = _optuna_class(sampler.type, SAMPLER_CLASSES, "samplers")
    given = ("seed", "search_space") if sampler.type == "grid" else ("seed",)
    _check_options(cls, sampler.options, given, f"{where} sampler", problems)
    if pruner.type != "none":
        problem = _pruner_metric_problem(pruner, objectives)
        if not problem and no_gold and pruner.metric.startswith("ppo/gold_"):
            problem = no_gold
        if problem:
            problems.add(f"{where} pruner.metric", problem)
    if pruner.type in PRUNER_CLASSES:
        cls = _optuna_class(pruner.type, PRUNER_CLASSES, "pruners")
        _check_options(cls, pruner.options, (), f"{where} pruner", problems)
        if len(objectives) > 1:
            problems.add(f"{where} pruner.type", f"Optuna's {pruner.type} pruner serves one "
                         "objective; use 'dominance' (or 'none') with several")  # fmt: skip
    if sampler.type == "grid":
        for name, knob in space.items():
            if knob.choices is None and knob.same_as is None and knob.step is None:
                problems.add(f"{where} space.{name}", "the grid sampler needs choices or a step")


def _without_gold_reward(full: dict | None, space: dict[str, Knob]) -> str | None:
    """Why no trial of the study has a gold reward (its data is not the synthetic task), or
    None when some may."""
    if full is None or "data.source" in space or full["data"]["source"] == "synthetic":
        return None
    return (f"the base's data ({full['data']['source']}) has no gold reward; only the synthetic "
            "task has one (use ppo/score_* for the reward model's score)")


def _pruner_metric_problem(pruner: PrunerSpec, objectives: Sequence[Objective]) -> str | None:
    """Why a pruner's metric could play no part in stopping a trial, or would stop the best."""
    reported = PROGRESS_METRICS.get(pruner.metric)
    if reported is None:
        close = difflib.get_close_matches(pruner.metric, PROGRESS_METRICS, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (f"{pruner.metric!r} is not reported while a trial runs{hint}; a pruner reads "
                f"one of {', '.join(PROGRESS_METRICS)}")  # fmt: skip
    metrics = {o.metric for o in objectives}
    if pruner.type == "dominance" and objectives and pruner.metric not in metrics:
        return (f"dominance compares {pruner.metric} with finished trials' objectives and it is "
                "not one of them, so it plays no part")  # fmt: skip
    if pruner.type in PRUNER_CLASSES and len(objectives) == 1:
        direction = objectives[0].direction
        if direction != reported:
            fitting = [name for name, way in PROGRESS_METRICS.items() if way == direction]
            instead = (f"use one of {', '.join(fitting)}" if fitting else "no metric a "
                       "running trial reports fits it: use 'pruner: {type: none}'")  # fmt: skip
            return (f"{pruner.metric} is better {'higher' if reported == 'maximize' else 'lower'}"
                    f", but Optuna's pruner reads it in the objective's direction ({direction}) "
                    f"and would stop the best trials; {instead}")  # fmt: skip
    return None


def _load_base(path: Path, parts: dict, where: str, problems: Problems):
    """(base mapping with base_overrides, full base config dict); (None, None) when invalid."""
    if "base" not in parts:
        return None, None
    try:
        base = read_mapping((path.parent / parts["base"]).resolve())
        base = with_dotted(base, parts.get("base_overrides", {}))
    except InputError as exc:
        problems.add(f"{where} base", str(exc))
        return None, None
    # The base must be a valid trial on its own (every knob inactive).
    config = config_from_dict(base, f"{where} base ({parts['base']}):", problems)
    return base, None if config is INVALID else config.to_dict()


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a study spec and its base trial config; every error at once."""
    path = Path(path)
    where = f"{path}:"
    problems = Problems()
    data = read_mapping(path)
    parts = convert_fields(StudySpec, data, where, problems)
    spec = construct(StudySpec, parts, where, problems) if not problems else INVALID
    base, full = _load_base(path, parts, where, problems)
    space, names = _valid_knobs(data)
    _check_knobs(space, names, full, where, problems)
    _check_search(parts, space, full, where, problems)
    _check_baselines(parts.get("baselines", ()), space, names, (base, full), where, problems)
    problems.raise_if_any(str(path))
    return LoadedSpec(spec, base, str(path))


def spec_from_storage(mapping: dict[str, Any], base: dict[str, Any], name: str) -> LoadedSpec:
    """The spec a study was created with (for `tunelab worker`, which has no spec file)."""
    where = f"study {name}:"
    return LoadedSpec(from_mapping(StudySpec, mapping, where), base, where)


def _same_as_copies(space: dict[str, Knob], params: dict[str, Any]) -> dict[str, Any]:
    result = dict(params)
    for name, knob in space.items():
        if knob.same_as and knob.same_as in result:
            result[name] = result[knob.same_as]
    return result


def trial_overrides(loaded: LoadedSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides of one point: sampled params plus `same_as` copies."""
    return _same_as_copies(loaded.spec.space, params)


def trial_config(
    loaded: LoadedSpec, params: dict[str, Any], fixed: Mapping[str, Any] | None = None
) -> TrialConfig:
    """The TrialConfig of one point of the space (and a baseline's `fixed` overrides);
    InputError for an invalid combination."""
    overrides = {**trial_overrides(loaded, params), **(fixed or {})}
    return config_from_dict(with_dotted(loaded.base_config, overrides), "trial:")


def full_base(loaded: LoadedSpec) -> dict[str, Any]:
    """The base config with TrialConfig defaults filled in, as a nested mapping."""
    return config_from_dict(loaded.base_config).to_dict()


def base_value(loaded: LoadedSpec, key: str) -> Any:
    """A key's value in the base config (TrialConfig defaults filled in)."""
    value = _lookup(full_base(loaded), key)
    return None if value is _MISSING else value
