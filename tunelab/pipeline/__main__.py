"""Trial process entry point: `python -m tunelab.pipeline --config DIR/trial.json --out DIR`
(one rank), or through torchrun / the DeepSpeed launcher with `--module tunelab.pipeline`.

The garbage collector is off while torch, DeepSpeed, transformers and peft import: they make
about a million long-lived objects, and collecting during that is about 0.9 s of a trial's
start on the 2-core machine. tunelab.pipeline.startup freezes what they made and turns it back
on before the trial runs.
"""

import gc
import sys
import time

started = time.time()  # psutil's process start is only as exact as the boot time (1 s)
gc.disable()

from tunelab.pipeline.run import main  # noqa: E402

sys.exit(main(process_started=started))
