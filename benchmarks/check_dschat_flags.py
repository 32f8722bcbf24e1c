"""Compare tunelab.dschat.STEP3_FLAGS with DeepSpeed-Chat's step-3 main.py.

    python benchmarks/check_dschat_flags.py PATH/TO/step3_rlhf_finetuning/main.py

Reads main.py's parse_args() with `ast` (nothing is imported or run) and prints every flag whose
name, type, default, choices, nargs or `required` differ; exit code 1 when any does. The last
run's output is kept in reports/bench/dschat_flags.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from tunelab.dschat import STEP3_FLAGS, Flag

# deepspeed.add_config_arguments(parser): not in main.py's source.
DEEPSPEED_FLAGS = {"--deepspeed", "--deepspeed_config", "--deepscale", "--deepscale_config"}


def flags_of(source: str) -> dict[str, Flag]:
    tree = ast.parse(source)
    parse_args = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                      and n.name == "parse_args")  # fmt: skip
    found = {}
    for node in ast.walk(parse_args):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        literal = {k: ast.literal_eval(v) for k, v in keywords.items()
                   if k in ("default", "choices", "required", "nargs", "action")}  # fmt: skip
        kind = ast.unparse(keywords["type"]) if "type" in keywords else None
        if kind == "SchedulerType":  # transformers' enum of scheduler names
            kind = "str"
        if literal.get("nargs") and kind is None:
            kind = "str"
        default = literal.get("default")
        if isinstance(default, list):
            default = tuple(default)
        choices = tuple(literal["choices"]) if "choices" in literal else None
        name = node.args[0].value
        found[name] = Flag(name, kind, None if literal.get("action") else default, choices,
                           literal.get("nargs"), literal.get("required", False))  # fmt: skip
    return found


def main(path: str) -> int:
    theirs = flags_of(Path(path).read_text())
    ours = {f.name: f for f in STEP3_FLAGS if f.name not in DEEPSPEED_FLAGS}
    problems = [f"only in main.py: {name}" for name in theirs.keys() - ours.keys()]
    problems += [f"only in tunelab: {name}" for name in ours.keys() - theirs.keys()]
    problems += [f"differs: main.py {theirs[n]} vs tunelab {ours[n]}"
                 for n in theirs.keys() & ours.keys() if theirs[n] != ours[n]]  # fmt: skip
    for line in sorted(problems):
        print(line)
    print(f"{len(theirs)} flags in main.py, {len(ours)} in tunelab.dschat; "
          f"{len(problems)} differences")  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
