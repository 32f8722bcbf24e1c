"""Before a trial launches: its config, its stage plan, its memory prediction, and whether it
may run at all (pure: no torch, no storage).

A trial is not launched when its parameters make no valid config (`invalid`), when this node
cannot run it (`unsupported`: the verdict the trial process would reach, found without starting
it), or when its predicted peak exceeds the spec's memory budget (`pruned_memory`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunelab.config import TrialConfig
from tunelab.devices import Gpu, unsupported_reason
from tunelab.errors import InputError
from tunelab.memory import MemoryPrediction, trial_prediction
from tunelab.presets import resolve_model
from tunelab.records import Status
from tunelab.spec import LoadedSpec, MemoryBudget, trial_config
from tunelab.stagecache import reused_stages, stage_plan


@dataclass(frozen=True)
class Verdict:
    """What the orchestrator knows of a trial before launching it; `refusal` (status, reason)
    when it must not launch."""

    config: TrialConfig | None
    plan: dict[str, dict] = field(default_factory=dict)
    predicted: dict[str, float] = field(default_factory=dict)  # flat; empty when unknown
    refusal: tuple[Status, str] | None = None
    on_cuda: bool = False  # the trial will run on CUDA (the prediction holds its headroom)

    def with_plan(self, plan: dict[str, dict]) -> Verdict:
        """This verdict for `plan` (a stage waited for and now loaded): prediction redone."""
        if plan == self.plan:
            return self
        prediction = predicted_memory(self.config, self.on_cuda, reused_stages(plan))
        return replace(self, plan=plan, predicted=flat(prediction))


def predicted_memory(config: TrialConfig, on_cuda: bool, reused: list[str]):
    """tunelab.memory.trial_prediction from the presets' shapes; None for hub names (shapes
    unknown until the trial loads the weights; the trial then records its own)."""
    actor, critic = resolve_model(config.models.actor), resolve_model(config.models.critic)
    if actor.shape is None or critic.shape is None:
        return None
    return trial_prediction(config, actor.shape, critic.shape, on_cuda, reused)


def flat(prediction: MemoryPrediction | None) -> dict[str, float]:
    """The prediction as stored (`mem/.../predicted_*`); empty when there is none."""
    return prediction.flat_metrics() if prediction else {}


def over_budget(prediction: MemoryPrediction | None, budget: MemoryBudget) -> str | None:
    """Why a predicted trial exceeds the memory budget (per rank), None when it fits."""
    if prediction is None:
        return None
    checks = (("device", prediction.device_peak, budget.device_gib),
              ("host", prediction.host_peak, budget.host_gib))  # fmt: skip
    for place, peak, limit in checks:
        if limit is not None and peak > limit * 2**30:
            return (f"predicted {place} peak {peak / 2**30:.2f} GiB per rank exceeds the "
                    f"{limit:g} GiB budget; not launched")  # fmt: skip
    return None


def check_trial(loaded: LoadedSpec, params: dict[str, Any], fixed: dict[str, Any] | None,
                gpus: list[Gpu], cache: Path) -> Verdict:  # fmt: skip
    """The verdict on one trial: `gpus` are the GPUs it would see (none: the CPU), `cache` the
    study's stage cache."""
    try:
        config = trial_config(loaded, params, fixed)
    except InputError as exc:
        return Verdict(None, refusal=(Status.INVALID, str(exc)))
    plan = stage_plan(config, cache, loaded.spec.measure)
    on_cuda = bool(gpus) and config.device != "cpu"
    prediction = predicted_memory(config, on_cuda, reused_stages(plan))
    predicted = flat(prediction)
    reason = unsupported_reason(config, gpus)
    if reason:
        refusal = (Status.UNSUPPORTED, f"{reason} (not launched)")
        return Verdict(config, plan, predicted, refusal, on_cuda)
    over = over_budget(prediction, loaded.spec.memory_budget)
    if over:
        return Verdict(config, plan, predicted, (Status.PRUNED_MEMORY, over), on_cuda)
    return Verdict(config, plan, predicted, on_cuda=on_cuda)
