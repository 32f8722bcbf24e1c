"""How a trial process (and a multi-rank helper) ends once its results are written.

Through `os._exit` after flushing, not through the interpreter's finalization. A process group
that DeepSpeed keeps (`deepspeed.utils.groups._WORLD_GROUP`) outlives `destroy_process_group`,
so gloo's threads of that group may still be freeing a collective's tensors while CPython
finalizes; the rank then aborts ("terminate called without an active exception", SIGABRT) after
a run that went well, and under torchrun the other ranks are killed, possibly before rank 0 has
written its results. tests/helpers/held_group_exit.py ends 2 gloo ranks that way: 8 of 10 runs
aborted through finalization, none through end_process (reports/bench/process_end.md); CI's
two failures of a multi-rank helper printed the same message.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def end_process(code: int) -> NoReturn:
    """Flush what the process wrote and leave with `code`, skipping finalization."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
