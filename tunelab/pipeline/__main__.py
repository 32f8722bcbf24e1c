"""Trial process entry point: `python -m tunelab.pipeline --config DIR/trial.json --out DIR`
(one rank), or through torchrun / the DeepSpeed launcher with `--module tunelab.pipeline`.

The garbage collector is off while torch, DeepSpeed, transformers and peft import: they make
about a million long-lived objects, and collecting during that is about 0.9 s of a trial's
start on the 2-core machine. tunelab.pipeline.startup freezes what they made and turns it back
on before the trial runs.
"""

import gc
import time

started = time.time()  # psutil's process start is only as exact as the boot time (1 s)
gc.disable()

from tunelab.pipeline.process_end import end_process  # noqa: E402
from tunelab.pipeline.run import main  # noqa: E402

end_process(main(process_started=started))
