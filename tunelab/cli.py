"""The `tunelab` command: thin subcommands over the library. Never imports torch.

Bad input prints one line, `tunelab: error: ...` (or, for a config or spec with several
mistakes, a first line counting them and one line each), and exits with code 2 before anything
is created or launched; so do an output folder that cannot be written, a storage that cannot
be reached, and running out of memory. A storage that fails mid-study ends it with one line
and exit code 1 (see tunelab.study). Read-only commands (report, export, compare) write only
their output, by default under the study's folder or runs/, never over the repository's files.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
from pathlib import Path

from tunelab.errors import InputError, StorageFault

MIN_FREE_BYTES = 64 * 2**20  # an output folder with less free space is refused up front


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other bad input
        raise InputError(f"{message} (see '{self.prog} --help')")


def _positive_number(text: str) -> float:
    """argparse type: a finite number > 0 (refuses inf and nan, which float() accepts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def writable_folder(folder: Path, option: str = "--out") -> Path:
    """Create `folder` and check it takes a file and has MIN_FREE_BYTES free, so an unwritable
    or full folder is one line before any trial runs."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tunelab-write-check-{os.getpid()}"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        reason = exc.strerror or exc
        raise InputError(f"{option} {folder}: cannot write there ({reason})") from None
    if free < MIN_FREE_BYTES:
        raise InputError(
            f"{option} {folder}: only {free / 2**20:.1f} MiB free, below the "
            f"{MIN_FREE_BYTES // 2**20} MiB tunelab asks for (logs, metrics, reports)"
        )
    return folder


TRIAL_MARKS = ("trial.log", "metrics.json")  # what a trial writes to its folder
REPRODUCE_MARKS = ("repeat0",)  # reproduce's first rerun


def unused_folder(folder: Path, marks: tuple[str, ...], option: str = "--out",
                  claim: bool = False) -> Path:  # fmt: skip
    """`folder`, writable (writable_folder), refused when it holds an earlier run's `marks`:
    writing there would lose what that run recorded. `claim`: the first mark is a folder this
    call creates, atomically, so of two calls at once with one folder only one gets it."""

    def refuse(earlier: Path) -> InputError:
        return InputError(f"{option} {folder}: holds an earlier run ({earlier}); choose another "
                          "folder or move that one away")  # fmt: skip

    earlier = next((folder / mark for mark in marks if (folder / mark).exists()), None)
    if earlier is not None:
        raise refuse(earlier)
    writable_folder(folder, option)
    if claim:
        try:
            (folder / marks[0]).mkdir()
        except FileExistsError:
            raise refuse(folder / marks[0]) from None
        except OSError as exc:
            raise InputError(f"{option} {folder}: cannot write there ({exc.strerror})") from None
    return folder


def claim_unused(folder: Path, mark: str) -> Path:
    """`folder`, or `folder`-2, -3, ...: the first (writable, writable_folder) in which this
    call creates the folder `mark`. Creating a folder is atomic, so two calls at once never
    take the same one; a folder made but never used is taken again."""
    candidate, number = folder, 1
    while True:
        try:
            (writable_folder(candidate, "folder") / mark).mkdir()
            return candidate
        except FileExistsError:
            number += 1
            candidate = folder.with_name(f"{folder.name}-{number}")
        except OSError as exc:
            raise InputError(f"folder {candidate}: cannot write there ({exc.strerror})") from None


# Each kind of input file, with a shipped example to point a user at.
_EXAMPLES = {"trial config": "studies/trials/tiny.yaml", "study spec": "studies/smoke.yaml"}


def _top_level_keys() -> dict[str, set[str]]:
    """The top-level keys of each kind of input file (their dataclasses' fields; disjoint)."""
    from dataclasses import fields

    from tunelab.config import TrialConfig
    from tunelab.spec import StudySpec

    return {"trial config": {f.name for f in fields(TrialConfig)},
            "study spec": {f.name for f in fields(StudySpec)}}  # fmt: skip


def expect_kind(path: Path, wanted: str, command: str) -> None:
    """Refuse a study spec given where a trial config goes, or the other way round, in one
    line saying so (the loader would list each of its keys as unknown)."""
    from tunelab._typed import read_mapping

    data = read_mapping(path)
    keys = _top_level_keys()
    other = next(kind for kind in keys if kind != wanted)
    theirs = [key for key in data if key in keys[other]]
    if theirs and not keys[wanted] & set(data):
        shown = ", ".join(theirs[:4]) + (", ..." if len(theirs) > 4 else "")
        raise InputError(f"{path}: this is a {other} (it has {shown}); `tunelab {command}` "
                         f"takes a {wanted} such as {_EXAMPLES[wanted]}")  # fmt: skip


def _build_ops_for(config, out: Path) -> None:
    """Build the DeepSpeed ops the trial needs and the cache lacks, saying so, after removing
    stale build locks (tunelab.ops)."""
    from tunelab import ops
    from tunelab.devices import gpu_inventory

    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    ops.report_stale_locks(echo)
    offloads = {config.actor.offload_optimizer, config.critic.offload_optimizer}
    missing = ops.missing_ops(ops.needed_ops(offloads, on_gpu=bool(gpu_inventory())))
    if missing:
        ops.build_ops(missing, out / "ops-build.log", echo)


def _fmt_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def trial_summary(outcome) -> str:
    """A few lines a person reads: status, stage figures, memory, where the files are."""
    m = outcome.metrics
    lines = [f"status {outcome.status}" + (f": {outcome.reason}" if outcome.reason else "")]
    lines[0] += f"  ({outcome.wall_s:.1f} s wall, imports included)"
    if "sft/loss_final" in m:
        lines.append(
            f"  SFT  loss {m['sft/loss_first']:.2f} -> {m['sft/loss_final']:.2f}   "
            f"{m['perf/sft_samples_per_s']:.0f} samples/s, "
            f"{m['perf/sft_tokens_per_s']:.0f} tokens/s"
        )
    if "rm/eval_accuracy_start" in m:
        lines.append(
            f"  RM   held-out accuracy {m['rm/eval_accuracy_start']:.2f} -> "
            f"{m['rm/eval_accuracy']:.2f} ({m['rm/eval_pairs']} pairs)   "
            f"{m['perf/rm_samples_per_s']:.0f} pairs/s"
        )
    elif "rm/eval_accuracy" in m:  # a given reward model, evaluated only
        lines.append(
            f"  RM   given, held-out accuracy {m['rm/eval_accuracy']:.2f} "
            f"({m['rm/eval_pairs']} pairs)"
        )
    if "ppo/score_end" in m:
        gold = (
            f"gold {m['ppo/gold_start']:.2f} -> {m['ppo/gold_end']:.2f}   "
            if "ppo/gold_end" in m
            else ""
        )
        lines.append(
            f"  PPO  {gold}RM score {m['ppo/score_start']:.2f} -> {m['ppo/score_end']:.2f}   "
            f"KL {m['ppo/kl_final']:.2f}"
        )
        lines.append(
            f"       end-to-end {m['perf/ppo_e2e_samples_per_s']:.1f} samples/s, "
            f"{m['perf/ppo_e2e_tokens_per_s']:.0f} tokens/s, {m['time/ppo_step_s']:.3f} s/step; "
            f"timed steps: generate {m['time/ppo_generate_s']:.2f} s, experience "
            f"{m['time/ppo_experience_s']:.2f} s, train {m['time/ppo_train_s']:.2f} s"
        )
    if "mem/peak_host_rss_bytes" in m:
        memory = f"  peak memory per rank: host RSS {_fmt_bytes(m['mem/peak_host_rss_bytes'])}"
        if "mem/peak_device_allocated_bytes" in m:
            memory += f", device allocated {_fmt_bytes(m['mem/peak_device_allocated_bytes'])}"
        lines.append(memory)
    lines.append(f"  metrics {outcome.out_dir / 'metrics.json'}   log {outcome.log_path}")
    return "\n".join(lines)


def _cmd_trial(args) -> int:
    from tunelab.config import check_inputs, load_config
    from tunelab.launcher import launch_trial
    from tunelab.records import Status

    expect_kind(args.config, "trial config", "trial")
    config = load_config(args.config, args.overrides)
    check_inputs(config)
    unused_folder(args.out, TRIAL_MARKS)
    _build_ops_for(config, args.out)
    outcome = launch_trial(config, args.out, timeout_s=args.timeout, launcher=args.launcher)
    print(trial_summary(outcome))
    return 0 if outcome.status == Status.OK else 1


def _cmd_estimate(args) -> int:
    from tunelab.config import load_config
    from tunelab.estimate import render
    from tunelab.presets import resolve_model

    overrides = list(args.overrides)
    if args.ranks is not None:
        overrides += [f"ranks={args.ranks}", "batch.train_global=null"]
    expect_kind(args.config, "trial config", "estimate")
    config = load_config(args.config, overrides)
    shapes = []
    for role in ("actor", "critic"):
        source = resolve_model(getattr(config.models, role))
        if source.shape is None:
            raise InputError(
                f"models.{role}={source.name}: estimate needs a preset or a local model directory"
            )
        shapes.append(source.shape)
    names = (config.models.actor, config.models.critic)
    print(render(config, *shapes, names, args.gpu_mem))
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM stops a study like Ctrl-C: running trials are killed and enqueued again."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _cmd_run(args) -> int:
    from tunelab.spec import load_spec
    from tunelab.storage import default_url
    from tunelab.study import check_out_dir, create_or_resume

    expect_kind(args.spec, "study spec", "run")
    loaded = load_spec(args.spec)
    _check_base(loaded, args.workers)
    out = writable_folder(args.out or Path("runs") / loaded.spec.name)
    check_out_dir(out, loaded.spec.name)
    url = args.storage or default_url(out)
    _starting(loaded.spec.name, url, out)
    return _orchestrate(loaded, create_or_resume(loaded, url), url, out, args.workers)


def _cmd_worker(args) -> int:
    from tunelab.study import check_out_dir, create_or_resume, load_for_worker

    out = writable_folder(args.out or Path("runs") / args.study)
    check_out_dir(out, args.study)
    _starting(args.study, args.storage, out)
    loaded = load_for_worker(args.storage, args.study)
    _check_base(loaded, args.workers)
    study = create_or_resume(loaded, args.storage)
    return _orchestrate(loaded, study, args.storage, out, args.workers)


def _starting(name: str, url: str, out: Path) -> None:
    from tunelab.storage import display_url

    print(f"study {name}: storage {display_url(url)}, trials in {out / 'trials'}",
          file=sys.stderr, flush=True)  # fmt: skip


def _check_base(loaded, workers: int) -> None:
    """The base config's model sources and data file, and this node's GPUs for `workers`,
    before any study is created or joined."""
    from tunelab.config import check_inputs, config_from_dict
    from tunelab.devices import gpu_inventory
    from tunelab.study import check_cpu_metrics, worker_slots

    check_inputs(config_from_dict(loaded.base_config, f"{loaded.source} base:"))
    gpus = gpu_inventory()
    worker_slots(loaded, workers, gpus)
    check_cpu_metrics(loaded, gpus)


def _orchestrate(loaded, study, url: str, out: Path, workers: int) -> int:
    from tunelab.study import Orchestrator, claim_out_dir

    claim_out_dir(out, loaded.spec.name)
    _stop_on_sigterm()
    code = Orchestrator(loaded, study, url, out, workers).run()
    print(f"report: {report_command(url, out, loaded.spec.name)}", file=sys.stderr)
    return code


def report_command(url: str, out: Path, name: str) -> str:
    """The `tunelab report` command for a run's study, writing into the run's folder (report's
    own default for a storage URL is runs/<study>, maybe another run's)."""
    import shlex

    from tunelab.storage import default_url, display_url

    if url == default_url(out):
        return shlex.join(["tunelab", "report", str(out)])
    return shlex.join(["tunelab", "report", "--storage", display_url(url), "--study", name,
                       "--out", str(out / "report")])  # fmt: skip


def _study(args):
    from tunelab.storage import load_study

    return load_study(args.study_dir, args.storage, args.study)


def _study_folder(args, study) -> Path:
    """Where a read-only command writes by default: the study's folder, else runs/<study>."""
    return args.study_dir if args.study_dir is not None else Path("runs") / study.study_name


def _cmd_report(args) -> int:
    from tunelab.report import write_report

    study = _study(args)
    out = writable_folder(args.out or _study_folder(args, study) / "report")
    print(f"report: {write_report(study, out)}")
    return 0


def _cmd_compare(args) -> int:
    from tunelab.report import write_comparison
    from tunelab.report.compare import study_labels
    from tunelab.storage import load_study

    studies = [load_study(folder) for folder in args.study_dirs]
    studies += [load_study(url=args.storage, name=name) for name in args.study or ()]
    if len(studies) < 2:
        raise InputError("compare needs at least two studies (folders or --storage with --study)")
    folders = [folder.resolve().name for folder in args.study_dirs]
    folders += [None] * (len(studies) - len(folders))
    labels = study_labels([s.study_name for s in studies], folders)
    default = Path("runs") / ("compare-" + "-vs-".join(labels))
    out = writable_folder(args.out or default)
    print(f"comparison: {write_comparison(studies, out, labels)}")
    return 0


def _cmd_export(args) -> int:
    from tunelab.export import choose_trial, write_export

    study = _study(args)
    record = choose_trial(study, args.objective, args.trial)
    default = _study_folder(args, study) / f"export-trial{record.number}"
    out = write_export(study, record, writable_folder(args.out or default))
    print(f"exported trial {record.number} of {study.study_name} to {out}")
    print(f"  launch: tunelab trial {out / 'trial.yaml'} "
          f"--out runs/{study.study_name}-trial{record.number}")  # fmt: skip
    return 0


def _cmd_import_dschat(args) -> int:
    import shlex

    import yaml

    from tunelab._typed import read_mapping, with_dotted
    from tunelab.config import config_from_dict
    from tunelab.dschat import import_step3
    from tunelab.spec import load_spec

    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if not flags:
        raise InputError("import-dschat: give DeepSpeed-Chat's step-3 flags after --")
    values, notes = import_step3(flags)
    if args.base:
        expect_kind(args.base, "trial config", "import-dschat --base")
    base = read_mapping(args.base) if args.base else {}
    config = config_from_dict(with_dotted(base, values), "DeepSpeed-Chat command:")
    out = args.out
    writable_folder(out.parent)
    header = [f"# tunelab trial {out} --out runs/{out.stem}",
              f"# Imported with tunelab import-dschat from: {shlex.join(flags)}",
              *(f"# - {note}" for note in notes)]  # fmt: skip
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(config.to_dict(), sort_keys=False))
    print(f"trial config: {out}")
    if args.spec is not None:
        spec_out = args.spec_out or out.with_name(f"{out.stem}-study.yaml")
        expect_kind(args.spec, "study spec", "import-dschat --spec")
        spec = read_mapping(args.spec)
        mine = config.to_dict()
        fixed = {knob: _dotted(mine, knob) for knob, how in spec.get("space", {}).items()
                 if "same_as" not in how}  # a same_as knob follows its source  # fmt: skip
        spec.update(
            name=f"{spec.get('name', 'study')}-{out.stem}",
            base=str(out.resolve()),
            baselines=[{"name": "your-dschat-run", "params": {}, "overrides": fixed},
                       *spec.get("baselines", [])],
        )  # fmt: skip
        writable_folder(spec_out.parent)
        head = f"# tunelab run {spec_out}\n# {args.spec} around your DeepSpeed-Chat run\n"
        draft = spec_out.with_name(f".{spec_out.name}.draft")
        draft.write_text(head + yaml.safe_dump(spec, sort_keys=False))
        try:
            load_spec(draft)  # kept only once it is valid as it is
        except InputError as exc:
            draft.unlink()
            raise InputError(str(exc).replace(str(draft), str(spec_out))) from None
        draft.replace(spec_out)
        print(f"study spec: {spec_out} (first baseline: your run)")
    for note in notes:
        print(f"  note: {note}")
    return 0


def _dotted(mapping: dict, key: str):
    for part in key.split("."):
        mapping = mapping[part]
    return mapping


def _cmd_reproduce(args) -> int:
    from dataclasses import replace

    from tunelab.export import read_export, reproduce_table, reproduce_text, rerun_seeds
    from tunelab.launcher import launch_trial
    from tunelab.records import Status
    from tunelab.zygote import ZygotePool

    config, figures = read_export(args.export_dir)
    if args.out is None:  # a new folder per call: an earlier call's reruns stay
        default = Path("runs") / f"reproduce-{args.export_dir.resolve().name}"
        out = claim_unused(default, REPRODUCE_MARKS[0])
    else:
        out = unused_folder(args.out, REPRODUCE_MARKS, claim=True)
    _build_ops_for(config, out)
    seeds = rerun_seeds(config.seed, args.repeats)
    runs = []
    zygotes = ZygotePool(out / "zygotes.log", limit=1)  # one-rank reruns fork, as in a study
    try:
        for repeat, seed in enumerate(seeds):
            rerun = replace(config, seed=seed)
            outcome = launch_trial(rerun, out / f"repeat{repeat}", timeout_s=args.timeout,
                                   zygotes=zygotes)  # fmt: skip
            print(f"repeat {repeat} (seed {seed}): {outcome.status} {outcome.reason}".rstrip(),
                  file=sys.stderr)  # fmt: skip
            runs.append(outcome.metrics if outcome.status == Status.OK else {})
    finally:
        zygotes.close()
    print(f"study {figures['study']}, trial {figures['trial']}, {args.repeats} repeats, seeds "
          f"{', '.join(map(str, seeds))} (the trial's, then one more per repeat, as the study's "
          "confirmation runs):")  # fmt: skip
    print(reproduce_text(reproduce_table(figures, runs)))
    return 0 if all(runs) else 1


def _add_study_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study_dir", type=Path, nargs="?", help="study folder (holds study.db)")
    parser.add_argument("--storage", help="Optuna storage URL instead of a folder")
    parser.add_argument("--study", help="study name (when the storage holds several)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tunelab", description="RLHF tuning laboratory on DeepSpeed")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    trial = commands.add_parser("trial", help="run one SFT -> RM -> PPO trial and measure it")
    trial.add_argument("config", type=Path, help="trial config, YAML or JSON")
    trial.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    trial.add_argument("--out", type=Path, required=True,
                       help="output folder (not one that holds an earlier trial)")
    trial.add_argument("--timeout", type=_positive_number, help="seconds before it is killed")
    trial.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    trial.set_defaults(handler=_cmd_trial)

    estimate = commands.add_parser("estimate", help="predict memory per stage before launching")
    estimate.add_argument("config", type=Path, help="trial config, YAML or JSON")
    estimate.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    estimate.add_argument("--ranks", type=_count, help="ranks (GPUs) sharing the ZeRO partitions")
    estimate.add_argument("--gpu-mem", type=_positive_number, default=80.0,
                          help="GiB per GPU (default 80)")  # fmt: skip
    estimate.set_defaults(handler=_cmd_estimate)

    run = commands.add_parser("run", help="create or resume a study and run its budget")
    run.add_argument("spec", type=Path, help="study spec (studies/*.yaml)")
    run.add_argument("--storage", help="Optuna RDB URL or journal file (default: SQLite in --out)")
    run.add_argument("--out", type=Path, help="study folder (default: runs/<name>)")
    run.add_argument("--workers", type=_count, default=1, help="trials at once on this node")
    run.set_defaults(handler=_cmd_run)

    worker = commands.add_parser("worker", help="join a running study from another node")
    worker.add_argument("--storage", required=True, help="the study's Optuna storage URL")
    worker.add_argument("--study", required=True, help="study name")
    worker.add_argument("--out", type=Path, help="folder for this node's trials")
    worker.add_argument("--workers", type=_count, default=1, help="trials at once on this node")
    worker.set_defaults(handler=_cmd_worker)

    report = commands.add_parser("report", help="HTML/Markdown report, plots and CSV of a study")
    _add_study_target(report)
    report.add_argument("--out", type=Path, help="folder (default: STUDY_DIR/report, or "
                        "runs/<study>/report)")  # fmt: skip
    report.set_defaults(handler=_cmd_report)

    compare = commands.add_parser("compare", help="several studies side by side")
    compare.add_argument("study_dirs", type=Path, nargs="*", help="study folders")
    compare.add_argument("--storage", help="a storage URL holding the --study names")
    compare.add_argument("--study", action="append", help="study name in --storage (repeat)")
    compare.add_argument("--out", type=Path, help="folder (default: runs/compare-…)")
    compare.set_defaults(handler=_cmd_compare)

    export = commands.add_parser("export", help="DeepSpeed JSON and commands of a chosen trial")
    _add_study_target(export)
    choice = export.add_mutually_exclusive_group()
    choice.add_argument("--objective", help="best trial for this objective metric")
    choice.add_argument("--trial", type=int, help="this trial number")
    export.add_argument("--out", type=Path, help="folder (default: STUDY_DIR/export-trial<N>, "
                        "or runs/<study>/export-trial<N>)")  # fmt: skip
    export.set_defaults(handler=_cmd_export)

    dschat = commands.add_parser(
        "import-dschat", help="a DeepSpeed-Chat step-3 command line as a trial config"
    )
    dschat.add_argument("--out", type=Path, required=True, help="trial config to write (YAML)")
    dschat.add_argument("--base", type=Path, help="trial config for what the flags leave out")
    dschat.add_argument("--spec", type=Path, help="a study spec to put your run into, as base "
                        "and first baseline")  # fmt: skip
    dschat.add_argument("--spec-out", type=Path, help="where that study spec goes")
    dschat.add_argument(
        "flags", nargs=argparse.REMAINDER,
        help="after --: main.py's flags, or the whole deepspeed command",
    )  # fmt: skip
    dschat.set_defaults(handler=_cmd_import_dschat)

    reproduce = commands.add_parser("reproduce", help="rerun an export and compare its figures")
    reproduce.add_argument("export_dir", type=Path, help="folder written by tunelab export")
    reproduce.add_argument("--repeats", type=_count, default=3)
    reproduce.add_argument("--out", type=Path, help="folder for the reruns (default: "
                           "runs/reproduce-EXPORT, -2, -3, ...: a new one per call)")
    reproduce.add_argument("--timeout", type=_positive_number, help="seconds per rerun")
    reproduce.set_defaults(handler=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # Overrides may follow options (`trial CONFIG --out DIR k=v`); argparse leaves them over.
        overrides = [item for item in extra if "=" in item and not item.startswith("-")]
        if len(overrides) != len(extra) or (overrides and not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if overrides:
            args.overrides = [*args.overrides, *overrides]
        return args.handler(args)
    except InputError as exc:
        return _fail(str(exc), 2)
    except KeyboardInterrupt:
        print("tunelab: interrupted", file=sys.stderr)
        return 130
    except StorageFault as exc:
        return _fail(str(exc), 1)
    except MemoryError:
        return _fail(_OUT_OF_MEMORY, 2)
    except RecursionError:
        return _fail("input nested too deeply for Python (RecursionError)", 2)
    except ImportError as exc:  # under a low memory limit: "failed to map segment ..."
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "ImportError"
        return _fail(f"cannot load {exc.name or 'a module'} ({detail[-120:]}); "
                     f"a broken install, or {_OUT_OF_MEMORY}", 2)  # fmt: skip
    except OSError as exc:  # a file or folder the command was pointed at
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 2)


_OUT_OF_MEMORY = "out of memory (MemoryError); free memory or raise the limit (ulimit -v)"


def _fail(message: str, code: int) -> int:
    """Print the error: one line (what a user typed is echoed with its control characters
    escaped), or a validation pass's "N errors" line followed by one line each."""
    from tunelab._typed import printable

    lines = message.split("\n")
    several = lines[0].endswith(f": {len(lines) - 1} errors") and len(lines) > 1
    if not (several and all(line.startswith("  ") for line in lines[1:])):
        lines = [printable(message)]
    print("tunelab: error: " + "\n".join(map(printable, lines)), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
