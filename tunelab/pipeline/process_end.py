"""How a trial process (and a multi-rank helper) ends once its results are written.

Through `os._exit` after flushing, not through the interpreter's finalization. A process group
that DeepSpeed keeps (`deepspeed.utils.groups._WORLD_GROUP`) outlives `destroy_process_group`,
and gloo's run-loop threads may still hold the last reference to a finished collective's
tensors while the interpreter finalizes. Freeing such a tensor asks for the GIL, a finalizing
CPython ends the asking thread with `pthread_exit`, and the unwinding through C++ aborts the
process ("terminate called without an active exception", SIGABRT) after a run that went well;
under torchrun the other ranks are then killed, possibly before rank 0 has written its results.
tests/pipeline/test_process_end.py reproduces it on 2 gloo ranks.
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
