"""The least time ppo_step.py's ZeRO-2 PPO step can take on these libraries, beside that step
in this checkout and in another one (e.g. an earlier commit), alternating in one run.

    git worktree add --detach /tmp/orig f63ad04
    python benchmarks/ppo_step_floor.py --other /tmp/orig [--repeats 3] [--steps 8]

The floor is measured in a process of its own (OMP_NUM_THREADS=1, as the trials), on the
trial's four engines (tiny OPT-shaped preset, ZeRO-2, bf16, optimizer offload, built by
tunelab's PPOTrainer, random weights) and times only the library calls that a step doing
DeepSpeed-Chat's work has to make, with none of a step's own code between them:
- generate: the actor's 32 forwards with a KV cache (the 32 prompt tokens, then one token at a
  time; each next token fixed rather than chosen from the logits), timed three ways
  (transformers' dynamic cache as PPO's decoding uses it, its static cache, and the dynamic
  one with oneDNN off), the fastest counting;
- experience: the forwards of actor, reference, critic and reward model over the 4 x 64
  tokens, no-grad, on the bare modules (DeepSpeed's engine bypassed);
- train: actor then critic, each an engine forward, backward of the output's mean, and step.
Forwards that train, and experience's, run under models.training_attention as the step's do.
The sum of the three is the floor; a step built on transformers' model and DeepSpeed's
engines cannot take less on the same machine. Writes reports/bench/ppo_step_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

from checkout import record_header, short_commit
from ppo_step import SETTINGS, alternating_medians, run

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ["actor.zero_stage=2", "critic.zero_stage=2"]
PHASES = ("generate", "experience", "train")
# The decoding loop three ways; the floor takes the fastest. oneDNN is torch's CPU library for
# bf16 matrix products; off, torch's own kernels run them.
DECODING = ("dynamic cache", "static cache", "oneDNN off, dynamic cache")


def measure_floor(steps: int) -> dict[str, float]:
    """Seconds per step of each bare phase, mean over `steps` after one warm-up step."""
    import torch
    from transformers import DynamicCache, StaticCache

    from tunelab.config import load_config
    from tunelab.pipeline.batching import position_ids
    from tunelab.pipeline.models import training_attention
    from tunelab.pipeline.ppo import PPOTrainer
    from tunelab.pipeline.run import _quiet_libraries, build_context
    from tunelab.pipeline.runtime import start_runtime
    from tunelab.pipeline.telemetry import MemoryTracker

    _quiet_libraries()
    warnings.simplefilter("ignore")  # mkldnn.flags warns of TF32 on every CPU
    overrides = [s for s in SETTINGS if not s.startswith(("sft.steps", "rm.steps"))]
    config = load_config(ROOT / "studies/trials/tiny.yaml",
                         [*overrides, *ZERO2, "sft.steps=0", "rm.steps=0"])  # fmt: skip
    runtime = start_runtime(config)
    memory = MemoryTracker(runtime.device)
    trainer = PPOTrainer(build_context(config, runtime, memory), None, None)
    prompt_len, answer_len = config.ppo.max_prompt_len, config.ppo.max_answer_len
    rows = config.batch.generation_micro
    vocab = trainer.actor.module.config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def generate(prompt: torch.Tensor, variant: str) -> torch.Tensor:
        model, length = trainer.actor.module, prompt_len + answer_len
        static = variant == "static cache"
        if static:  # preallocated keys and values, a mask over all of them
            cache = StaticCache(config=model.config, max_cache_len=length)
            mask = torch.zeros(rows, length, dtype=prompt.dtype)
            mask[:, :prompt_len] = 1
        else:
            cache, mask = DynamicCache(config=model.config), torch.ones_like(prompt)
        positions, step_ids, answer = position_ids(torch.ones_like(prompt)), prompt, []
        onednn = not variant.startswith("oneDNN off")
        with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=onednn):
            for _ in range(answer_len):
                place = {"cache_position": positions[0]} if static else {}
                model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                      cache=cache, use_cache=True, logits_to_keep=1, **place)  # fmt: skip
                step_ids = prompt[:, len(answer) % prompt_len, None]  # fixed, not chosen
                answer.append(step_ids)
                if static:
                    mask[:, prompt_len + len(answer) - 1] = 1
                else:
                    mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                positions = positions[:, -1:] + 1
        return torch.cat([prompt, *answer], dim=1)

    def answer_logits(engine) -> dict:
        """The actor's and reference's logits for the answer positions only, as PPO's."""
        if engine in (trainer.actor, trainer.reference):
            return {"use_cache": False, "logits_to_keep": answer_len + 1}
        return {}

    def experience(seq: torch.Tensor) -> None:
        mask, tokens = torch.ones_like(seq), seq.shape[1]
        with torch.no_grad():
            for engine in (trainer.actor, trainer.reference, trainer.critic, trainer.reward):
                with training_attention(engine, tokens):
                    engine.module(input_ids=seq, attention_mask=mask,
                                  position_ids=position_ids(mask), **answer_logits(engine))

    def train(seq: torch.Tensor) -> None:
        mask, tokens = torch.ones_like(seq), seq.shape[1]
        for engine in (trainer.actor, trainer.critic):
            with training_attention(engine, tokens):
                output = engine(input_ids=seq, attention_mask=mask,
                                position_ids=position_ids(mask), **answer_logits(engine))
                loss = getattr(output, "logits", output).float().mean()
                engine.backward(loss)
            engine.step()

    seconds: dict[str, list[float]] = {name: [] for name in (*DECODING, *PHASES[1:])}
    for _ in range(steps + 1):
        prompt = torch.randint(4, vocab, (rows, prompt_len), generator=generator)
        trainer.set_training(False)
        for variant in DECODING:
            started = time.perf_counter()
            seq = generate(prompt, variant).clone()
            seconds[variant].append(time.perf_counter() - started)
        started = time.perf_counter()
        experience(seq)
        seconds["experience"].append(time.perf_counter() - started)
        trainer.set_training(True)
        started = time.perf_counter()
        train(seq)
        seconds["train"].append(time.perf_counter() - started)
    trainer.close()
    memory.close()
    mean = {name: statistics.fmean(times[1:]) for name, times in seconds.items()}
    floor = {"generate": min(mean[variant] for variant in DECODING),
             **{phase: mean[phase] for phase in PHASES[1:]}}  # fmt: skip
    return {"ppo_step_s": sum(floor.values()), **{f"ppo_{p}_s": s for p, s in floor.items()},
            **{f"generate ({variant})": mean[variant] for variant in DECODING}}  # fmt: skip


def floor_run(steps: int) -> dict[str, float]:
    """measure_floor in a fresh process, one thread (as ppo_step.run's trials)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, "--measure", str(steps)], env=env,
                          cwd=ROOT, check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", type=Path, help="the checkout to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed floor steps per run")
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # floor_run's child
    args = parser.parse_args()
    if args.measure is not None:
        print(json.dumps(measure_floor(args.measure)))
        return
    if args.other is None or args.repeats < 1 or args.steps < 1:
        parser.error("--other is required; --repeats and --steps must be at least 1")
    other, here = short_commit(args.other), short_commit(ROOT)
    measures = {other: lambda: run(args.other, ZERO2), f"{here} step": lambda: run(ROOT, ZERO2),
                "floor": lambda: floor_run(args.steps)}  # fmt: skip
    rows = alternating_medians(measures, args.repeats)
    record = {
        **record_header(),
        "rows": rows,
    }
    out = ROOT / "reports" / "bench"
    (out / "ppo_step_floor.json").write_text(json.dumps(record, indent=1) + "\n")
    base = rows[0]["ppo_step_s"]
    lines = ["# The ZeRO-2 PPO step's floor", "",
             f"`{record['command'].strip()}` on {record['date']} ({record['machine']}); "
             f"medians of {args.repeats} alternating runs, seconds per step. The floor times "
             "only the library calls a step has to make (see the script's docstring).", "",
             f"| measured | step (s) | x of {other} | generate | experience | train | runs (s) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        runs_text = ", ".join(f"{s:.3f}" for s in row["step_s_runs"])
        lines.append(f"| {row['variant']} | {row['ppo_step_s']:.3f} | "
                     f"{row['ppo_step_s'] / base:.2f} | {row['ppo_generate_s']:.3f} | "
                     f"{row['ppo_experience_s']:.3f} | {row['ppo_train_s']:.3f} | "
                     f"{runs_text} |")  # fmt: skip
    floor = rows[-1]
    lines += ["", "The floor's decoding loop, each way (s, median of the runs' means):", "",
              "| " + " | ".join(DECODING) + " |", "|---" * len(DECODING) + "|",
              "| " + " | ".join(f"{floor[f'generate ({v})']:.3f}" for v in DECODING) + " |"]
    (out / "ppo_step_floor.md").write_text("\n".join(lines) + "\n")
    print((out / "ppo_step_floor.md").read_text())


if __name__ == "__main__":
    main()
