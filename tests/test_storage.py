"""One contract over every storage backend: several worker processes on one study produce
exactly the budget, with distinct trial numbers (budget lock + Optuna's storage).

Trials here ask for DeepSpeed's hybrid engine, which tunelab refuses as unsupported without
launching, so the test exercises the orchestrators and the storage, not the pipeline."""

from __future__ import annotations

import contextlib
import uuid

import optuna
import pytest
import yaml

from tunelab.spec import load_spec
from tunelab.storage import open_storage
from tunelab.study import create_or_resume

from .conftest import TINY
from .helpers.workers import run_workers

BACKENDS = {
    "sqlite": lambda folder: f"sqlite:///{folder / 'study.db'}",
    "journal": lambda folder: str(folder / "study.log"),
    "postgresql": lambda folder: "postgresql://postgres@127.0.0.1:5432/test",
    "mariadb": lambda folder: "mysql+pymysql://root@127.0.0.1:3306/test",
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_three_processes_share_one_study_exactly(tmp_path, backend):
    url = BACKENDS[backend](tmp_path)
    name = f"t-{uuid.uuid4().hex[:10]}"
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "tiny.yaml").write_text(TINY.read_text())
    spec = {"name": name, "base": "trials/tiny.yaml", "base_overrides": {"hybrid_engine": True},
            "objectives": [{"metric": "perf/ppo_e2e_tokens_per_s", "direction": "maximize"}],
            "space": {"ppo.kl_coef": {"low": 0.01, "high": 0.5}},
            "sampler": {"type": "random", "seed": 0}, "budget": {"trials": 30}}  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    create_or_resume(load_spec(path), url)
    try:
        run_workers(url, name, tmp_path)
        study = optuna.load_study(study_name=name, storage=open_storage(url))
        assert sorted(t.number for t in study.trials) == list(range(30))
        assert {t.user_attrs["status"] for t in study.trials} == {"unsupported"}
    finally:
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=open_storage(url))
