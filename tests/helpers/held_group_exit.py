"""Two gloo ranks end while asynchronous collectives run on a group that outlives
`destroy_process_group`, as DeepSpeed's `deepspeed.utils.groups._WORLD_GROUP` does.

    torchrun --standalone --nproc_per_node 2 tests/helpers/held_group_exit.py HOW OUT_DIR

HOW: `interpreter` (the interpreter's own exit, with finalization) or `end_process` (as a trial
process ends). Each rank writes OUT_DIR/rankN.txt before it ends.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tunelab.pipeline.process_end import end_process

HELD_GROUPS = []  # a module global, as DeepSpeed's; freed only when the interpreter finalizes


def main(how: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    HELD_GROUPS.append(dist.new_group([0, 1]))
    if rank == 1:
        time.sleep(1.0)  # rank 0's collectives wait in its queue meanwhile
    works = [dist.all_reduce(torch.ones(1 << 20), group=HELD_GROUPS[0], async_op=True)
             for _ in range(20)]  # fmt: skip
    del works  # gloo's run-loop threads hold the last references to the tensors now
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text("written")
    if how == "end_process":
        end_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
