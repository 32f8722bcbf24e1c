"""Studies: Optuna explores the space, each trial runs isolated, only this process writes.

`tunelab run SPEC` creates or resumes a study; `tunelab worker` joins one from another node.
Each worker thread asks Optuna for a point (under a lock that keeps the budget exact across
processes), turns it into a TrialConfig, skips what cannot run here or is predicted over the
memory budget, launches the trial as a subprocess group, feeds its intermediate throughput to
the pruner, and tells Optuna the outcome with everything measured as user attributes.
"""

from __future__ import annotations

import contextlib
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
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from tunelab import launcher
from tunelab.config import TrialConfig
from tunelab.devices import Gpu, gpu_inventory, gpu_slots, unsupported_reason
from tunelab.errors import InputError
from tunelab.memory import MemoryPrediction, predict
from tunelab.presets import resolve_model
from tunelab.pruning import dominated
from tunelab.records import OBJECTIVES_ATTR, PRUNED_STATUSES, SPEC_ATTR, TrialAttr
from tunelab.spec import LoadedSpec, StudySpec, base_value, spec_from_storage, trial_config
from tunelab.storage import MAX_RETRY, budget_lock, open_storage

BASE_ATTR = "tunelab:base"
HASH_ATTR = "tunelab:search_hash"
PGID_ATTR = "pgid"
_SERIES_POINTS = 200  # per-step series kept in storage are thinned to this many points

optuna.logging.set_verbosity(optuna.logging.WARNING)
# tunelab records heartbeats itself around ask/tell (Study.optimize is not used).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


# -- sampler, pruner, study -------------------------------------------------------------------


def build_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    options, seed = dict(spec.sampler.options), spec.sampler.seed
    kind = spec.sampler.type
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, **options)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **options)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, **options)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, **options)  # imports torch (Optuna's GP)
    space = {}
    for name, knob in spec.space.items():
        if knob.choices is not None:
            space[name] = list(knob.choices)
        elif knob.step is not None:
            count = round((knob.high - knob.low) / knob.step) + 1
            space[name] = [knob.low + i * knob.step for i in range(count)]
    return optuna.samplers.GridSampler(space, seed=seed)


def build_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    options = dict(spec.pruner.options)
    kinds = {
        "median": optuna.pruners.MedianPruner,
        "percentile": optuna.pruners.PercentilePruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }
    if spec.pruner.type in kinds:
        return kinds[spec.pruner.type](**options)
    return optuna.pruners.NopPruner()  # none, or dominance (applied by the orchestrator)


def create_or_resume(loaded: LoadedSpec, url: str) -> optuna.Study:
    """The study named in the spec: created (baselines enqueued) or resumed. Resuming with a
    different search space is refused; budget, resources and baselines may change."""
    spec = loaded.spec
    storage = open_storage(url)
    sampler, pruner = build_sampler(spec), build_pruner(spec)
    directions = [o.direction for o in spec.objectives]
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage, directions=directions, sampler=sampler,
            pruner=pruner,
        )  # fmt: skip
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler,
                                  pruner=pruner)  # fmt: skip
        created = False
    if not created:
        stored = study.user_attrs.get(HASH_ATTR)
        if stored is not None and stored != spec.search_hash():
            raise InputError(
                f"{loaded.source}: study {spec.name!r} in {url} was created from a different "
                "search space, base config or objectives; give the study a new name"
            )
    study.set_user_attr(SPEC_ATTR, spec.to_dict())
    study.set_user_attr(BASE_ATTR, loaded.base_config)
    study.set_user_attr(HASH_ATTR, spec.search_hash())
    study.set_user_attr(OBJECTIVES_ATTR, [vars(o) for o in spec.objectives])
    if created:
        for baseline in spec.baselines:
            study.enqueue_trial(baseline.params, user_attrs={TrialAttr.BASELINE: baseline.name})
    return study


def load_for_worker(url: str, name: str) -> tuple[LoadedSpec, optuna.Study]:
    """A study created by `tunelab run` elsewhere, with the spec it keeps in its attributes."""
    storage = open_storage(url)
    try:
        attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    except KeyError:
        raise InputError(f"storage {url}: no study named {name!r}") from None
    if SPEC_ATTR not in attrs:
        raise InputError(f"study {name!r} in {url} was not created by tunelab")
    loaded = spec_from_storage(attrs[SPEC_ATTR], attrs[BASE_ATTR], name)
    return loaded, create_or_resume(loaded, url)


# -- search space -----------------------------------------------------------------------------


def suggest_params(trial: optuna.Trial, loaded: LoadedSpec) -> dict[str, Any]:
    """Sample the active knobs in spec order; `when` reads earlier knobs or the base config."""
    values: dict[str, Any] = {}
    for name, knob in loaded.spec.space.items():
        if knob.same_as:
            continue  # copied from its source by trial_overrides
        context = {key: values.get(key, base_value(loaded, key)) for key in knob.when}
        if not knob.active(context):
            continue
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
    heartbeat-failed trial does not; its parameters are enqueued again)."""
    if trial.state == TrialState.RUNNING:
        return True
    status = trial.user_attrs.get(TrialAttr.STATUS)
    return trial.state.is_finished() and status not in (None, "interrupted")


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"


def _owner_alive(worker: str) -> bool:
    host, pid, started = worker.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another node's: its heartbeat decides
    try:
        return f"{psutil.Process(int(pid)).create_time():.2f}" == started
    except (psutil.NoSuchProcess, ValueError):
        return False


def recover_interrupted(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose orchestrator died (this host: its pid is gone; another
    host: its heartbeat stopped), kill what they left running, and enqueue their parameters
    again. Returns the numbers of the trials failed here."""
    fail_stale_trials(study)
    storage = study._storage  # Optuna's own storage API: set_trial_*; no public wrapper
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(TrialAttr.WORKER)
        if worker is None or _owner_alive(worker):
            continue
        pgid = trial.user_attrs.get(PGID_ATTR)
        if pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, 9)
        storage.set_trial_user_attr(trial._trial_id, TrialAttr.STATUS, "interrupted")
        storage.set_trial_user_attr(
            trial._trial_id, TrialAttr.REASON, f"orchestrator {worker} died"
        )
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
            study, storage.get_trial(trial._trial_id)
        )
        recovered.append(trial.number)
    return recovered


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
    bests = []
    for index, objective in enumerate(spec.objectives):
        if ok:
            pick = max if objective.direction == "maximize" else min
            best = pick(ok, key=lambda t, i=index: t.values[i])
            bests.append(f"{objective.metric} {_fmt(objective.metric, best.values[index])} "
                         f"(#{best.number})")  # fmt: skip
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


class Orchestrator:
    """Runs a study's remaining budget with `workers` trials at a time on this node."""

    def __init__(self, loaded: LoadedSpec, study: optuna.Study, url: str, out_dir: Path,
                 workers: int = 1, echo=None) -> None:  # fmt: skip
        self.loaded, self.spec, self.study, self.url = loaded, loaded.spec, study, url
        self.out_dir = out_dir
        self.workers = workers
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.gpus: list[Gpu] = gpu_inventory()
        base_ranks = base_value(loaded, "ranks")
        per_trial = self.spec.resources.gpus_per_trial
        if per_trial is None:
            per_trial = base_ranks if self.gpus else 0
        self.slots = gpu_slots(workers, per_trial, self.gpus)
        self.lock = threading.RLock()  # every storage call goes through it
        self.stop = threading.Event()
        self.worker = _worker_id()
        self.running: set[int] = set()  # trial ids whose heartbeat this process records
        self.walls: list[float] = []
        self.started = time.monotonic()
        self.errors: list[BaseException] = []

    # storage, under the lock

    def _budget_left(self) -> bool:
        trials = self.study.get_trials(deepcopy=False)
        return sum(map(counted, trials)) < self.spec.budget.trials

    def _ask(self) -> optuna.Trial | None:
        if self.stop.is_set():
            return None
        minutes = self.spec.budget.minutes
        if minutes is not None and time.monotonic() - self.started > minutes * 60:
            return None
        with self.lock, budget_lock(self.url, self.spec.name):
            if not self._budget_left():
                return None
            trial = self.study.ask()
            trial.set_user_attr(TrialAttr.WORKER, self.worker)
            self._heartbeat(trial._trial_id)
            return trial

    def _heartbeat(self, trial_id: int) -> None:
        storage = self.study._storage  # Optuna's heartbeat API lives on the storage
        if getattr(storage, "get_heartbeat_interval", lambda: None)() is not None:
            storage.record_heartbeat(trial_id)

    def _beat_forever(self) -> None:
        while not self.stop.wait(10):
            with self.lock:
                for trial_id in list(self.running):
                    self._heartbeat(trial_id)

    def _finished_metrics(self) -> list[dict[str, float]]:
        with self.lock:
            trials = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            return [{**t.user_attrs.get(TrialAttr.PREDICTED, {}),
                     **t.user_attrs.get(TrialAttr.METRICS, {})} for t in trials]  # fmt: skip

    # one trial

    def _predict(self, config: TrialConfig) -> MemoryPrediction | None:
        actor, critic = resolve_model(config.models.actor), resolve_model(config.models.critic)
        if actor.shape is None or critic.shape is None:
            return None  # hub names: shapes unknown before the weights are loaded
        return predict(config, actor.shape, critic.shape)

    def _over_budget(self, prediction: MemoryPrediction | None) -> str | None:
        budget = self.spec.memory_budget
        if prediction is None:
            return None
        checks = (("device", prediction.device_peak, budget.device_gib),
                  ("host", prediction.host_peak, budget.host_gib))  # fmt: skip
        for place, peak, limit in checks:
            if limit is not None and peak > limit * 2**30:
                return (f"predicted {place} peak {peak / 2**30:.2f} GiB per rank exceeds the "
                        f"{limit:g} GiB budget; not launched")  # fmt: skip
        return None

    def _on_progress(self, trial: optuna.Trial, intermediate: dict, prediction: dict,
                     finished: list[dict[str, float]], record):  # fmt: skip
        pruner = self.spec.pruner
        value = record.get(pruner.metric)
        if value is None or pruner.type == "none":
            return False
        intermediate[str(record["step"])] = value
        if pruner.type == "dominance":
            running = {**prediction, pruner.metric: value}
            return dominated(running, finished, self.spec.objectives, pruner.margin)
        with self.lock:
            trial.report(value, record["step"])
            return trial.should_prune()

    def _run_one(self, trial: optuna.Trial, gpus: list[int] | None) -> None:
        with self.lock:
            params = suggest_params(trial, self.loaded)
        try:
            config = trial_config(self.loaded, params)
        except InputError as exc:
            self._finish(trial, "invalid", str(exc))
            return
        prediction = self._predict(config)
        flat = prediction.flat_metrics() if prediction else {}
        reason = unsupported_reason(config, self.gpus if gpus else [])
        if reason:
            self._finish(trial, "unsupported", f"{reason} (not launched)", config=config,
                         predicted=flat)  # fmt: skip
            return
        over = self._over_budget(prediction)
        if over:
            self._finish(trial, "pruned_memory", over, config=config, predicted=flat)
            return
        out = self.out_dir / "trials" / f"{trial.number:04d}"
        intermediate: dict[str, float] = {}
        # Read once per trial, not per progress record (trials finishing meanwhile are not
        # used: less pruning, never wrong pruning).
        finished = self._finished_metrics() if self.spec.pruner.type == "dominance" else []

        def remember_group(pgid: int) -> None:
            with self.lock:
                trial.set_user_attr(PGID_ATTR, pgid)

        self.running.add(trial._trial_id)
        try:
            outcome = launcher.launch_trial(
                config, out, timeout_s=self.spec.resources.trial_timeout_s,
                launcher=self.spec.resources.launcher, gpus=gpus,
                on_progress=lambda record: self._on_progress(
                    trial, intermediate, flat, finished, record
                ),
                on_start=remember_group, stop=self.stop,
            )  # fmt: skip
        finally:
            self.running.discard(trial._trial_id)
        self.walls.append(outcome.wall_s)
        self._finish(trial, outcome.status, outcome.reason, config=config, predicted=flat,
                     outcome=outcome, intermediate=intermediate)  # fmt: skip

    def _finish(self, trial: optuna.Trial, status: str, reason: str, *, config=None,
                predicted=None, outcome=None, intermediate=None) -> None:  # fmt: skip
        """Record the outcome on the trial and tell Optuna; only here does a trial end."""
        metrics = outcome.metrics if outcome else {}
        values = None
        if status == "ok":
            missing = [o.metric for o in self.spec.objectives if o.metric not in metrics]
            if missing:
                status, reason = "error", f"objective metric {missing[0]} missing from the trial"
            else:
                values = [float(metrics[o.metric]) for o in self.spec.objectives]
        attrs = {
            TrialAttr.STATUS: status, TrialAttr.REASON: reason, TrialAttr.METRICS: metrics,
            TrialAttr.SERIES: _thin(outcome.series) if outcome else {},
            TrialAttr.CONFIG: config.to_dict() if config else {},
            TrialAttr.PREDICTED: predicted or {},
        }  # fmt: skip
        if outcome:
            attrs[TrialAttr.WALL_S] = outcome.wall_s
            attrs[TrialAttr.OUT_DIR] = str(outcome.out_dir)
            attrs[TrialAttr.LOG] = str(outcome.log_path)
        if intermediate:
            attrs[TrialAttr.INTERMEDIATE] = intermediate
        with self.lock:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            if values is not None:
                for constraint in self.spec.constraints:
                    measured = metrics.get(constraint.metric)
                    violation = constraint.violation(measured) if measured is not None else 1e30
                    trial.set_constraint(constraint.name, violation)
                self.study.tell(trial, values, state=TrialState.COMPLETE)
            elif status in PRUNED_STATUSES:
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                frozen = self.study.tell(trial, state=TrialState.FAIL)
                if status == "interrupted":
                    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(self.study, frozen)
            line = progress_line(
                self.loaded,
                self.study.get_trials(deepcopy=False),
                time.monotonic() - self.started,
                self.walls,
                self.workers,
            )
        self.echo(f"trial {trial.number}: {status}" + (f" ({reason})" if reason else "")
                  + f"\n{line}")  # fmt: skip

    # the loop

    def _work(self, gpus: list[int] | None) -> None:
        try:
            while (trial := self._ask()) is not None:
                self._run_one(trial, gpus)
        except BaseException as exc:  # reported by run(); the other workers stop too
            self.errors.append(exc)
            self.stop.set()

    def run(self) -> int:
        """Run until the budget is used; returns an exit code (130 when interrupted)."""
        with self.lock:
            recovered = recover_interrupted(self.study)
            line = progress_line(self.loaded, self.study.get_trials(deepcopy=False), 0.0, [],
                                 self.workers)  # fmt: skip
        if recovered:
            self.echo(f"trials {recovered}: their orchestrator died; failed and enqueued again")
        self.echo(line)
        threads = [threading.Thread(target=self._work, args=(slot,), name=f"worker-{i}")
                   for i, slot in enumerate(self.slots)]  # fmt: skip
        beat = threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True)
        beat.start()
        for thread in threads:
            thread.start()
        interrupted = False
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
        except KeyboardInterrupt:
            interrupted = True
            self.echo("interrupted: stopping the running trials (they will be run again)")
            self.stop.set()
            for thread in threads:
                thread.join()
        self.stop.set()
        if self.errors:
            raise self.errors[0]
        return 130 if interrupted else 0
