"""Studies: Optuna explores the space, each trial runs isolated, only this process writes.

`tunelab run SPEC` creates or resumes a study; `tunelab worker` joins one from another node.
Each worker thread asks Optuna for a point (under a lock that keeps the budget exact across
processes), has tunelab.prelaunch turn it into a TrialConfig and skip what cannot run here or
is predicted over the memory budget, launches the trial as a subprocess group, lets
tunelab.pruning judge its intermediate values (spec.pruner.metric), and tells Optuna the
outcome with everything measured as user attributes (tunelab.records says how).

Faults: every process joining a study gets its own sampler seed (derived from the spec's seed
and the order in which processes joined), so workers do not repeat each other's start-up
points. A finished trial's outcome is written beside it (DIR/outcome.json) before it is
recorded; storage calls are retried (tunelab.storage.with_retries) and a storage that stays
down ends the study with one line, the outcome being recorded by the next run. A trial whose
orchestrator died (or whose heartbeat stopped) is failed as `interrupted` with its reason and
its parameters enqueued again, at most MAX_RETRY times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import psutil
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tunelab import launcher, ops, stagecache
from tunelab._files import write_atomic, write_once
from tunelab.config import SEED_LIMIT
from tunelab.devices import Gpu, cuda_device_files, gpu_inventory, gpu_slots
from tunelab.errors import InputError, StorageFault
from tunelab.metrics import GPU_ONLY, NEEDS_PEAK
from tunelab.prelaunch import Verdict, check_trial
from tunelab.pruning import TrialPruning
from tunelab.records import (
    OBJECTIVES_ATTR,
    SPEC_ATTR,
    Status,
    TrialAttr,
    from_frozen_trial,
    metric_attrs,
    prediction_metrics,
    trial_metrics,
)
from tunelab.repeats import ranked_configurations, repeat_seed, repeats_needed
from tunelab.spec import (
    PRUNER_CLASSES,
    SAMPLER_CLASSES,
    LoadedSpec,
    StudySpec,
    base_value,
    full_base,
    is_active,
    spec_from_storage,
)
from tunelab.stagecache import (
    STAGE_CACHE,
    claim_age_s,
    is_complete,
    refresh_claim,
    release_claim,
    reuse_metrics,
    try_claim,
)
from tunelab.storage import (
    GRACE_S,
    MAX_RETRY,
    STORAGE_ERRORS,
    budget_lock,
    display_url,
    first_line,
    open_storage,
    set_trial_user_attrs,
    storage_lock,
    with_retries,
)
from tunelab.zygote import ZygotePool

BASE_ATTR = "tunelab:base"
HASH_ATTR = "tunelab:search_hash"
PROCESSES_ATTR = "tunelab:processes"  # how many orchestrator processes have joined the study
PGID_ATTR = "pgid"
OUTCOME_FILE = "outcome.json"  # beside each launched trial: what was (or will be) recorded
OWNER_FILE = ".tunelab-study"  # in a study folder: whose numbered trial folders it holds
_SERIES_POINTS = 200  # per-step series kept in storage are thinned to this many points
# A stage-cache claim not refreshed for this long (heartbeats refresh it every 10 s) is stale.
CLAIM_STALE_S = GRACE_S

optuna.logging.set_verbosity(optuna.logging.WARNING)
# tunelab records heartbeats itself around ask/tell (Study.optimize is not used).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
# A constraint written again by a retried storage call is the same value.
warnings.filterwarnings("ignore", message="The constraint value is ignored")


# -- sampler, pruner, study -------------------------------------------------------------------


def process_seed(seed: int | None, index: int) -> int | None:
    """The sampler seed of the `index`-th process to join a study: the spec's seed for the
    first (a one-process study is reproducible), a distinct seed derived from it for the rest
    (identical seeds would make workers suggest identical start-up points)."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.sha256(f"tunelab:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler without its Study.stop() once every point has been run: stop()
    works only inside Study.optimize, and tunelab asks and tells itself (it raised
    "Study.stop is supposed to be invoked inside an objective function" at a grid study's last
    trial). The orchestrator stops asking when the grid is exhausted instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def build_sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    options, kind = dict(spec.sampler.options), spec.sampler.type
    if kind != "grid":
        cls = getattr(optuna.samplers, SAMPLER_CLASSES[kind])  # gp imports torch (Optuna's GP)
        return cls(seed=seed, **options)
    cls = GridSampler
    space = {}
    for name, knob in spec.space.items():
        if knob.choices is not None:
            space[name] = list(knob.choices)
        elif knob.step is not None:
            count = round((knob.high - knob.low) / knob.step) + 1
            space[name] = [knob.low + i * knob.step for i in range(count)]
    return cls(space, seed=seed)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner.type in PRUNER_CLASSES:
        return getattr(optuna.pruners, PRUNER_CLASSES[spec.pruner.type])(**spec.pruner.options)
    return optuna.pruners.NopPruner()  # none, or dominance (applied by the orchestrator)


def create_or_resume(loaded: LoadedSpec, url: str) -> optuna.Study:
    """The study named in the spec: created (baselines enqueued) or resumed, under a lock so
    processes starting at once agree. Resuming with a different search space is refused before
    anything is written; budget, resources and baselines may change."""
    spec = loaded.spec
    try:
        pruner = build_pruner(spec)
        build_sampler(spec, spec.sampler.seed)  # options checked before anything is created
    except (TypeError, ValueError) as exc:
        raise InputError(f"{loaded.source} sampler/pruner options: {exc}") from None
    storage = open_storage(url)
    shown = display_url(url)
    try:
        with storage_lock(url, f"tunelab:create:{spec.name}"):
            index = _join_study(loaded, storage, shown)
        sampler = build_sampler(spec, process_seed(spec.sampler.seed, index))
        return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                 pruner=pruner)  # fmt: skip
    except STORAGE_ERRORS as exc:
        raise InputError(f"storage {shown}: {first_line(exc, url)}") from None


def _join_study(loaded: LoadedSpec, storage, shown: str) -> int:
    """Create or check the study, record its spec; returns this process's join index."""
    spec = loaded.spec
    directions = [o.direction for o in spec.objectives]
    try:
        study = optuna.create_study(study_name=spec.name, storage=storage, directions=directions)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        created = False
    if not created:
        stored = study.user_attrs.get(HASH_ATTR)
        if stored is None and study.get_trials(deepcopy=False):
            raise InputError(f"study {spec.name!r} in {shown} was not created by tunelab")
        if stored is not None and stored != spec.search_hash():
            raise InputError(
                f"{loaded.source}: study {spec.name!r} in {shown} was created from a different "
                "search space, base config or objectives; give the study a new name"
            )
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    study.set_user_attr(BASE_ATTR, loaded.base_config)
    study.set_user_attr(HASH_ATTR, spec.search_hash())
    study.set_user_attr(OBJECTIVES_ATTR, [vars(o) for o in spec.objectives])
    study.set_metric_names([o.metric for o in spec.objectives])  # optuna-dashboard's labels
    if created:
        for baseline in spec.baselines:
            attrs = {TrialAttr.BASELINE: baseline.name}
            if baseline.overrides:
                attrs[TrialAttr.FIXED] = baseline.overrides
            study.enqueue_trial(baseline.params, user_attrs=attrs)
    index = study.user_attrs.get(PROCESSES_ATTR, 0)
    study.set_user_attr(PROCESSES_ATTR, index + 1)
    return index


def load_for_worker(url: str, name: str) -> LoadedSpec:
    """The spec of a study created by `tunelab run` elsewhere, as its attributes keep it (join
    it with create_or_resume)."""
    storage = open_storage(url, create=False)
    shown = display_url(url)
    try:
        attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    except KeyError:
        raise InputError(f"storage {shown}: no study named {name!r}") from None
    except STORAGE_ERRORS as exc:
        raise InputError(f"storage {shown}: {first_line(exc, url)}") from None
    if SPEC_ATTR not in attrs:
        raise InputError(f"study {name!r} in {shown} was not created by tunelab")
    return spec_from_storage(attrs[SPEC_ATTR], attrs[BASE_ATTR], name)


# -- search space -----------------------------------------------------------------------------


def suggest_params(
    trial: optuna.Trial, loaded: LoadedSpec, fixed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sample the active knobs in spec order; `when` reads earlier knobs, a baseline's `fixed`
    overrides (never sampled) or the base config."""
    base, fixed = full_base(loaded), fixed or {}
    values: dict[str, Any] = {}
    for name, knob in loaded.spec.space.items():
        if knob.same_as or name in fixed or not is_active(knob, {**fixed, **values}, base):
            continue  # same_as: copied from its source by trial_overrides
        if knob.choices is not None:
            values[name] = trial.suggest_categorical(name, list(knob.choices))
        elif knob.is_int:
            values[name] = trial.suggest_int(
                name, int(knob.low), int(knob.high), step=int(knob.step or 1), log=knob.log
            )
        else:
            values[name] = trial.suggest_float(name, knob.low, knob.high, step=knob.step,
                                               log=knob.log)  # fmt: skip
    return values


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial uses the budget: running, or finished by tunelab (an interrupted or
    heartbeat-failed trial does not; its parameters are enqueued again; nor does a
    confirmation run, which comes after the budget)."""
    if trial.user_attrs.get(TrialAttr.REPEAT_OF) is not None:
        return False
    if trial.state == TrialState.RUNNING:
        return True
    status = trial.user_attrs.get(TrialAttr.STATUS)
    return trial.state.is_finished() and status not in (None, Status.INTERRUPTED)


def enqueue_repeats(study: optuna.Study, spec: StudySpec) -> bool:
    """Enqueue the confirmation runs the study still needs (spec.confirm, tunelab.repeats):
    the original's params and fixed overrides, a seed of its own per repeat, `repeat_of` its
    number. Only once every budget trial has finished, so the candidates are final. Returns
    whether a confirmation run waits."""
    trials = study.get_trials(deepcopy=False)
    if spec.confirm.top_k == 0 or any(t.state == TrialState.RUNNING and counted(t)
                                      for t in trials):  # fmt: skip
        return False
    directions = [o.direction for o in spec.objectives]
    records = [from_frozen_trial(t) for t in trials]
    wanted = spec.confirm.repeats
    for number, count in repeats_needed(records, directions, spec.confirm.top_k, wanted).items():
        original = trials[number]
        seed = original.user_attrs.get(TrialAttr.CONFIG, {}).get("seed", 0)
        for ordinal in range(wanted - count, wanted):
            fixed = {**original.user_attrs.get(TrialAttr.FIXED, {}),
                     "seed": repeat_seed(seed, ordinal)}  # fmt: skip
            attrs = {TrialAttr.REPEAT_OF: number, TrialAttr.FIXED: fixed}
            if original.user_attrs.get(TrialAttr.BASELINE):
                attrs[TrialAttr.BASELINE] = original.user_attrs[TrialAttr.BASELINE]
            study.enqueue_trial(original.params, user_attrs=attrs)
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    return any(t.user_attrs.get(TrialAttr.REPEAT_OF) is not None for t in waiting)


# -- recording outcomes -----------------------------------------------------------------------


def outcome_record(spec: StudySpec, status: Status, reason: str, *, config=None,
                   predicted=None, outcome=None, intermediate=None,
                   reused=None) -> dict[str, Any]:  # fmt: skip
    """What tunelab records for a finished trial: status, reason, user attributes, objective
    values and constraint violations (JSON, so it can wait in DIR/outcome.json). `predicted`,
    the orchestrator's memory prediction, is kept only when the trial recorded none itself;
    `reused`, what its plan loaded from the stage cache (stagecache.reuse_metrics), kept when
    the trial recorded nothing (stopped early, or failed), so the report counts it."""
    metrics = outcome.metrics if outcome else {}
    metrics = {**(reused or {}), **metrics}
    values = None
    status = Status(status)
    if status == Status.OK:
        missing = [o.metric for o in spec.objectives if o.metric not in metrics]
        if missing:
            status, reason = Status.ERROR, f"objective metric {missing[0]} missing from the trial"
        else:
            values = [float(metrics[o.metric]) for o in spec.objectives]
            odd = [o.metric for o, v in zip(spec.objectives, values, strict=True)
                   if not math.isfinite(v)]  # fmt: skip
            if odd:
                status, values = Status.ERROR, None
                reason = f"objective metric {odd[0]} is not finite"
    attrs = {
        **metric_attrs(metrics), TrialAttr.STATUS: status.value, TrialAttr.REASON: reason,
        TrialAttr.SERIES: _thin(outcome.series) if outcome else {},
        TrialAttr.CONFIG: config.to_dict() if config else {},
    }  # fmt: skip
    if predicted and not prediction_metrics(metrics):
        attrs[TrialAttr.PREDICTED] = predicted
    if outcome:
        attrs[TrialAttr.WALL_S] = outcome.wall_s
        attrs[TrialAttr.OUT_DIR] = str(outcome.out_dir)
        attrs[TrialAttr.LOG] = str(outcome.log_path)
    if outcome and outcome.samples:
        attrs[TrialAttr.SAMPLES] = outcome.samples
    if intermediate:
        attrs[TrialAttr.INTERMEDIATE] = intermediate
    constraints = {}
    if values is not None:
        for constraint in spec.constraints:
            measured = metrics.get(constraint.metric)
            violation = constraint.violation(measured) if measured is not None else math.inf
            constraints[constraint.name] = violation if math.isfinite(violation) else 1e30
    return {"status": status.value, "reason": reason, "values": values, "constraints": constraints,
            "attrs": attrs}  # fmt: skip


def record_outcome(study: optuna.Study, trial: optuna.Trial, record: dict[str, Any]) -> None:
    """Write a record on its trial and tell Optuna (safe to repeat after a storage fault)."""
    set_trial_user_attrs(study, trial._trial_id, record["attrs"])
    status = Status(record["status"])  # a string again once read back from outcome.json
    if record["values"] is not None:
        for name, violation in record["constraints"].items():
            trial.set_constraint(name, violation)
        study.tell(trial, record["values"], state=TrialState.COMPLETE, skip_if_finished=True)
    elif status == Status.INTERRUPTED:
        interrupt(study, trial._trial_id, record["reason"])
    else:
        study.tell(trial, state=TrialState[status.optuna_state], skip_if_finished=True)


def interrupt(study: optuna.Study, trial_id: int, reason: str) -> str:
    """Fail a RUNNING trial as `interrupted` with its reason and enqueue its parameters again,
    unless it was already retried MAX_RETRY times (then the reason says so); returns it."""
    storage = study._storage  # Optuna's own storage API: set_trial_*; no public wrapper
    frozen = storage.get_trial(trial_id)
    if frozen.state.is_finished():  # recorded before a storage fault cut the reply
        return frozen.user_attrs.get(TrialAttr.REASON, reason)
    retries = len(RetryHeartbeatStaleTrialCallback.retry_history(frozen))
    if retries >= MAX_RETRY:
        reason += (f"; not run again: retried {retries} times already, the cap "
                   f"(MAX_RETRY={MAX_RETRY} in tunelab/storage.py)")  # fmt: skip
    storage.set_trial_user_attr(trial_id, TrialAttr.STATUS, Status.INTERRUPTED.value)
    storage.set_trial_user_attr(trial_id, TrialAttr.REASON, reason)
    if storage.set_trial_state_values(trial_id, TrialState.FAIL):
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(trial_id))
    return reason


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _owner_alive(worker: str) -> bool:
    try:
        host, pid, started = worker.rsplit(":", 2)
    except ValueError:  # not a worker id
        return False
    if host != socket.gethostname():
        return True  # another node's: its heartbeat decides
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.NoSuchProcess, ValueError):
        return False


def _kill_left_over(pgid: int | None, worker: str) -> None:
    """Kill the process group a dead orchestrator left, if it is still that trial's (its leader
    carries the orchestrator's identity in WATCH_ENV; a reused pgid does not)."""
    if not pgid:
        return
    with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
        leader = psutil.Process(pgid)
        if leader.environ().get(launcher.WATCH_ENV) == worker.split(":", 1)[1]:
            os.killpg(pgid, 9)
            leader.wait(timeout=10)  # gone before stale op build locks are looked for


def check_out_dir(out_dir: Path, name: str) -> None:
    """InputError when `out_dir` is another study's (OWNER_FILE): trial folders are numbered
    per study, so two studies there would overwrite each other's trials and recover each
    other's saved outcomes."""
    with contextlib.suppress(FileNotFoundError):
        owner = (out_dir / OWNER_FILE).read_text().strip()
        if owner != name:
            raise InputError(f"--out {out_dir}: holds the trials of study {owner!r}; give "
                             f"study {name!r} a folder of its own")  # fmt: skip


def claim_out_dir(out_dir: Path, name: str) -> None:
    """Mark `out_dir` as study `name`'s once the study is open (a mistyped name claims
    nothing); of two studies claiming a new folder at once, the second gets check_out_dir's
    error."""
    if write_once(out_dir / OWNER_FILE, name + "\n") is not None:
        check_out_dir(out_dir, name)


def _saved_outcome(
    trial: optuna.trial.FrozenTrial, study_name: str
) -> dict[str, Any] | None:
    folder = trial.user_attrs.get(TrialAttr.OUT_DIR)
    if not folder:
        return None
    try:
        saved = json.loads((Path(folder) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    # Outcomes saved before they named their study (the folder's owner file guards it now)
    ours = saved.get("study", study_name) == study_name and saved.get("trial") == trial.number
    return saved if ours else None


def recover_interrupted(study: optuna.Study) -> list[str]:
    """Finish the RUNNING trials whose orchestrator died (this host: its pid is gone) or whose
    heartbeat stopped (any host): an outcome saved beside the trial is recorded as it was
    measured; otherwise the trial is failed as `interrupted` and its parameters enqueued again.
    Returns one line per trial."""
    storage = study._storage
    heartbeat = getattr(storage, "get_heartbeat_interval", lambda: None)() is not None
    stale = set(storage._get_stale_trial_ids(study._study_id)) if heartbeat else set()
    notes = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(TrialAttr.WORKER)
        if trial._trial_id in stale:
            why = f"the heartbeat of {worker or 'its worker'} stopped for over {GRACE_S} s"
        elif worker is not None and not _owner_alive(worker):
            why = f"its orchestrator {worker} died"
        else:
            continue
        if worker is not None:
            _kill_left_over(trial.user_attrs.get(PGID_ATTR), worker)
        saved = _saved_outcome(trial, study.study_name)
        if saved is not None:
            record_outcome(study, optuna.Trial(study, trial._trial_id), saved)
            folder = trial.user_attrs[TrialAttr.OUT_DIR]
            notes.append(f"trial {trial.number}: {saved['status']}, recorded from "
                         f"{Path(folder) / OUTCOME_FILE} ({why} before recording it)")  # fmt: skip
        else:
            reason = interrupt(study, trial._trial_id, why)
            notes.append(f"trial {trial.number}: interrupted ({reason})")
    return notes


def _offload_values(loaded: LoadedSpec) -> set[str]:
    """Optimizer-offload values the study's trials may use (base config, knobs, baselines)."""
    base = full_base(loaded)
    values = {base["actor"]["offload_optimizer"], base["critic"]["offload_optimizer"]}
    for name, knob in loaded.spec.space.items():
        if name.endswith(".offload_optimizer"):
            values.update(knob.choices or ())
    for baseline in loaded.spec.baselines:
        values.update(v for k, v in baseline.overrides.items() if k.endswith("offload_optimizer"))
    return values


# -- progress ---------------------------------------------------------------------------------


def _fmt(metric: str, value: float) -> str:
    if metric.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB"
    return f"{value:,.4g}"


def progress_line(loaded: LoadedSpec, trials: list, elapsed_s: float, walls: list[float],
                  workers: int) -> str:  # fmt: skip
    """[name] done/budget | ok, failed, pruned | best per objective | elapsed, remaining."""
    spec = loaded.spec
    done = [t for t in trials if counted(t) and t.state.is_finished()]
    ok = [t for t in done if t.state == TrialState.COMPLETE]
    pruned = sum(t.state == TrialState.PRUNED for t in done)
    parts = [f"[{spec.name}] {len(done)}/{spec.budget.trials} trials",
             f"ok {len(ok)}, failed {len(done) - len(ok) - pruned}, pruned {pruned}"]  # fmt: skip
    capped = [t for t in trials if t.user_attrs.get(TrialAttr.STATUS) == Status.INTERRUPTED
              and "not run again" in t.user_attrs.get(TrialAttr.REASON, "")]  # fmt: skip
    if capped:
        parts.append(f"{len(capped)} interrupted past the retry cap ({MAX_RETRY})")
    repeats = [t for t in trials if t.user_attrs.get(TrialAttr.REPEAT_OF) is not None]
    if repeats:
        finished = sum(t.state.is_finished() for t in repeats)
        parts.append(f"confirmation runs {finished}/{len(repeats)}")
    # The best as the report and export choose it: by configuration mean, feasible in every
    # run, repeated ones first once any configuration has its confirmation runs.
    records = [from_frozen_trial(t) for t in trials] if ok else []
    bests = []
    for index, objective in enumerate(spec.objectives):
        ranking = ranked_configurations(records, index, objective.direction)
        if ranking:
            best, found = ranking[0]
            runs = f", mean of {found.n}" if found.n > 1 else ""
            bests.append(f"{objective.metric} {_fmt(objective.metric, found.mean)} "
                         f"(#{best.number}{runs})")  # fmt: skip
    if bests:
        parts.append("best " + ", ".join(bests))
    remaining = max(spec.budget.trials - len(done), 0)
    eta = sum(walls) / len(walls) * math.ceil(remaining / workers) if walls and remaining else 0
    if spec.budget.minutes is not None:
        eta = min(eta, max(spec.budget.minutes * 60 - elapsed_s, 0))
    parts.append(f"{elapsed_s / 60:.1f} min elapsed, ~{eta / 60:.1f} min left")
    return " | ".join(parts)


# -- the orchestrator -------------------------------------------------------------------------


def _thin(series: dict[str, list[float]]) -> dict[str, list[float]]:
    def thin(values: list[float]) -> list[float]:
        if len(values) <= _SERIES_POINTS:
            return values
        stride = len(values) / _SERIES_POINTS
        return [values[int(i * stride)] for i in range(_SERIES_POINTS)]

    return {name: thin(values) for name, values in series.items()}


def worker_slots(loaded: LoadedSpec, workers: int, gpus: list[Gpu]) -> list[list[int] | None]:
    """This node's GPUs split among `workers` (InputError when they do not suffice)."""
    per_trial = loaded.spec.resources.gpus_per_trial
    if per_trial is None:
        per_trial = base_value(loaded, "ranks") if gpus else 0
    return gpu_slots(workers, per_trial, gpus)


def check_cpu_metrics(loaded: LoadedSpec, gpus: list[Gpu]) -> None:
    """InputError when trials surely run on the CPU (the base config says `device: cpu`, or
    `auto` on a node with neither an NVML GPU nor an NVIDIA device file) and an objective or
    constraint needs a GPU's measurement: every trial would run in full and then be recorded
    as an error for the missing metric."""
    if "device" in loaded.spec.space:  # trials choose their device
        return
    device = base_value(loaded, "device")
    if device == "cpu":
        why = "the base config runs trials on the CPU (device: cpu)"
    elif device == "auto" and not gpus and not cuda_device_files():
        why = "this node has no GPU (NVML finds none, and there is no /dev/nvidia*)"
    else:
        return
    has_peak = base_value(loaded, "peak_tflops") is not None
    named = [(f"objectives[{i}].metric", o.metric) for i, o in enumerate(loaded.spec.objectives)]
    named += [(f"constraints[{i}].metric", c.metric)
              for i, c in enumerate(loaded.spec.constraints)]  # fmt: skip
    for where, metric in named:
        if GPU_ONLY.fullmatch(metric) or (NEEDS_PEAK.fullmatch(metric) and not has_peak):
            raise InputError(f"{loaded.source}: {where}: {metric} is measured on a GPU, and "
                             f"{why}")  # fmt: skip


class Orchestrator:
    """Runs a study's remaining budget with `workers` trials at a time on this node."""

    def __init__(self, loaded: LoadedSpec, study: optuna.Study, url: str, out_dir: Path,
                 workers: int = 1, echo=None) -> None:  # fmt: skip
        self.loaded, self.spec, self.study, self.url = loaded, loaded.spec, study, url
        # Absolute: records name trial folders that resume, report and export (run from any
        # directory) read back, e.g. a saved outcome.
        self.out_dir = out_dir.resolve()
        self.workers = workers
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.gpus: list[Gpu] = gpu_inventory()
        self.slots = worker_slots(loaded, workers, self.gpus)
        self.lock = threading.RLock()  # every storage call goes through it
        self.stop = threading.Event()
        self.worker = _worker_id()
        self.running: set[int] = set()  # trial ids whose heartbeat this process records
        self.claims: dict[Path, str] = {}  # stage-cache entries claimed: entry -> owner
        self.walls: list[float] = []
        self.started = time.monotonic()
        self.errors: list[BaseException] = []
        self.out_of_time = False  # budget.minutes ran out before budget.trials
        self.grid_done = False  # every point of a grid sampler's grid was run
        self.zygotes = (ZygotePool(self.out_dir / "zygotes.log", limit=len(self.slots))
                        if self.spec.resources.preload else None)  # fmt: skip

    # storage, under the lock, with retries

    def _store(self, what: str, action):
        with self.lock:
            return with_retries(action, what, self.url)

    def _budget_left(self) -> bool:
        trials = self.study.get_trials(deepcopy=False)
        return sum(map(counted, trials)) < self.spec.budget.trials

    def _ask(self) -> optuna.Trial | None:
        if self.stop.is_set():
            return None
        minutes = self.spec.budget.minutes
        if minutes is not None and time.monotonic() - self.started > minutes * 60:
            self.out_of_time = True
            return None

        def ask() -> optuna.Trial | None:
            with budget_lock(self.url, self.spec.name):
                sampler = self.study.sampler
                searching = self._budget_left()
                if searching and isinstance(sampler, GridSampler):
                    searching = not sampler.is_exhausted(self.study)
                    self.grid_done = not searching
                if not searching and not enqueue_repeats(self.study, self.spec):
                    return None
                trial = self.study.ask()  # a waiting trial first: baseline, retry or repeat
                trial.set_user_attr(TrialAttr.WORKER, self.worker)
                self._heartbeat(trial._trial_id)
                return trial

        return self._store("asking for a trial", ask)

    def _heartbeat(self, trial_id: int) -> None:
        storage = self.study._storage  # Optuna's heartbeat API lives on the storage
        if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
            storage.record_heartbeat(trial_id)

    def _beat_forever(self) -> None:
        while not self.stop.wait(10):
            with self.lock:
                for trial_id in list(self.running):
                    # A missed beat is harmless; a storage that stays down is reported when
                    # the trial's outcome cannot be recorded.
                    with contextlib.suppress(*STORAGE_ERRORS):
                        self._heartbeat(trial_id)
                for entry in list(self.claims):  # stage-cache entries this process trains
                    refresh_claim(entry)

    def _finished_metrics(self) -> list[dict[str, float]]:
        def read():
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return [{**t.user_attrs.get(TrialAttr.PREDICTED, {}), **trial_metrics(t.user_attrs)}
                    for t in trials]  # fmt: skip

        return self._store("reading finished trials", read)

    # one trial

    def _claim_stages(self, trial: optuna.Trial, plan: dict[str, dict], owner: str) -> dict | None:
        """The plan with every stage it trains claimed for this trial: a stage another trial is
        training is waited for, then loaded (or trained here if that trial ends without it).
        None when the study stops while waiting; on any error the claims taken are dropped."""
        claimed = dict(plan)
        try:
            for stage, step in plan.items():
                if stage not in stagecache.STAGES:  # PPO start: never claimed or waited for
                    continue
                entry, said = Path(step["path"]), False
                while claimed[stage]["action"] == "save":
                    holder = try_claim(entry, owner)
                    if holder is None:
                        with self.lock:
                            self.claims[entry] = owner
                    if is_complete(entry):  # trained meanwhile (its trainer may run on)
                        if holder is None:
                            self._release(entry, owner)
                        claimed[stage] = {**step, "action": "load"}
                    elif holder is None:
                        break  # this trial trains it
                    elif holder and self._stale_claim(entry, holder):
                        release_claim(entry, holder)
                    elif holder:
                        if not said:
                            self.echo(f"trial {trial.number}: waiting for {stage}, which "
                                      f"{holder} is training")  # fmt: skip
                            said = True
                        if self.stop.wait(1.0):
                            self._release_claims(claimed, owner)
                            return None
        except BaseException:
            self._release_claims(claimed, owner)
            raise
        return claimed

    def _stale_claim(self, entry: Path, holder: str) -> bool:
        """A claim nobody refreshed for CLAIM_STALE_S (its orchestrator's heartbeats stopped:
        dead, on any node), or whose orchestrator on this node is gone."""
        age = claim_age_s(entry)
        if age is not None and age > CLAIM_STALE_S:
            return True
        return not _owner_alive(holder.split(" ", 1)[0])

    def _release(self, entry: Path, owner: str) -> None:
        with self.lock:
            if self.claims.get(entry) == owner:
                del self.claims[entry]
        release_claim(entry, owner)

    def _release_claims(self, plan: dict[str, dict], owner: str) -> None:
        for step in plan.values():
            if self.claims.get(Path(step["path"])) == owner:
                self._release(Path(step["path"]), owner)

    def _optuna_prunes(self, trial: optuna.Trial, value: float, step: int) -> bool:
        try:
            with self.lock:
                trial.report(value, step)
                return trial.should_prune()
        except STORAGE_ERRORS:
            return False  # never prune on a storage fault; the outcome's recording reports it

    def _run_one(self, trial: optuna.Trial, gpus: list[int] | None) -> None:
        fixed = trial.user_attrs.get(TrialAttr.FIXED)
        params = self._store(f"trial {trial.number}: sampling",
                             lambda: suggest_params(trial, self.loaded, fixed))  # fmt: skip
        # A trial sees the node's GPUs (its slot's when it has one): the same kind either way.
        verdict = check_trial(self.loaded, params, fixed, self.gpus, self.out_dir / STAGE_CACHE)
        if verdict.refusal is not None:
            self._finish(trial, *verdict.refusal, config=verdict.config,
                         predicted=verdict.predicted)  # fmt: skip
            return
        owner = f"{self.worker} trial {trial.number}"
        plan = None
        self.running.add(trial._trial_id)  # heartbeats while it waits for a stage, and runs
        try:
            plan = self._claim_stages(trial, verdict.plan, owner)
            if plan is None:
                self._finish(trial, Status.INTERRUPTED, "the orchestrator was stopped")
            else:
                shown = ", ".join(f"{k}={v}" for k, v in {**params, **(fixed or {})}.items())
                self._launch(trial, verdict.with_plan(plan), shown or "base config", gpus)
        finally:
            self.running.discard(trial._trial_id)
            self._release_claims(plan or {}, owner)

    def _launch(self, trial: optuna.Trial, verdict: Verdict, shown: str,
                gpus: list[int] | None) -> None:  # fmt: skip
        plan = verdict.plan
        out = self.out_dir / "trials" / f"{trial.number:04d}"
        pruning = TrialPruning(
            self.spec.pruner, self.spec.objectives, verdict.predicted,
            # Read once per trial, not per progress record (trials finishing meanwhile are
            # not used: less pruning, never wrong pruning).
            self._finished_metrics() if self.spec.pruner.type == "dominance" else [],
            lambda value, step: self._optuna_prunes(trial, value, step),
            self.spec.constraints, confirmation=TrialAttr.REPEAT_OF in trial.user_attrs,
        )  # fmt: skip
        self._store(f"trial {trial.number}: starting",
                    lambda: trial.set_user_attr(TrialAttr.OUT_DIR, str(out)))  # fmt: skip
        reuse = "".join(f"; {stage.replace('_', ' ')} "  # "ppo start" too
                        f"{'reused' if step['action'] == 'load' else 'cached'}"
                        for stage, step in plan.items())  # fmt: skip
        self.echo(f"trial {trial.number}: started ({shown}{reuse})")

        def remember_group(pgid: int) -> None:
            with self.lock, contextlib.suppress(*STORAGE_ERRORS):  # recovery can do without it
                trial.set_user_attr(PGID_ATTR, pgid)

        start_read = False  # PPO's start read from the cache: its progress records say so

        def on_progress(record: dict) -> bool:
            nonlocal start_read
            start_read = start_read or bool(record.get(stagecache.START_REUSED))
            return pruning.should_stop(record)

        try:
            outcome = launcher.launch_trial(
                verdict.config, out, timeout_s=self.spec.resources.trial_timeout_s,
                launcher=self.spec.resources.launcher, gpus=gpus, on_progress=on_progress,
                on_start=remember_group, stop=self.stop, stage_plan=plan,
                concurrent=len(self.slots), zygotes=self.zygotes,
            )  # fmt: skip
        except OSError as exc:  # the trial folder cannot be written: no trial can run here
            self._finish(trial, Status.INTERRUPTED, f"cannot write {out} ({first_line(exc)})")
            raise StorageFault(f"trial {trial.number}: cannot write {out} "
                               f"({first_line(exc)}); the study stops") from None  # fmt: skip
        launched = outcome.returncode is not None  # None: stopped before its process started
        if launched:
            self.walls.append(outcome.wall_s)
        reason = outcome.reason
        if outcome.status == Status.PRUNED and pruning.stopped_by:
            reason = f"{reason}: {pruning.stopped_by}"
        reused = reuse_metrics(plan, start_read) if launched else {}
        self._finish(trial, outcome.status, reason, config=verdict.config,
                     predicted=verdict.predicted, outcome=outcome,
                     intermediate=pruning.intermediate, reused=reused)  # fmt: skip

    def _finish(self, trial: optuna.Trial, status: Status, reason: str, **measured) -> None:
        """Record the outcome on the trial and tell Optuna; only here does a trial end. A
        launched trial's outcome is first written beside it, so a storage that fails now
        loses nothing: the next run records it from there."""
        record = outcome_record(self.spec, status, reason, **measured)
        saved = None
        if measured.get("outcome") is not None:
            saved = measured["outcome"].out_dir / OUTCOME_FILE
            with contextlib.suppress(OSError):  # a full disk still leaves the storage
                write_atomic(saved, json.dumps({"study": self.spec.name, "trial": trial.number,
                                                **record}))  # fmt: skip
        try:
            self._store(f"recording trial {trial.number}",
                        lambda: record_outcome(self.study, trial, record))  # fmt: skip
            line = self._store("reading progress", lambda: progress_line(
                self.loaded, self.study.get_trials(deepcopy=False),
                time.monotonic() - self.started, self.walls, self.workers,
            ))  # fmt: skip
        except StorageFault as exc:
            kept = (f"; its outcome is kept in {saved} and will be recorded by the next run"
                    if saved and saved.is_file() else "")  # fmt: skip
            raise StorageFault(f"{exc}{kept}") from None
        status, reason = record["status"], record["reason"]
        self.echo(f"trial {trial.number}: {status}" + (f" ({reason})" if reason else "")
                  + f"\n{line}")  # fmt: skip

    # the loop

    def _work(self, gpus: list[int] | None, done: threading.Event) -> None:
        try:
            while (trial := self._ask()) is not None:
                self._run_one(trial, gpus)
        except BaseException as exc:  # reported by run(); the other workers stop too
            self.errors.append(exc)
            self.stop.set()
        finally:
            done.set()

    def _prepare(self) -> None:
        """Recover what a dead orchestrator left, say where the study stands, and build the
        DeepSpeed ops the trials need before the first one starts."""

        def recover() -> tuple[list[str], str]:
            with budget_lock(self.url, self.spec.name):  # one process recovers a trial
                notes = recover_interrupted(self.study)
            line = progress_line(self.loaded, self.study.get_trials(deepcopy=False), 0.0, [],
                                 self.workers)  # fmt: skip
            return notes, line

        notes, line = self._store("recovering interrupted trials", recover)
        for note in notes:
            self.echo(note)
        self.echo(line)
        if not self._budget_left():
            return
        ops.report_stale_locks(self.echo)
        missing = ops.missing_ops(ops.needed_ops(_offload_values(self.loaded), bool(self.gpus)))
        if missing:
            ops.build_ops(missing, self.out_dir / "ops-build.log", self.echo)

    def run(self) -> int:
        """Run until the budget is used; returns an exit code (130 when interrupted)."""
        self._prepare()
        # Waited on through events, not Thread.join: Python 3.11 marks a thread stopped when a
        # signal interrupts a join on it, and a later join then returns at once, so the study
        # ended before its workers recorded the trials they were stopping.
        finished = [threading.Event() for _ in self.slots]
        threads = [
            threading.Thread(target=self._work, args=(slot, done), name=f"worker-{i}")
            for i, (slot, done) in enumerate(zip(self.slots, finished, strict=True))
        ]
        beat = threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True)
        beat.start()
        for thread in threads:
            thread.start()
        interrupted = False
        try:
            for done in finished:
                done.wait()
        except KeyboardInterrupt:
            interrupted = True
            self.echo("interrupted: stopping the running trials (they will be run again)")
            self.stop.set()
            for done in finished:
                done.wait()
        finally:
            if self.zygotes is not None:
                self.zygotes.close()
        self.stop.set()
        if self.errors:
            raise self.errors[0]
        if self.out_of_time and not interrupted:
            self.echo(f"[{self.spec.name}] stopped: its {self.spec.budget.minutes:g}-minute "
                      "budget is used; the same command continues the study")  # fmt: skip
        if self.grid_done and not interrupted:
            self.echo(f"[{self.spec.name}] stopped: every point of the grid has been run")
        return 130 if interrupted else 0
