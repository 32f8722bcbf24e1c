"""GPU acceptance: prove tunelab's GPU path on one GPU in about 8 minutes, with no network there.

Here, on a machine with package access (fills .whl/ with what the GPU node lacks: deepspeed as
a pure-Python wheel whose ops compile at run time, optuna, transformers 5.24, pydantic, ...):

    python benchmarks/gpu_acceptance.py prepare
    python benchmarks/gpu_acceptance.py dry-run      # prepare, check the wheels, run the steps
                                                     # on CPU stand-ins (tiny models)

On the GPU node, from the repository root with .whl/ beside it (the device tool: carry .whl),
run DEVICE_COMMAND below, then copy OUT to reports/gpu/<date>/.

Steps: the OPT-1.3b + OPT-350m trial at DeepSpeed-Chat's single-GPU settings (fp16), a bf16
ZeRO-2 and a bf16 ZeRO-3 + optimizer offload variant, and the 3-trial studies/gpu-smoke.yaml.
The study's one-rank trials fork from tunelab's zygote (their CUDA use in a forked child is
checked there; where the zygote's imports loaded the driver they start fresh, and the summary
says which). Then PPO's decoding loop against transformers' generate (same greedy tokens; both
timed) and a probe of a GPU-only refusal (optimizer offload at ZeRO-0). OUT gets summary.md
(PASS/FAIL lines: every trial ok, predicted device peak within 10% of measured per stage, MFU
and NVML figures reported, fp16 skipped steps, the probes), results.json (every metric) and the
tail of each trial's log.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.parser import Parser
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
DEADLINE_S = 540  # the whole run, so one device call of 600 s holds it
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl"
    " && PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_acceptance.py run"
    " --out $OUT"
)
TOLERANCE = 0.10  # predicted vs measured device peak per stage

# What the GPU node's image holds (the device tool's KINDS.md, read 2026-11-17/2026-11): name ->
# version where KINDS.md gives one, else None (present, version unknown).
DEVICE_PYTHON = "3.12"
DEVICE_PACKAGES = {
    "torch": "2.11.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2", "safetensors": "0.8.0", "accelerate": "1.15.0", "numpy": "2.5.2",
    **dict.fromkeys((
        "einops", "msgpack", "ninja", "packaging", "psutil", "py-cpuinfo", "tqdm", "pyyaml",
        "pandas", "pyarrow", "matplotlib", "nvidia-ml-py", "markupsafe", "regex", "typer",
        "filelock", "fsspec", "jinja2", "requests", "sympy", "networkx", "pillow", "six",
        "python-dateutil", "click", "rich", "shellingham", "typing-extensions", "annotated-doc",
        "hf-xet", "httpx", "anyio", "certifi", "idna", "h11", "httpcore", "urllib3",
        "charset-normalizer", "pygments", "markdown-it-py", "mdurl", "contourpy", "cycler",
        "fonttools", "kiwisolver", "pyparsing", "tzdata", "mpmath", "triton", "setuptools",
    )),
}  # fmt: skip
# Carried: (distribution, binary?) at the version installed here; binaries for CPython 3.12.
CARRIED = (
    ("deepspeed", False), ("optuna", False), ("transformers", False), ("peft", False),
    ("alembic", False), ("mako", False), ("colorlog", False), ("hjson", False),
    ("pydantic", False), ("annotated-types", False), ("typing-inspection", False),
    ("pydantic-core", True), ("sqlalchemy", True), ("greenlet", True),
)  # fmt: skip
_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
              "manylinux2014_x86_64", "manylinux1_x86_64")  # fmt: skip
_MARKER_ENV = {
    "python_version": DEVICE_PYTHON, "python_full_version": f"{DEVICE_PYTHON}.3",
    "platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux",
    "os_name": "posix", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "extra": "",
}  # fmt: skip


# -- the wheel folder -------------------------------------------------------------------------


def prepare(folder: Path = WHEELS) -> list[Path]:
    """Fill `folder` with the carried distributions at this machine's versions."""
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("*.whl"):
        stale.unlink()
    for name, binary in CARRIED:
        pin = f"{name}=={importlib.metadata.version(name)}"
        if name == "deepspeed":  # no binary wheel: pure Python, ops built at run time
            argv = ["wheel", "--no-deps", "--no-binary", "deepspeed", "-w", str(folder), pin]
            env = {"DS_BUILD_OPS": "0"}
        elif binary:
            argv = ["download", "--no-deps", "--only-binary=:all:", "--python-version",
                    DEVICE_PYTHON, "--implementation", "cp", "-d", str(folder), pin]  # fmt: skip
            for tag in _PLATFORMS:
                argv[-1:-1] = ["--platform", tag]
            env = {}
        else:
            argv = ["download", "--no-deps", "--only-binary=:all:", "-d", str(folder), pin]
            env = {}
        run = subprocess.run([sys.executable, "-m", "pip", *argv], capture_output=True,
                             text=True, env={**os.environ, **env})  # fmt: skip
        if run.returncode:
            raise SystemExit(f"pip {' '.join(argv)} failed:\n{run.stderr[-2000:]}")
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {folder}")
    return wheels


def wheel_metadata(wheel: Path) -> tuple[str, Version, list[Requirement]]:
    """(canonical name, version, requirements) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(archive.read(name).decode())
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") or ()]
    return canonicalize_name(meta["Name"]), Version(meta["Version"]), requires


def unmet_requirements(wheels: list[Path], device: dict[str, str | None] = DEVICE_PACKAGES):
    """Requirements of the carried wheels that neither the wheels nor the device satisfy, as
    lines. A carried wheel replaces the device's copy of the same distribution."""
    carried = {}
    requires = []
    for wheel in wheels:
        name, version, reqs = wheel_metadata(wheel)
        if name in carried:
            return [f"two wheels of {name}: keep one"]
        carried[name] = version
        requires += [(name, r) for r in reqs]
    present = {canonicalize_name(k): v for k, v in device.items()}
    problems = []
    for owner, req in requires:
        if req.marker is not None and not req.marker.evaluate(_MARKER_ENV):
            continue  # extras and other platforms
        name = canonicalize_name(req.name)
        if name in carried:
            version = carried[name]
        elif name in present:
            if present[name] is None:
                continue  # on the device, version unknown: trusted
            version = Version(present[name])
        else:
            problems.append(f"{owner} needs {req}: not carried, not on the device")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{owner} needs {req}: {name} {version} there")
    return problems


# -- the steps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialStep:
    name: str
    config: str  # relative to the repository
    overrides: tuple[str, ...] = ()
    timeout_s: float = 240


DSCHAT = "studies/trials/opt-1.3b-opt-350m.yaml"
SHORT = ("sft.steps=4", "rm.steps=4", "ppo.steps=5")
TRIALS = (
    TrialStep("dschat-1.3b-fp16", DSCHAT, (), 240),
    TrialStep("bf16-zero2", DSCHAT, ("precision=bf16", "actor.zero_stage=2",
                                     "critic.zero_stage=2", *SHORT), 150),
    TrialStep("bf16-zero3-offload", DSCHAT, (
        "precision=bf16", "actor.zero_stage=3", "critic.zero_stage=3",
        "actor.offload_optimizer=cpu", "critic.offload_optimizer=cpu", *SHORT), 240),
)  # fmt: skip
STUDY = "studies/gpu-smoke.yaml"
# CPU stand-ins for the dry run: the same knobs on the tiny preset.
CPU_STANDIN = ("models.actor=tiny", "models.critic=tiny", "ppo.max_prompt_len=8",
               "ppo.max_answer_len=10", "ppo.min_answer_len=10", "batch.train_micro=4",
               "batch.generation_micro=4", "batch.grad_accum=1", "data.eval_size=8",
               "actor.lora_rank=0")  # fmt: skip


@dataclass
class Results:
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)  # PASS / FAIL / INFO
    trials: dict[str, dict] = field(default_factory=dict)

    def left_s(self) -> float:
        return DEADLINE_S - (time.monotonic() - self.started)

    def check(self, ok: bool, what: str) -> None:
        self.lines.append(f"{'PASS' if ok else 'FAIL'} {what}")


def plan(cpu: bool) -> list[tuple[TrialStep, list[str]]]:
    """Each trial step with its overrides, validated (InputError on a bad one)."""
    from tunelab.config import load_config
    from tunelab.devices import cpu_supports_fp16

    steps = []
    for step in TRIALS:
        overrides = list(step.overrides)
        if cpu:
            overrides += CPU_STANDIN
            if not cpu_supports_fp16():
                overrides.append("precision=bf16")
        load_config(ROOT / step.config, overrides)
        steps.append((step, overrides))
    return steps


def study_spec(cpu: bool, folder: Path) -> Path:
    """The study spec to run: the shipped one, or its CPU stand-in written to `folder`."""
    from tunelab.spec import load_spec

    path = ROOT / STUDY
    if cpu:
        spec = yaml.safe_load(path.read_text())
        spec["base"] = str((path.parent / spec["base"]).resolve())
        spec["base_overrides"] = {k: yaml.safe_load(v) for k, v in
                                  (item.split("=", 1) for item in CPU_STANDIN)}  # fmt: skip
        spec["memory_budget"] = {}
        for objective in spec["objectives"]:  # no device memory on a CPU
            objective["metric"] = objective["metric"].replace("device_allocated", "host_rss")
        path = folder / "gpu-smoke-cpu.yaml"
        path.write_text(yaml.safe_dump(spec))
    load_spec(path)
    return path


def memory_lines(name: str, metrics: dict) -> list[tuple[bool, str]]:
    """Per stage: predicted device peak against torch's measured peak allocation."""
    out = []
    for key in sorted(metrics):
        if not key.endswith("/peak_device_allocated_bytes") or key.count("/") != 2:
            continue
        stage = key.split("/")[1]
        predicted = metrics.get(f"mem/{stage}/predicted_device_peak_bytes")
        if not predicted:
            continue
        error = predicted / metrics[key] - 1
        out.append((abs(error) <= TOLERANCE,
                    f"memory {name} {stage}: predicted {predicted / 2**30:.2f} GiB, measured "
                    f"{metrics[key] / 2**30:.2f} GiB ({error:+.1%})"))  # fmt: skip
    return out


def run_trials(results: Results, steps, work: Path, out: Path, on_gpu: bool) -> None:
    from tunelab.config import load_config
    from tunelab.launcher import launch_trial

    for step, overrides in steps:
        if results.left_s() < 60:
            results.lines.append(f"FAIL trial {step.name}: not run, out of time")
            continue
        config = load_config(ROOT / step.config, overrides)
        timeout = min(step.timeout_s, results.left_s() - 30)
        outcome = launch_trial(config, work / step.name, timeout_s=timeout)
        metrics = outcome.metrics
        results.trials[step.name] = {"status": outcome.status, "reason": outcome.reason,
                                     "wall_s": outcome.wall_s, "overrides": overrides,
                                     "metrics": metrics}  # fmt: skip
        _keep_log_tail(outcome.log_path, out / f"{step.name}.log")
        results.check(outcome.status == "ok",
                      f"trial {step.name}: {outcome.status} {outcome.reason} "
                      f"({outcome.wall_s:.0f} s)".rstrip())  # fmt: skip
        if outcome.status != "ok":
            continue
        results.lines.append(
            f"INFO trial {step.name}: {metrics['perf/ppo_e2e_tokens_per_s']:.0f} tokens/s "
            f"end-to-end, generation {metrics['perf/ppo_generate_tokens_per_s']:.0f} tokens/s"
        )
        skipped = {k: metrics[k] for k in metrics if k.endswith("skipped_steps")}
        results.lines.append(f"INFO fp16 skipped steps {step.name}: {skipped}, "
                             f"timed PPO steps {metrics['ppo/timed_steps']}")  # fmt: skip
        if not on_gpu:
            results.lines.append(f"INFO {step.name}: memory, MFU and NVML checks need a GPU")
            continue
        for ok, line in memory_lines(step.name, metrics):
            results.check(ok, line)
        mfu = metrics.get("perf/ppo_e2e_mfu")
        results.check(mfu is not None, f"mfu {step.name}: perf/ppo_e2e_mfu = {mfu}")
        nvml = {k: v for k, v in metrics.items() if k.startswith("gpu/")}
        results.check("gpu/nvml_used_peak_bytes" in nvml, f"nvml {step.name}: {nvml}")


# Optimizer offload at ZeRO-0 with tunelab's refusal bypassed: tunelab.devices says DeepSpeed
# 0.19's CPU Adam then asserts on GPU parameters. This checks that claim on the GPU.
ZERO0_OFFLOAD_PROBE = """
import torch, deepspeed
from tunelab.config import EngineConfig, load_config
from tunelab.dsconfig import train_ds_config
from tunelab.pipeline.runtime import start_runtime
config = load_config(None, ["precision=bf16", "batch.train_micro=2", "batch.generation_micro=2"])
start_runtime(config)
ds = train_ds_config(config, EngineConfig(zero_stage=0, offload_optimizer="cpu"), 1e-3)
model = torch.nn.Linear(64, 64)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
engine.backward(engine(torch.randn(2, 64, device=engine.device, dtype=torch.bfloat16)).sum())
engine.step()
print("PROBE ran")
"""


def probe_zero0_offload(results: Results) -> None:
    run = subprocess.run([sys.executable, "-c", ZERO0_OFFLOAD_PROBE], capture_output=True,
                         text=True, timeout=max(results.left_s() - 20, 30), cwd=ROOT)  # fmt: skip
    refused = "CPUAdam param is on" in run.stderr
    ran = "PROBE ran" in run.stdout
    results.trials["zero0_offload_probe"] = {"returncode": run.returncode,
                                             "stderr_tail": run.stderr[-2000:]}  # fmt: skip
    results.check(refused and not ran,
                  "zero0-offload: DeepSpeed's CPU Adam refuses GPU parameters at ZeRO-0, as "
                  f"tunelab.devices says (ran: {ran})")  # fmt: skip


# PPO's decoding loop against transformers' generate on the device: a random OPT-125m-shaped
# model (a tiny one on the CPU), 16 left-padded prompts, 64 greedy tokens. The answers must be
# the same token for token; the times (median of 3 after a warm-up) are reported.
DECODING_PROBE = """
import json, sys, time, torch
from transformers import OPTConfig, OPTForCausalLM
from tunelab.pipeline.decoding import Decoding, decode
on_gpu = sys.argv[1] == "gpu"
device = torch.device("cuda" if on_gpu else "cpu")
shape = dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
             word_embed_proj_dim=768, vocab_size=50272) if on_gpu else dict(
             hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
             word_embed_proj_dim=64, vocab_size=2000)
torch.manual_seed(0)
model = OPTForCausalLM(OPTConfig(**shape)).to(device, torch.bfloat16).eval()
ids = torch.randint(3, shape["vocab_size"], (16, 64), device=device)
mask = torch.ones_like(ids)
for row in range(16):
    ids[row, : row * 3], mask[row, : row * 3] = 1, 0
decoding = Decoding(max_new=64, min_new=64, eos_id=2, pad_id=1, temperature=None)
def timed(call):
    times = []
    for _ in range(4):
        if on_gpu: torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad(): out = call()
        if on_gpu: torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times[1:])[1]
theirs, generate_s = timed(lambda: model.generate(input_ids=ids, attention_mask=mask,
                                                  **decoding.generate_kwargs()))
ours, decode_s = timed(lambda: decode(model, ids, mask, decoding))
print(json.dumps({"equal": bool(torch.equal(ours, theirs)), "generate_s": generate_s,
                  "decode_s": decode_s}))
"""


def probe_decoding(results: Results, on_gpu: bool) -> None:
    run = subprocess.run([sys.executable, "-c", DECODING_PROBE, "gpu" if on_gpu else "cpu"],
                         capture_output=True, text=True, cwd=ROOT,
                         timeout=max(results.left_s() - 20, 30))  # fmt: skip
    try:
        found = json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        found = {}
    results.trials["decoding_probe"] = {**found, "stderr_tail": run.stderr[-2000:]}
    results.check(found.get("equal") is True,
                  "decoding: PPO's loop gives generate's greedy tokens, 16 left-padded prompts "
                  f"x 64 tokens ({found or 'no result'})")  # fmt: skip
    if found:
        results.lines.append(f"INFO decoding: {found['decode_s']:.3f} s against generate's "
                             f"{found['generate_s']:.3f} s "
                             f"({found['decode_s'] / found['generate_s']:.2f}x)")  # fmt: skip


def run_study(results: Results, spec: Path, work: Path) -> None:
    from tunelab.records import from_frozen_trial
    from tunelab.storage import load_study

    if results.left_s() < 90:
        results.lines.append("FAIL study: not run, out of time")
        return
    folder = work / "study"
    try:
        run = subprocess.run(
            [sys.executable, "-m", "tunelab", "run", str(spec), "--out", str(folder)],
            capture_output=True, text=True, timeout=results.left_s() - 20, cwd=ROOT,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        results.lines.append("FAIL study: out of time")
        return
    records = [from_frozen_trial(t) for t in load_study(folder).get_trials(deepcopy=False)]
    statuses = [r.status for r in records]
    results.trials["study"] = {"returncode": run.returncode, "statuses": statuses,
                               "values": [r.values for r in records],
                               "stderr_tail": run.stderr[-3000:]}  # fmt: skip
    results.check(run.returncode == 0 and statuses == ["ok"] * 3,
                  f"study {spec.name}: 3 trials, statuses {statuses}")  # fmt: skip
    # One-rank trials fork from a zygote that imported torch, transformers and peft; where its
    # imports loaded the CUDA driver, they start fresh and their logs say why (tunelab.zygote).
    logs = [p.read_text(errors="replace") for p in sorted(folder.glob("trials/*/trial.log"))]
    forked = sum("tunelab zygote: forked" in log for log in logs)
    why = sorted({line for log in logs for line in log.splitlines()
                  if line.startswith("tunelab: no zygote")})  # fmt: skip
    results.lines.append(f"INFO zygote: {forked} of {len(logs)} study trials forked; "
                         f"{'; '.join(why) or 'none started fresh'}")  # fmt: skip


def _keep_log_tail(log: Path, target: Path, lines: int = 200) -> None:
    try:
        text = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    target.write_text("\n".join(text) + "\n")


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "gpu": None}  # fmt: skip
    for name in ("deepspeed", "transformers", "peft", "optuna"):
        info[name] = importlib.metadata.version(name)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def write_summary(results: Results, out: Path, env: dict, command: str) -> None:
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# GPU acceptance, {date}", "",
        f"Command: `{command}`", "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
        "```", *results.lines, "```", "",
        f"{sum(x.startswith('PASS') for x in results.lines)} passed, "
        f"{sum(x.startswith('FAIL') for x in results.lines)} failed, "
        f"{time.monotonic() - results.started:.0f} s", "",
    ]  # fmt: skip
    (out / "summary.md").write_text("\n".join(lines))
    record = {"environment": env, "lines": results.lines, "trials": results.trials}
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


def run(out: Path, cpu: bool) -> int:
    import torch

    on_gpu = torch.cuda.is_available() and not cpu
    if not on_gpu and not cpu:
        raise SystemExit("no GPU here: use `dry-run` for the CPU stand-ins")
    out.mkdir(parents=True, exist_ok=True)
    results = Results()
    env = environment()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        steps = plan(cpu)
        spec = study_spec(cpu, work)
        run_trials(results, steps, work, out, on_gpu)
        run_study(results, spec, work)
        if results.left_s() > 60:
            probe_decoding(results, on_gpu)
        if on_gpu and results.left_s() > 60:
            probe_zero0_offload(results)
    write_summary(results, out, env, " ".join(["python3", *sys.argv]))
    return 1 if any(line.startswith("FAIL") for line in results.lines) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("prepare", "check", "run", "dry-run"))
    parser.add_argument("--out", type=Path, help="results folder (run, dry-run)")
    args = parser.parse_args()
    if args.command in ("prepare", "dry-run"):
        prepare()
    if args.command in ("check", "dry-run"):
        problems = unmet_requirements(sorted(WHEELS.glob("*.whl")))
        for line in problems:
            print(f"unmet: {line}")
        if problems:
            return 1
        print("wheel folder complete for the GPU node's image")
    if args.command == "run":
        return run(args.out or ROOT / "reports" / "gpu", cpu=False)
    if args.command == "dry-run":
        out = args.out or Path(tempfile.mkdtemp(prefix="gpu-acceptance-dry-"))
        code = run(out, cpu=True)
        print(f"dry run: results in {out}")
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
