"""Study specs: a base trial config, a search space, objectives, constraints, sampler, budget.

YAML files under studies/, validated with one-line errors naming the key. A point of the space
(Optuna params by dotted knob name) becomes a TrialConfig through `trial_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

from tunelab._typed import (
    convert,
    field_annotation,
    from_mapping,
    read_mapping,
    to_mapping,
    with_dotted,
)
from tunelab.config import TrialConfig, config_from_dict
from tunelab.errors import InputError
from tunelab.metrics import check_metric_name

SamplerType = Literal["tpe", "nsga2", "random", "grid", "qmc", "gp"]
PrunerType = Literal[
    "none", "median", "percentile", "hyperband", "successive_halving", "dominance"
]
LauncherType = Literal["torchrun", "deepspeed"]


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
        kinds = [self.choices is not None, self.low is not None or self.high is not None,
                 self.same_as is not None]  # fmt: skip
        if sum(kinds) != 1:
            raise ValueError("give exactly one of choices, low/high, same_as")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must not be empty")
        if kinds[1]:
            if self.low is None or self.high is None or self.low > self.high:
                raise ValueError("a range needs low <= high")
            if self.log and (self.low <= 0 or self.step is not None):
                raise ValueError("log ranges need low > 0 and no step")

    @property
    def is_int(self) -> bool:
        bounds = (self.low, self.high, self.step if self.step is not None else 1)
        return all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when.items())


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: Literal["maximize", "minimize"]


@dataclass(frozen=True)
class Constraint:
    """A soft constraint on a trial metric: feasible when min <= value <= max."""

    metric: str
    max: float | None = None
    min: float | None = None

    def __post_init__(self) -> None:
        if self.max is None and self.min is None:
            raise ValueError("a constraint needs max or min")

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


@dataclass(frozen=True)
class PrunerSpec:
    """Stopping slow trials early from their PPO throughput after warm-up.

    Optuna's pruners (median, percentile, hyperband, successive_halving) serve single-objective
    studies; `dominance` (the default for several objectives) stops a trial only when a finished
    trial beats it beyond `margin` on every objective that can be judged early.
    """

    type: PrunerType = "none"
    metric: str = "perf/ppo_e2e_tokens_per_s"  # the intermediate value the trial reports
    margin: float = 0.2  # dominance: relative slack against measurement noise
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    trials: int
    minutes: float | None = None

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError("trials must be >= 1")


@dataclass(frozen=True)
class Baseline:
    """A trial enqueued before any sampled one (e.g. DeepSpeed-Chat's published settings)."""

    name: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Resources:
    launcher: LauncherType = "torchrun"
    trial_timeout_s: float = 1800.0
    gpus_per_trial: int | None = None  # None: the base config's ranks on a GPU node, 0 on CPU


@dataclass(frozen=True)
class MemoryBudget:
    """Trials predicted above these are pruned without launching."""

    device_gib: float | None = None
    host_gib: float | None = None


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

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"name {self.name!r}: letters, digits, '_', '.', '-' only")
        if not self.objectives:
            raise ValueError("objectives: give at least one")

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


def _check_knob_values(name: str, knob: Knob, where: str) -> None:
    """The knob names a config key, and its values have that key's type."""
    try:
        annotation = field_annotation(TrialConfig, name)
    except KeyError:
        close = difflib.get_close_matches(name, _config_keys(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InputError(f"{where} space.{name}: not a trial config key{hint}") from None
    if knob.choices is not None:
        for index, choice in enumerate(knob.choices):
            if not isinstance(choice, bool | int | float | str):
                raise InputError(
                    f"{where} space.{name}.choices[{index}]: choices must be scalars "
                    f"(write lists as 'a,b'), got {choice!r}"
                )
            convert(annotation, choice, f"{where} space.{name}.choices[{index}]")
    for bound in ("low", "high"):
        if getattr(knob, bound) is not None:
            convert(annotation, getattr(knob, bound), f"{where} space.{name}.{bound}")


def _config_keys(prefix: str = "", cls: type = TrialConfig) -> list[str]:
    keys = []
    for name, annotation in get_type_hints(cls).items():
        if dataclasses.is_dataclass(annotation):
            keys += _config_keys(f"{prefix}{name}.", annotation)
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _check_space(spec: StudySpec, base: dict[str, Any], where: str) -> None:
    names = list(spec.space)
    for position, (name, knob) in enumerate(spec.space.items()):
        _check_knob_values(name, knob, where)
        for key in [*knob.when, *([knob.same_as] if knob.same_as else [])]:
            if key in spec.space and names.index(key) > position:
                raise InputError(f"{where} space.{name}: refers to {key}, which comes later")
        for key in knob.when:
            if key not in spec.space and _lookup(base, key) is _MISSING:
                raise InputError(f"{where} space.{name}.when: unknown key {key!r}")
        if knob.same_as and knob.same_as not in spec.space:
            raise InputError(f"{where} space.{name}.same_as: {knob.same_as!r} is not a knob")
    for index, baseline in enumerate(spec.baselines):
        for key in baseline.params:
            if key not in spec.space:
                raise InputError(
                    f"{where} baselines[{index}].params.{key}: not a knob of the space "
                    f"(fixed values belong in base_overrides)"
                )
    for section, items in (("objectives", spec.objectives), ("constraints", spec.constraints)):
        for index, item in enumerate(items):
            try:
                check_metric_name(item.metric)
            except InputError as exc:
                raise InputError(f"{where} {section}[{index}].metric: {exc}") from None
    if spec.pruner.type != "none":
        try:
            check_metric_name(spec.pruner.metric)
        except InputError as exc:
            raise InputError(f"{where} pruner.metric: {exc}") from None
    if spec.pruner.type not in ("none", "dominance") and len(spec.objectives) > 1:
        raise InputError(
            f"{where} pruner.type: Optuna's {spec.pruner.type} pruner serves one objective; "
            "use 'dominance' (or 'none') with several"
        )
    if spec.sampler.type == "grid":
        for name, knob in spec.space.items():
            if knob.choices is None and knob.same_as is None and knob.step is None:
                raise InputError(f"{where} space.{name}: the grid sampler needs choices or a step")


_MISSING = object()


def _lookup(mapping: dict[str, Any], dotted: str):
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a study spec; the base trial config is checked too."""
    path = Path(path)
    where = f"{path}:"
    spec = from_mapping(StudySpec, read_mapping(path), where)
    base_path = (path.parent / spec.base).resolve()
    base = read_mapping(base_path)
    try:
        base = with_dotted(base, spec.base_overrides)
    except InputError as exc:
        raise InputError(f"{where} base_overrides.{exc}") from None
    # The base must be a valid trial on its own (every knob inactive).
    full = config_from_dict(base, f"{where} base ({spec.base}):").to_dict()
    _check_space(spec, full, where)
    return LoadedSpec(spec, base, str(path))


def spec_from_storage(mapping: dict[str, Any], base: dict[str, Any], name: str) -> LoadedSpec:
    """The spec a study was created with (for `tunelab worker`, which has no spec file)."""
    where = f"study {name}:"
    return LoadedSpec(from_mapping(StudySpec, mapping, where), base, where)


def trial_overrides(loaded: LoadedSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Dotted overrides of one point: sampled params plus `same_as` copies."""
    result = dict(params)
    for name, knob in loaded.spec.space.items():
        if knob.same_as and knob.same_as in result:
            result[name] = result[knob.same_as]
    return result


def trial_config(loaded: LoadedSpec, params: dict[str, Any]) -> TrialConfig:
    """The TrialConfig of one point of the space; InputError for an invalid combination."""
    overrides = trial_overrides(loaded, params)
    return config_from_dict(with_dotted(loaded.base_config, overrides), "trial:")


def base_value(loaded: LoadedSpec, key: str) -> Any:
    """A key's value in the base config (TrialConfig defaults filled in)."""
    full = config_from_dict(loaded.base_config).to_dict()
    value = _lookup(full, key)
    return None if value is _MISSING else value
